"""Redaction of secrets and personal data before anything is written to disk.

Redaction applies to what Distillery *stores* (database rows, the spool,
exported datasets), never to what it forwards: the upstream model sees the
request exactly as the app sent it.  Only string values are rewritten; keys,
numbers and structure are untouched, so a redacted record is still a valid
chat completion.  Each match becomes ``[REDACTED:<name>]``; when a pattern has
a group named ``redact``, only that group is replaced.

This runs on the proxy's request path, so the built-in patterns are written
for Python's regex engine: each starts with a literal or a character class
(which the engine scans for quickly) instead of a look-behind, skips strings
that lack a required substring (no ``@``, no e-mail), and checks word
boundaries in Python only for the rare candidate match.  Values under keys
that only ever hold API identifiers or enums (``id``, ``role``, ``type``, ...)
are not scanned; ``model`` is, because it is whatever the client typed.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

CACHED_CHARS = 16_384

# Keys whose string values are identifiers or enum members, never free text.
STRUCTURAL_KEYS = frozenset(
    {
        "id",
        "object",
        "role",
        "finish_reason",
        "type",
        "system_fingerprint",
        "service_tier",
        "tool_call_id",
    }
)


_SCALARS = frozenset({int, float, bool})


@dataclass(frozen=True)
class Pattern:
    name: str
    regex: re.Pattern[str]
    triggers: tuple[str, ...] = ()  # skip the string unless one of these occurs in it
    bounded: bool = False  # a match must not touch a letter, digit or _ on either side
    check: Callable[[str], bool] | None = None  # a match counts only if this says so

    @property
    def trigger(self) -> re.Pattern[str] | None:
        """The triggers as one regex of literals, which the engine scans for in C."""
        if not self.triggers:
            return None
        return re.compile("|".join(re.escape(t) for t in self.triggers))


DEFAULT_PATTERNS: tuple[Pattern, ...] = (
    Pattern(
        "api_key",
        re.compile(
            r"(?:sk-(?:proj-|svcacct-|ant-)?[A-Za-z0-9_\-]{20,}"
            r"|gh[pousr]_[A-Za-z0-9]{30,}"
            r"|xox[abpr]-[A-Za-z0-9\-]{10,}"
            r"|AKIA[0-9A-Z]{16}"
            r"|AIza[0-9A-Za-z_\-]{35})"
        ),
        triggers=("sk-", "gh", "xox", "AKIA", "AIza"),
        bounded=True,
    ),
    Pattern(
        "api_key",
        re.compile(r"Bearer (?P<redact>[A-Za-z0-9._~+/\-]{20,}=*)"),
        triggers=("Bearer ",),
    ),
    Pattern(
        "email",
        re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}"),
        triggers=("@",),
        bounded=True,
    ),
    Pattern(
        "card",
        # 13-19 digits, grouped by single spaces or dashes or not at all, that
        # pass the Luhn check (before "phone", which would take part of them).
        re.compile(r"\d(?:[ \-]?\d){12,18}"),
        bounded=True,
        check=lambda text: _luhn(text),
    ),
    Pattern(
        "phone",
        # One leading character class, then the shape chosen by what it matched:
        # +CC (AREA) 555-0100, +CC 30 1234 5678, +15555550100, (030) 1234 5678,
        # 030 1234 5678, 415-555-0100.
        re.compile(
            r"[+(\d](?:"
            r"(?<=\+)(?:\d{1,3}[\s.\-]?(?:\(\d{2,4}\)[\s.\-]?|\d{2,4}[\s.\-])"
            r"\d{3,4}[\s.\-]?\d{3,4}|\d{8,15})"
            r"|(?<=\()\d{2,4}\)[\s.\-]?\d{3,4}[\s.\-]?\d{3,4}"
            r"|(?<=\d)\d{1,3}[\s.\-]\d{3,4}[\s.\-]?\d{3,4})"
        ),
        bounded=True,
    ),
)


def _luhn(text: str) -> bool:
    digits = [int(c) for c in text if c.isdigit()]
    total = 0
    for position, digit in enumerate(reversed(digits)):
        if position % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def _touches_word(text: str, start: int, end: int) -> bool:
    before = text[start - 1] if start else " "
    after = text[end] if end < len(text) else " "
    return before.isalnum() or before in "_+" or after.isalnum() or after == "_"


class Redactor:
    """Rewrites every string in a JSON-like structure through a set of patterns."""

    def __init__(self, patterns: Iterable[Pattern]) -> None:
        self.patterns = tuple(patterns)
        self._checks = tuple((p, p.trigger) for p in self.patterns)
        # Calls of one task repeat their long system prompt: redact it once.
        # Only strings up to CACHED_CHARS are kept: a cache of 1,024 entries
        # must not hold a 50 MB prompt alive.
        self._cached = functools.lru_cache(maxsize=1024)(self._text)

    @classmethod
    def from_settings(cls, defaults: bool, extra: Iterable[tuple[str, str]] = ()) -> Redactor:
        custom = [Pattern(name, re.compile(pattern)) for name, pattern in extra]
        return cls([*(DEFAULT_PATTERNS if defaults else ()), *custom])

    def text(self, value: str) -> str:
        if len(value) <= CACHED_CHARS:
            return self._cached(value)
        return self._text(value)

    def _text(self, value: str) -> str:
        for pattern, trigger in self._checks:
            if trigger is not None and trigger.search(value) is None:
                continue
            value = pattern.regex.sub(_Replacer(pattern, value), value)
        return value

    def __call__(self, value: Any) -> Any:
        """Return ``value`` with every string redacted; dicts and lists are rebuilt."""
        if not self.patterns:
            return value
        return self._walk(value)

    def _walk(self, value: Any) -> Any:
        # On every captured call: exact types first (what JSON parses to), and a string
        # under a dict key handled in the loop rather than in a call of its own.
        kind = type(value)
        if kind is dict or (kind is not list and isinstance(value, dict)):
            out = {}
            for key, item in value.items():
                if type(item) is str:
                    if key in STRUCTURAL_KEYS:
                        out[key] = item
                    elif len(item) <= CACHED_CHARS:
                        out[key] = self._cached(item)
                    else:
                        out[key] = self._text(item)
                elif item is None or type(item) in _SCALARS:
                    out[key] = item
                else:
                    out[key] = self._walk(item)
            return out
        if kind is list or isinstance(value, list):
            return [self._walk(item) for item in value]
        if isinstance(value, str):
            return self.text(value)
        return value


class _Replacer:
    __slots__ = ("label", "pattern", "text")

    def __init__(self, pattern: Pattern, text: str) -> None:
        self.pattern = pattern
        self.text = text
        self.label = f"[REDACTED:{pattern.name}]"

    def __call__(self, match: re.Match[str]) -> str:
        start, end = match.span()
        if self.pattern.bounded and _touches_word(self.text, start, end):
            return match.group(0)
        if self.pattern.check is not None and not self.pattern.check(match.group(0)):
            return match.group(0)
        if "redact" in self.pattern.regex.groupindex:
            inner_start, inner_end = match.span("redact")
            whole = match.group(0)
            return whole[: inner_start - start] + self.label + whole[inner_end - start :]
        return self.label
