"""The log lines' shape: what ``core/logs.py`` adds to every line."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

import pytest
import structlog

from distillery.core import logs

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")


def test_timestamp_is_structlogs_iso_utc() -> None:
    ours, theirs = logs._Timestamp(), structlog.processors.TimeStamper(fmt="iso", utc=True)
    before = datetime.now(UTC)
    stamp = ours(None, "info", {})["timestamp"]
    reference = theirs(None, "info", {})["timestamp"]
    after = datetime.now(UTC)
    assert ISO_UTC.fullmatch(stamp), stamp
    assert before <= datetime.fromisoformat(stamp) <= after
    assert stamp[:11] == reference[:11] and reference.endswith("Z")
    assert datetime.fromisoformat(reference) - datetime.fromisoformat(stamp) < timedelta(seconds=1)


def test_timestamp_moves_on_with_the_second(monkeypatch: pytest.MonkeyPatch) -> None:
    """The formatted second is remembered: a new second is formatted again."""
    stamper = logs._Timestamp()
    for now, expected in [
        (1_764_780_455.999_999, "2025-12-03T16:47:35.999999Z"),
        (1_764_780_455.999_999_9, "2025-12-03T16:47:36.000000Z"),
        (1_764_780_456.000_250, "2025-12-03T16:47:36.000250Z"),
        (1_764_780_456.5, "2025-12-03T16:47:36.500000Z"),
        (1_764_780_517.25, "2025-12-03T16:48:37.250000Z"),
    ]:
        monkeypatch.setattr(time, "time", lambda now=now: now)
        stamp = stamper(None, "info", {})["timestamp"]
        assert stamp == expected
        assert datetime.fromisoformat(stamp).timestamp() == pytest.approx(now, abs=1e-6)
