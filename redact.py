"""Redaction of secrets and personal data before anything is written to disk.

Redaction applies to what Distillery *stores* (database rows, the spool,
exported datasets), never to what it forwards: the upstream model sees the
request exactly as the app sent it.  Only string values are rewritten; keys,
numbers and structure are untouched, so a redacted record is still a valid
chat completion.  Each match becomes ``[REDACTED:<name>]``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

# Ordered: the first alternative that matches at a position wins, so the
# specific secret shapes come before the looser phone pattern.
DEFAULT_PATTERNS: dict[str, str] = {
    "api_key": (
        r"\b(?:sk-(?:proj-|svcacct-|ant-)?[A-Za-z0-9_\-]{20,}"
        r"|gh[pousr]_[A-Za-z0-9]{30,}"
        r"|xox[abpr]-[A-Za-z0-9\-]{10,}"
        r"|AKIA[0-9A-Z]{16}"
        r"|AIza[0-9A-Za-z_\-]{35})"
        r"|(?<=Bearer )[A-Za-z0-9._~+/\-]{20,}=*"
    ),
    "email": r"\b[A-Za-z0-9._%+\-]+@[A-Za-z0-9.\-]+\.[A-Za-z]{2,}\b",
    "phone": (
        r"(?<![\w+])(?:\+\d{1,3}[\s.\-]?)?(?:\(\d{2,4}\)[\s.\-]?|\d{2,4}[\s.\-])"
        r"\d{3,4}[\s.\-]?\d{3,4}(?![\w])"
        r"|(?<![\w+])\+\d{8,15}(?!\w)"
    ),
}


class Redactor:
    """Rewrites every string in a JSON-like structure through a set of patterns."""

    def __init__(self, patterns: Iterable[tuple[str, str]]) -> None:
        self.names: list[str] = []
        parts = []
        for index, (name, pattern) in enumerate(patterns):
            self.names.append(name)
            parts.append(f"(?P<g{index}>{pattern})")
        self._regex = re.compile("|".join(parts)) if parts else None

    @classmethod
    def from_settings(cls, defaults: bool, extra: Iterable[tuple[str, str]] = ()) -> Redactor:
        patterns = list(DEFAULT_PATTERNS.items()) if defaults else []
        return cls([*patterns, *extra])

    def _replace(self, match: re.Match[str]) -> str:
        group = match.lastgroup or "g0"
        return f"[REDACTED:{self.names[int(group[1:])]}]"

    def text(self, value: str) -> str:
        if self._regex is None:
            return value
        return self._regex.sub(self._replace, value)

    def __call__(self, value: Any) -> Any:
        """Return ``value`` with every string redacted; dicts and lists are rebuilt."""
        if self._regex is None:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {key: self(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self(item) for item in value]
        return value
