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


def test_timestamps_from_many_threads_are_each_their_own_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Threads log at once (the capture retry thread, the writer thread): every stamp is
    the time its own thread read, never another second's date paired with its fraction."""
    import threading

    stamper = logs._Timestamp()
    clock = threading.local()
    monkeypatch.setattr(time, "time", lambda: clock.now)
    wrong: list[tuple[float, str]] = []

    def log(offset: int) -> None:
        for i in range(2000):
            clock.now = 1_764_780_000 + (i + offset) % 7 + 0.25
            stamp = stamper(None, "info", {})["timestamp"]
            if abs(datetime.fromisoformat(stamp).timestamp() - clock.now) > 1e-6:
                wrong.append((clock.now, stamp))

    import sys

    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch between any two statements
    try:
        threads = [threading.Thread(target=log, args=(n,)) for n in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        sys.setswitchinterval(before)
    assert wrong == []
