"""Eval runs and their samples: written once by `distillery eval run` / `distill`, then read."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

import sqlalchemy as sa

from distillery.store.db import (
    EVAL_ITEMS,
    EVAL_RUNS,
    EVAL_SAMPLES,
    Store,
    as_record,
    newest_first,
)
from distillery.store.records import EvalItemRecord, EvalRunRecord, EvalSampleRecord, Summary

BATCH = 1000


def save_run(
    store: Store,
    run_id: str,
    config: dict[str, Any],
    summary: Summary,
    samples: Sequence[EvalSampleRecord],
    items: Sequence[EvalItemRecord] = (),
) -> EvalRunRecord:
    """The run, every sample and every item graded (prompt and reference) in one
    transaction: a run is never half stored."""
    created = datetime.now(UTC)
    with store.engine.begin() as conn:
        conn.execute(
            EVAL_RUNS.insert().values(id=run_id, created_at=created, config=config, summary=summary)
        )
        for table, rows in ((EVAL_SAMPLES, samples), (EVAL_ITEMS, items)):
            owned = [{**row, "run_id": run_id} for row in rows]
            for start in range(0, len(owned), BATCH):
                conn.execute(table.insert(), owned[start : start + BATCH])
    return {"id": run_id, "created_at": created, "config": config, "summary": summary}


def get_run(store: Store, run_id: str) -> EvalRunRecord | None:
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(EVAL_RUNS).where(EVAL_RUNS.c.id == run_id)).first()
    return cast(EvalRunRecord, as_record(row)) if row else None


def list_runs(store: Store, limit: int | None = 20) -> list[EvalRunRecord]:
    """Newest first (ids are time-ordered)."""
    return cast(list[EvalRunRecord], newest_first(store.engine, EVAL_RUNS, limit))


def samples(store: Store, run_id: str) -> list[EvalSampleRecord]:
    query = (
        sa.select(EVAL_SAMPLES)
        .where(EVAL_SAMPLES.c.run_id == run_id)
        .order_by(EVAL_SAMPLES.c.candidate, EVAL_SAMPLES.c.item)
    )
    with store.engine.connect() as conn:
        return [cast(EvalSampleRecord, as_record(row)) for row in conn.execute(query)]


def items(store: Store, run_id: str) -> dict[int, EvalItemRecord]:
    """The run's items by index (none for a run stored before items were kept)."""
    query = sa.select(EVAL_ITEMS).where(EVAL_ITEMS.c.run_id == run_id)
    with store.engine.connect() as conn:
        found = [cast(EvalItemRecord, as_record(row)) for row in conn.execute(query)]
    return {item["item"]: item for item in found}
