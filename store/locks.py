"""Named locks across processes: for builds and migrations that must not run twice at once.

Postgres: a session advisory lock (across hosts).  SQLite: an ``flock`` on a
file beside the database (SQLite is one host anyway).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine


@contextlib.contextmanager
def named_lock(engine: Engine, name: str) -> Iterator[None]:
    """Hold the lock called ``name`` for the block; blocks until it is free."""
    if engine.dialect.name == "postgresql":
        digest = hashlib.sha256(f"distillery:{name}".encode()).digest()[:8]
        key = int.from_bytes(digest, "big", signed=True)
        with engine.connect() as conn:
            conn.execute(sa.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            conn.commit()
            try:
                yield
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(:key)"), {"key": key})
                conn.commit()
        return
    database = engine.url.database or "memory"
    suffix = hashlib.sha256(name.encode()).hexdigest()[:16]
    fd = os.open(Path(f"{database}.lock-{suffix}"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
