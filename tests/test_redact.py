"""Redaction rewrites secrets and personal data in stored strings only."""

from __future__ import annotations

from typing import Any

import pytest

from distillery.core.redact import Redactor

DEFAULT = Redactor.from_settings(True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("write to bob.smith+x@mail.example.co.uk today", "write to [REDACTED:email] today"),
        ("call +1 (415) 555-2671 now", "call [REDACTED:phone] now"),
        ("or 030 1234 5678", "or [REDACTED:phone]"),
        ("two: a@b.io, c@d.org.", "two: [REDACTED:email], [REDACTED:email]."),
        ("token=sk-abcdefghijklmnopqrstuvwxyz", "token=[REDACTED:api_key]"),
        ("e164 +14155552671.", "e164 [REDACTED:phone]."),
        ("key sk-proj-AbCdEfGhIjKlMnOpQrStUv123456", "key [REDACTED:api_key]"),
        (
            "Authorization: Bearer abcdefghijklmnopqrstuvwx",
            "Authorization: Bearer [REDACTED:api_key]",
        ),
        ("aws AKIAABCDEFGHIJKLMNOP", "aws [REDACTED:api_key]"),
        ("gh ghp_abcdefghijklmnopqrstuvwxyz0123456789", "gh [REDACTED:api_key]"),
    ],
)
def test_default_patterns(text: Any, expected: Any) -> None:
    assert DEFAULT.text(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "order 12345 shipped",
        "on 2026-11-28 at 10:30",
        "version 1.2.3",
        "chatcmpl-abc123",
        "took 1234567890 ns",
    ],
)
def test_ordinary_text_is_left_alone(text: Any) -> None:
    assert DEFAULT.text(text) == text


def test_identifier_fields_are_not_scanned_but_text_is() -> None:
    value = {"id": "call me 415-555-2671", "content": "call me 415-555-2671"}
    assert DEFAULT(value) == {"id": "call me 415-555-2671", "content": "call me [REDACTED:phone]"}


def test_structures_keep_keys_numbers_and_shape() -> None:
    value: dict[str, Any] = {
        "messages": [{"role": "user", "content": "me@x.io"}],
        "n": 5555555555,
        "ok": True,
    }
    assert DEFAULT(value) == {
        "messages": [{"role": "user", "content": "[REDACTED:email]"}],
        "n": 5555555555,
        "ok": True,
    }
    assert value["messages"][0]["content"] == "me@x.io"  # the original is not mutated


def test_extra_patterns_and_defaults_off() -> None:
    custom = Redactor.from_settings(False, [("ssn", r"\b\d{3}-\d{2}-\d{4}\b")])
    assert custom.text("ssn 123-45-6789, mail a@b.co") == "ssn [REDACTED:ssn], mail a@b.co"
    assert Redactor([]).text("a@b.co") == "a@b.co"
