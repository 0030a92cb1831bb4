"""The overview's series: every bucket drawn, exact where counted from the calls, and the
same numbers as the CLI's exact scan (``completions stats --exact``: another code path)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from distillery.store import Store, open_store, overview, query
from distillery.store.stats import group_stats

from helpers import capture_record

NOW = datetime(2026, 11, 20, 15, 30, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Each test on SQLite and on Postgres: the hour and the app tag are read per dialect."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'o.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
def filled(url: str) -> Iterator[Callable[[list[tuple[datetime, float, int]]], Store]]:
    """A store holding calls (when, latency, status); closed when the test ends."""
    opened: list[Store] = []

    def fill(calls: list[tuple[datetime, float, int]]) -> Store:
        store = open_store(url)
        opened.append(store)
        store.insert(
            [
                capture_record(
                    f"cap_{n:028d}",
                    created_at=when.timestamp(),
                    latency_ms=latency,
                    status=status,
                    model_requested="gpt-4o-mini",
                    prompt_tokens=100,
                    completion_tokens=10,
                    metadata={"app": "support" if n % 2 else "sales"},
                )
                for n, (when, latency, status) in enumerate(calls)
            ]
        )
        return store

    yield fill
    for store in opened:
        store.close()


def test_hours_without_calls_are_drawn_and_percentiles_match_the_exact_scan(
    filled: Callable[..., Store],
) -> None:
    rng = random.Random(7)
    # Calls in three of the last 24 hours only; one of them failed.
    hours = (NOW - timedelta(hours=20), NOW - timedelta(hours=5), NOW - timedelta(minutes=10))
    calls = [
        (moment + timedelta(seconds=i), rng.uniform(5, 5000), 500 if i == 3 else 200)
        for moment in hours
        for i in range(40)
    ]
    store = filled(calls)
    start = NOW - timedelta(hours=24)
    found = overview.window(store, tenants=None, start=start, end=NOW)
    series = found["hour"]
    # 24 hours from 15:30 yesterday: the 15:00 hour through today's 15:00 hour.
    assert len(series) == 25
    assert series[0].name == datetime(2026, 11, 19, 15, tzinfo=UTC)
    assert [g.calls for g in series].count(0) == 22
    assert sum(g.calls for g in series) == 120 and sum(g.errors for g in series) == 3
    total = found["total"][0]
    assert total.exact and total.calls == 120
    filters = query.parse_filters(since=start.isoformat(), until=NOW.isoformat())
    [scan] = group_stats(store, filters, "model")
    assert (total.p50_ms, total.p95_ms) == (scan["p50_ms"], scan["p95_ms"])
    by_app = {g.name: g.calls for g in found["app"]}
    assert by_app == {"support": 60, "sales": 60}
    # Within one hour too: the bucket's own calls.
    busy = next(g for g in series if g.calls)
    hour = query.parse_filters(
        since=busy.name.isoformat(), until=(busy.name + timedelta(hours=1)).isoformat()
    )
    [one] = group_stats(store, hour, "model")
    assert (busy.p50_ms, busy.p95_ms) == (one["p50_ms"], one["p95_ms"])
    # Ranked by the database (the longer ranges' totals): the same numbers again.
    ranked = overview.quantiles(store, tenants=None, start=start, end=NOW)
    assert ranked == {0.5: scan["p50_ms"], 0.95: scan["p95_ms"]}
    for n in (1, 2, 3, 4, 7, 40):  # small counts, where the rank rounds
        some = overview.quantiles(
            store, tenants=None, start=hours[0], end=hours[0] + timedelta(seconds=n)
        )
        [few] = group_stats(
            store,
            query.parse_filters(
                since=hours[0].isoformat(), until=(hours[0] + timedelta(seconds=n)).isoformat()
            ),
            "model",
        )
        assert some == {0.5: few["p50_ms"], 0.95: few["p95_ms"]}, n


def test_days_without_calls_are_drawn_from_the_aggregates(filled: Callable[..., Store]) -> None:
    days = (NOW - timedelta(days=20), NOW - timedelta(days=2))
    store = filled([(d + timedelta(minutes=i), 300.0, 200) for d in days for i in range(5)])
    start = overview.day_of(NOW - timedelta(days=30))
    groups = overview.groups(store, "day", tenants=None, since=start)
    series = overview.filled(groups, start, NOW, overview.DAY)
    assert len(series) == 31 and [g.calls for g in series].count(5) == 2
    assert sum(g.calls for g in series) == 10
    assert series[0].calls == 0 and series[0].p50_ms is None  # empty: no latency at all
    busy = next(g for g in series if g.calls)
    assert not busy.exact and busy.p50_ms == 400.0  # the histogram's edge above 300 ms
    assert overview.quantiles(store, tenants=None, start=start, end=NOW) == {
        0.5: 300.0,
        0.95: 300.0,
    }
    assert overview.quantiles(store, tenants=None, start=start, end=NOW, limit=9) is None
