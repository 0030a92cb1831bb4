"""Auto-tagging: the metadata the proxy adds to every chat completion.

Tags come from five sources, applied in this order; a later source overrides
an earlier one for the same key:

1. static tags from the config file (``[tags] env = "prod"``);
2. request headers ``X-Distillery-Tag-<key>: <value>`` (stripped before forwarding);
3. the calling app: the ``/a/<app>/v1/...`` path prefix, else the ``[apps]``
   map from API-key fingerprint to app name;
4. the prompt fingerprint (``prompt_fp``): a short hash of the system and
   developer messages with digits and whitespace normalised, plus the tool
   names, so calls of one task group together without anyone tagging them;
5. ``[[rules]]`` matching the model name and/or the message text by regex.

Client-sent metadata always survives unchanged; proxy tags fill the room left
under OpenAI's limits (16 pairs, keys <= 64 chars, values <= 512 chars) in the
order above.  Whatever does not fit is dropped and reported, never sent.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Mapping
from typing import Any

from distillery.core.config import Settings
from distillery.core.shapes import MAX_KEY, MAX_PAIRS, MAX_VALUE, message_text

_DIGITS = re.compile(r"\d+")
_SPACE = re.compile(r"\s+")


def prompt_fingerprint(body: Mapping[str, Any]) -> str | None:
    """A stable 12-hex-digit name for the task a request performs, or ``None``.

    Digits are collapsed so that templates with dates, ids or counts in them
    still group together; a request with neither a system/developer message
    nor tools has no template to name.
    """
    messages = body.get("messages")
    parts: list[str] = []
    if isinstance(messages, list):
        parts.extend(
            message_text(m)
            for m in messages
            if isinstance(m, dict) and m.get("role") in ("system", "developer")
        )
    tools = body.get("tools")
    if isinstance(tools, list):
        names = sorted(
            str(tool["function"].get("name", ""))
            for tool in tools
            if isinstance(tool, dict) and isinstance(tool.get("function"), dict)
        )
        parts.append("tools:" + ",".join(names))
    if not parts:
        return None
    return _fingerprint("\n".join(parts))


@functools.lru_cache(maxsize=1024)
def _fingerprint(template: str) -> str:
    """Remembered: an app sends the same few system prompts, often thousands of characters
    long, and two regular expressions and a SHA-256 over them on every call add up."""
    text = _SPACE.sub(" ", _DIGITS.sub("0", template)).strip()
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _text(header: str) -> str:
    """A header as text: bytes that are not UTF-8 (kept by aiohttp as surrogates) become U+FFFD."""
    if header.isascii():
        return header
    return header.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class Tagger:
    def __init__(self, settings: Settings) -> None:
        self.static = dict(settings.tags)
        self.header_prefix = settings.tagging.header_prefix.lower()
        self.app_key = settings.tagging.app_key
        self.apps = dict(settings.apps)
        self.fingerprint_key = settings.fingerprint.key if settings.fingerprint.enabled else None
        self.rules = [
            (
                re.compile(rule.model) if rule.model else None,
                re.compile(rule.text) if rule.text else None,
                dict(rule.set),
            )
            for rule in settings.rules
        ]

    def is_tag_header(self, name: str) -> bool:
        return name.lower().startswith(self.header_prefix)

    def tags(
        self,
        body: Mapping[str, Any],
        headers: Mapping[str, str],
        tenant: str,
        path_app: str | None,
        fingerprint: str | None,
    ) -> dict[str, str]:
        tags = dict(self.static)
        for name, value in headers.items():
            if name.lower().startswith(self.header_prefix):
                key = _text(name[len(self.header_prefix) :].lower())
                if key:
                    tags[key] = _text(value)
        app = path_app or self.apps.get(tenant)
        if app:
            tags[self.app_key] = app
        if self.fingerprint_key and fingerprint:
            tags[self.fingerprint_key] = fingerprint
        if self.rules:
            self._apply_rules(body, tags)
        return tags

    def _apply_rules(self, body: Mapping[str, Any], tags: dict[str, str]) -> None:
        model = str(body.get("model") or "")
        text: str | None = None
        for model_re, text_re, values in self.rules:
            if model_re is not None and not model_re.search(model):
                continue
            if text_re is not None:
                if text is None:
                    messages = body.get("messages")
                    text = (
                        "\n".join(message_text(m) for m in messages or () if isinstance(m, dict))
                        if isinstance(messages, list)
                        else ""
                    )
                if not text_re.search(text):
                    continue
            tags.update(values)


def merge_metadata(
    client: Any, tags: Mapping[str, str]
) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """Client metadata plus as many proxy tags as OpenAI's limits allow.

    Returns the metadata to send and ``(key, reason)`` for each tag dropped.
    Client metadata is never altered: if it is itself invalid the upstream
    answers exactly as it would without the proxy.
    """
    merged: dict[str, str] = dict(client) if isinstance(client, dict) else {}
    dropped: list[tuple[str, str]] = []
    for key, value in tags.items():
        if key in merged:
            if merged[key] != value:
                dropped.append((key, "the client set this key itself"))
        elif len(key) > MAX_KEY:
            dropped.append((key, f"key longer than {MAX_KEY} characters"))
        elif len(value) > MAX_VALUE:
            dropped.append((key, f"value longer than {MAX_VALUE} characters"))
        elif len(merged) >= MAX_PAIRS:
            dropped.append((key, f"metadata already holds {MAX_PAIRS} pairs"))
        else:
            merged[key] = value
    return merged, dropped
