"""Dataset versions in the database: the manifest, the lineage, and the build lock."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any, cast

import sqlalchemy as sa

from distillery.store.db import EXAMPLES, VERSIONS, Store, as_record
from distillery.store.locks import named_lock
from distillery.store.records import DatasetVersionRecord

V = VERSIONS.c


def latest(store: Store, name: str) -> DatasetVersionRecord | None:
    query = sa.select(VERSIONS).where(V.name == name).order_by(V.version.desc()).limit(1)
    with store.engine.connect() as conn:
        row = conn.execute(query).first()
    return _version(row) if row else None


def get(store: Store, name: str, version: int | None = None) -> DatasetVersionRecord | None:
    if version is None:
        return latest(store, name)
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(VERSIONS).where(V.name == name, V.version == version)).first()
    return _version(row) if row else None


def versions(store: Store, name: str) -> list[DatasetVersionRecord]:
    """Every version of one dataset, newest first."""
    query = sa.select(VERSIONS).where(V.name == name).order_by(V.version.desc())
    with store.engine.connect() as conn:
        return [_version(row) for row in conn.execute(query)]


def list_latest(store: Store) -> list[DatasetVersionRecord]:
    """The newest version of every dataset, by name."""
    newest = sa.select(V.name, sa.func.max(V.version).label("version")).group_by(V.name).subquery()
    query = (
        sa.select(VERSIONS)
        .join(newest, sa.and_(V.name == newest.c.name, V.version == newest.c.version))
        .order_by(V.name)
    )
    with store.engine.connect() as conn:
        return [_version(row) for row in conn.execute(query)]


def _version(row: sa.Row[Any]) -> DatasetVersionRecord:
    return cast(DatasetVersionRecord, as_record(row))


def record_version(
    store: Store, values: dict[str, Any], examples: Iterable[tuple[str, str]]
) -> DatasetVersionRecord:
    """Insert a version and its (completion id, split) rows in one transaction; returns it."""
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
    return cast(DatasetVersionRecord, {**values, "id": version_id})


def example_ids(store: Store, version_id: int) -> dict[str, str]:
    """completion id -> split for one version."""
    query = sa.select(EXAMPLES.c.completion_id, EXAMPLES.c.split).where(
        EXAMPLES.c.version_id == version_id
    )
    with store.engine.connect() as conn:
        return dict(conn.execute(query).all())


def build_lock(store: Store, name: str) -> contextlib.AbstractContextManager[None]:
    """One build of a dataset at a time, across processes (and hosts, on Postgres).

    A second build waits for the first and then sees its version, so two cron
    runs that overlap never number a version twice or add an example twice.
    """
    return named_lock(store.engine, f"dataset:{name}")
