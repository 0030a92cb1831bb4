"""Fine-tune jobs: one row per job, so every fine-tuned model traces to its dataset version."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

import sqlalchemy as sa

from distillery.store.db import FINETUNES, Store, as_record, newest_first
from distillery.store.records import FineTuneJobRecord


def insert(store: Store, values: dict[str, Any]) -> FineTuneJobRecord:
    """Record a job that was just started; returns it as stored."""
    now = datetime.now(UTC)
    row = {"created_at": now, "updated_at": now, "metrics": {}, "error": None, **values}
    with store.engine.begin() as conn:
        conn.execute(FINETUNES.insert().values(**row))
    return cast(FineTuneJobRecord, row)


def update(store: Store, job_id: str, **values: Any) -> None:
    with store.engine.begin() as conn:
        conn.execute(
            FINETUNES.update()
            .where(FINETUNES.c.id == job_id)
            .values(updated_at=datetime.now(UTC), **values)
        )


def get(store: Store, job_id: str) -> FineTuneJobRecord | None:
    """A job by our id or by its provider's."""
    with store.engine.connect() as conn:
        row = conn.execute(
            sa.select(FINETUNES).where(
                sa.or_(FINETUNES.c.id == job_id, FINETUNES.c.provider_job_id == job_id)
            )
        ).first()
    return cast(FineTuneJobRecord, as_record(row)) if row else None


def list_jobs(store: Store, limit: int | None = 20) -> list[FineTuneJobRecord]:
    """Newest first (ids are time-ordered)."""
    return cast(list[FineTuneJobRecord], newest_first(store.engine, FINETUNES, limit))
