"""Dataset versions in the database: the manifest, the lineage, and the build lock."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from distillery.store.db import EXAMPLES, VERSIONS, Store

V = VERSIONS.c


def _row(row: Any) -> dict[str, Any]:
    record = {str(key): value for key, value in row._mapping.items()}
    if isinstance(record.get("created_at"), datetime) and record["created_at"].tzinfo is None:
        record["created_at"] = record["created_at"].replace(tzinfo=UTC)
    return record


def latest(store: Store, name: str) -> dict[str, Any] | None:
    query = sa.select(VERSIONS).where(V.name == name).order_by(V.version.desc()).limit(1)
    with store.engine.connect() as conn:
        row = conn.execute(query).first()
    return _row(row) if row else None


def get(store: Store, name: str, version: int | None = None) -> dict[str, Any] | None:
    if version is None:
        return latest(store, name)
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(VERSIONS).where(V.name == name, V.version == version)).first()
    return _row(row) if row else None


def list_latest(store: Store) -> list[dict[str, Any]]:
    """The newest version of every dataset, by name."""
    newest = sa.select(V.name, sa.func.max(V.version).label("version")).group_by(V.name).subquery()
    query = (
        sa.select(VERSIONS)
        .join(newest, sa.and_(V.name == newest.c.name, V.version == newest.c.version))
        .order_by(V.name)
    )
    with store.engine.connect() as conn:
        return [_row(row) for row in conn.execute(query)]


def record_version(
    store: Store, values: dict[str, Any], examples: Iterable[tuple[str, str]]
) -> int:
    """Insert a version and its (completion id, split) rows in one transaction."""
    with store.engine.begin() as conn:
        inserted = conn.execute(VERSIONS.insert().values(**values)).inserted_primary_key
        assert inserted is not None
        version_id = int(inserted[0])
        batch: list[dict[str, Any]] = []
        for completion_id, split in examples:
            batch.append({"version_id": version_id, "completion_id": completion_id, "split": split})
            if len(batch) >= 5000:
                conn.execute(EXAMPLES.insert(), batch)
                batch = []
        if batch:
            conn.execute(EXAMPLES.insert(), batch)
    return version_id


def example_ids(store: Store, version_id: int) -> dict[str, str]:
    """completion id -> split for one version."""
    query = sa.select(EXAMPLES.c.completion_id, EXAMPLES.c.split).where(
        EXAMPLES.c.version_id == version_id
    )
    with store.engine.connect() as conn:
        return dict(conn.execute(query).all())


@contextlib.contextmanager
def build_lock(store: Store, name: str) -> Iterator[None]:
    """One build of a dataset at a time, across processes (and hosts, on Postgres).

    A second build waits for the first and then sees its version, so two cron
    runs that overlap never number a version twice or add an example twice.
    """
    if store.engine.dialect.name == "postgresql":
        key = int.from_bytes(
            hashlib.sha256(f"distillery.dataset:{name}".encode()).digest()[:8], "big", signed=True
        )
        with store.engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                conn.commit()
        return
    database = store.engine.url.database or ":memory:"
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    lock_path = Path(f"{database}.dataset-{digest}.lock")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
