"""What the dashboard keeps in the database so that every process on it agrees: its
background tasks (followed from any worker or host) and the key its cookies are signed
with (a session from one process is good on the next)."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from distillery.store.db import Store, as_record
from distillery.store.models import DashboardTask, Secret

TASKS: sa.Table = DashboardTask.__table__  # type: ignore[attr-defined]
SECRETS: sa.Table = Secret.__table__  # type: ignore[attr-defined]


def save_task(store: Store, task: dict[str, Any]) -> None:
    """Write a task as it stands now (its heartbeat is the time of writing)."""
    row = {**task, "heartbeat_at": datetime.now(UTC)}
    dialect = postgresql if store.engine.dialect.name == "postgresql" else sqlite
    insert = dialect.insert(TASKS).values(**row)
    upsert = insert.on_conflict_do_update(
        index_elements=[TASKS.c.id],
        set_={name: insert.excluded[name] for name in row if name != "id"},
    )
    with store.engine.begin() as conn:
        conn.execute(upsert)


def forget_tasks(store: Store, before: datetime) -> int:
    """Drop the tasks last written before ``before`` (what they made stays); how many went."""
    with store.engine.begin() as conn:
        return conn.execute(TASKS.delete().where(TASKS.c.heartbeat_at < before)).rowcount


def load_task(store: Store, task_id: str) -> dict[str, Any] | None:
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(TASKS).where(TASKS.c.id == task_id)).first()
    return as_record(row) if row else None


def secret(store: Store, name: str) -> str:
    """The secret called ``name``, made on first use (the first process to write it wins;
    every other reads the winner's)."""
    dialect = postgresql if store.engine.dialect.name == "postgresql" else sqlite
    made = secrets.token_bytes(32).hex()
    with store.engine.begin() as conn:
        conn.execute(dialect.insert(SECRETS).values(name=name, value=made).on_conflict_do_nothing())
    with store.engine.connect() as conn:
        value = conn.execute(sa.select(SECRETS.c.value).where(SECRETS.c.name == name)).scalar_one()
    return str(value)
