"""What the dashboard keeps in the database so that every process on it agrees: its
background tasks (followed from any worker or host) and the key its cookies are signed
with (a session from one process is good on the next)."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from distillery.store.db import Store, as_record, utc
from distillery.store.models import DashboardSession, DashboardTask, Secret

TASKS: sa.Table = DashboardTask.__table__  # type: ignore[attr-defined]
SECRETS: sa.Table = Secret.__table__  # type: ignore[attr-defined]
SESSIONS: sa.Table = DashboardSession.__table__  # type: ignore[attr-defined]
# A session's last use is written at most this often: not a write per page.
SEEN_EVERY_S = 60.0


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


def start_session(store: Store, tenant: str, admin: bool, expires_at: datetime) -> str:
    """Record a new session; its id (unguessable: the cookie is signed too)."""
    session_id = secrets.token_urlsafe(24)
    now = datetime.now(UTC)
    with store.engine.begin() as conn:
        conn.execute(
            SESSIONS.insert().values(
                id=session_id,
                tenant=tenant,
                admin=admin,
                created_at=now,
                seen_at=now,
                expires_at=expires_at,
            )
        )
    return session_id


def session_alive(store: Store, session_id: str, idle_seconds: float) -> bool:
    """Whether the session is still on: not ended, not expired, used within the idle
    time (and, if so, noted as used now)."""
    now = datetime.now(UTC)
    with store.engine.begin() as conn:
        row = conn.execute(
            sa.select(SESSIONS.c.seen_at, SESSIONS.c.expires_at, SESSIONS.c.ended_at).where(
                SESSIONS.c.id == session_id
            )
        ).first()
        if row is None or row.ended_at is not None:
            return False
        seen, expires = utc(row.seen_at), utc(row.expires_at)
        if expires <= now or (now - seen).total_seconds() > idle_seconds:
            return False
        if (now - seen).total_seconds() > SEEN_EVERY_S:
            conn.execute(SESSIONS.update().where(SESSIONS.c.id == session_id).values(seen_at=now))
    return True


def end_sessions(store: Store, session_id: str | None = None, tenant: str | None = None) -> int:
    """End one session, a tenant's, or (neither given) every one; how many were on."""
    update = SESSIONS.update().where(SESSIONS.c.ended_at.is_(None))
    if session_id is not None:
        update = update.where(SESSIONS.c.id == session_id)
    if tenant is not None:
        update = update.where(SESSIONS.c.tenant == tenant)
    with store.engine.begin() as conn:
        return int(conn.execute(update.values(ended_at=datetime.now(UTC))).rowcount)
