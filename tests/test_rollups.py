"""The hourly aggregates always equal what the stored calls say, whatever happens to them."""

from __future__ import annotations

import random
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from distillery.store import Store, open_store, query, rollups
from distillery.store.db import COMPLETIONS, create_engine, migrate
from distillery.store.records import CaptureRecord

from helpers import capture_record

T0 = 1_764_300_000.0


@pytest.fixture(params=["sqlite", "postgres"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'rollups.db'}"
    found: str = request.getfixturevalue("postgres_url")
    return found


def calls(count: int, seed: int = 0) -> list[CaptureRecord]:
    rng = random.Random(seed)
    made = []
    for n in range(count):
        metadata = {"env": "prod"}
        if rng.random() < 0.8:
            metadata["app"] = rng.choice(["support", "sales", "<b>ops</b>"])
        made.append(
            capture_record(
                f"cap_{seed:04d}{n:024d}",
                created_at=T0 + rng.uniform(0, 3 * 86400),
                tenant=rng.choice(["key-a", "key-b"]),
                status=rng.choice([200, 200, 200, 429, 500]),
                latency_ms=rng.choice([3.0, 24.9, 25.0, 410.0, 1_000.0, 90_000.0]),
                model_requested=rng.choice(["gpt-4o", "gpt-4o-mini"]),
                model_served=rng.choice([None, "gpt-4o-2024-08-06"]),
                prompt_fingerprint=rng.choice([None, "fp1", "fp2"]),
                prompt_tokens=rng.randint(1, 500),
                completion_tokens=rng.choice([None, rng.randint(1, 200)]),
                metadata=metadata,
            )
        )
    return made


Tables = dict[str, dict[tuple[Any, ...], dict[str, Any]]]


def kept(store: Store) -> Tables:
    """What the aggregate tables hold, keyed like ``rollups.group``'s answer."""
    out: Tables = {}
    with store.engine.connect() as conn:
        for table in (rollups.APPS, rollups.TASKS):
            out[table.name] = {}
            for row in conn.execute(sa.select(table)):
                values = dict(row._mapping)
                day = values["day"]
                values["day"] = day if day.tzinfo else day.replace(tzinfo=UTC)
                values["latency_ms_sum"] = round(values["latency_ms_sum"], 6)
                key = tuple(values[name] for name in rollups.KEYS[table.name])
                out[table.name][key] = values
    return out


def recomputed(store: Store) -> Tables:
    """The aggregates from scratch, from the calls as stored now."""
    with store.engine.connect() as conn:
        query_ = sa.select(*(COMPLETIONS.c[name] for name in rollups.COLUMNS))
        everything = [rollups.Call.of(row._mapping) for row in conn.execute(query_)]
    tables = rollups.group(everything)
    for rows in tables.values():
        for row in rows.values():
            row["latency_ms_sum"] = round(row["latency_ms_sum"], 6)
    return tables


def total(tables: Tables, table: str = "rollup_apps") -> int:
    return sum(row["calls"] for row in tables[table].values())


def test_inserts_replays_deletes_and_relabels_keep_the_aggregates_exact(url: str) -> None:
    store = open_store(url)
    batch = calls(300)
    store.insert(batch[:200])
    store.insert(batch[150:])  # a replayed spool: 50 of these are stored already
    store.insert(batch[:10])
    assert store.count() == 300
    assert kept(store) == recomputed(store)
    assert total(kept(store)) == total(kept(store), "rollup_tasks") == 300

    ids = [record["id"] for record in batch]
    assert query.delete(store, [*ids[:40], "cap_missing"]) == 40
    assert kept(store) == recomputed(store)

    query.relabel(store, ids[40:90], set_tags={"app": "moved"})
    query.relabel(store, ids[90:120], remove=["app"])
    query.relabel(store, ids[120:130], set_tags={"team": "x"}, replace_all=True)
    query.relabel(store, ids[130:140], set_tags={"env": "dev"})  # not the app tag: no move
    assert kept(store) == recomputed(store)
    moved = [row for row in kept(store)["rollup_apps"].values() if row["app"] == "moved"]
    assert sum(row["calls"] for row in moved) == 50

    query.delete(store, ids)
    assert kept(store) == {"rollup_apps": {}, "rollup_tasks": {}}
    store.close()


def test_the_migration_fills_the_aggregates_from_the_calls_already_stored(url: str) -> None:
    from alembic import command

    from distillery.store.db import _alembic_config

    engine = create_engine(url)
    with engine.begin() as conn:
        command.upgrade(_alembic_config(conn), "0002")  # before the aggregates existed
    old = Store(engine, migrated=True)
    rows = old._completions.rows(calls(120, seed=1))
    with engine.begin() as conn:
        conn.exec_driver_sql(old._completions.sql, rows)
    migrate(engine)
    store = Store(engine, migrated=True)
    assert kept(store) == recomputed(store)
    assert total(kept(store)) == 120
    store.close()


def test_percentiles_are_the_histograms_upper_edges() -> None:
    histogram = [0] * len(rollups.HISTOGRAM)
    assert rollups.percentile(histogram, 0.5) is None  # no calls: no number
    histogram[0], histogram[5] = 51, 49  # 51 under 25 ms, 49 in [400, 800)
    # The median is the call at rank round(0.5 * 99) = 50 (from 0), as `stats --exact` has it.
    assert rollups.percentile(histogram, 0.5) == 25.0
    histogram[0], histogram[5] = 50, 50
    assert rollups.percentile(histogram, 0.5) == 800.0
    histogram[0], histogram[5] = 51, 49
    assert rollups.percentile(histogram, 0.95) == 800.0
    histogram[-1] = 900  # most beyond the last edge: unknown, not a guess
    assert rollups.percentile(histogram, 0.95) is None
