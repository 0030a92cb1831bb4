"""The generation cache: model answers by a key the caller derives (see evals/generate.py)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from distillery.store.db import CACHE, Store


def get(store: Store, key: str) -> dict[str, Any] | None:
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(CACHE.c.response).where(CACHE.c.key == key)).first()
    return row[0] if row else None


def put(store: Store, key: str, model: str, response: dict[str, Any], latency_ms: float) -> None:
    """Keep an answer; two identical requests in flight both miss, and the second put is a no-op."""
    values = {
        "key": key,
        "model": model,
        "response": response,
        "latency_ms": latency_ms,
        "created_at": datetime.now(UTC),
    }
    dialect = postgresql if store.engine.dialect.name == "postgresql" else sqlite
    with store.engine.begin() as conn:
        conn.execute(dialect.insert(CACHE).values(**values).on_conflict_do_nothing())
