"""Daily aggregates of captured calls, kept as calls are written: the overview's source.

A page that sums a million calls on every view cannot answer in 300 ms, so the
store keeps the calls, errors, tokens and a latency histogram in two tables, one
row per (day, tenant, model, app tag) and one per (day, tenant, model, prompt
fingerprint), and changes them in the same transaction as the calls themselves: an
insert adds (a replayed record that is already stored adds nothing), a delete
subtracts, a relabel that changes the ``app`` tag moves the call between rows.

Why days and two tables: the rows must be far fewer than the calls whatever the
traffic looks like.  With hours, or with the app and the fingerprint in one key,
traffic spread over many apps, templates and models makes nearly one row per call
(a million calls over 90 days, 20 apps, 50 templates, 5 models, 5 keys did).
Percentiles from the histogram are upper bounds at its edges, shown as such.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from distillery.store.models import AppRollup, TaskRollup

APPS: sa.Table = AppRollup.__table__  # type: ignore[attr-defined]
TASKS: sa.Table = TaskRollup.__table__  # type: ignore[attr-defined]
APP_TAG = "app"  # the tag the overview breaks costs down by
# Latency histogram edges, ms: bucket i holds latencies below EDGES[i]; the last, the rest.
EDGES = (25, 50, 100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 51200)
HISTOGRAM = tuple(f"lat_{i:02d}" for i in range(len(EDGES) + 1))
KEYS = {
    "rollup_apps": ("day", "tenant", "model", "app"),
    "rollup_tasks": ("day", "tenant", "model", "fingerprint"),
}
COUNTS = ("calls", "errors", "prompt_tokens", "completion_tokens", "latency_ms_sum", *HISTOGRAM)
# What a stored completion row needs to be counted (for deletes and relabels).
COLUMNS = (
    "created_at",
    "tenant",
    "model_served",
    "model_requested",
    "metadata",
    "prompt_fingerprint",
    "status",
    "error",
    "prompt_tokens",
    "completion_tokens",
    "latency_ms",
)


@dataclass(frozen=True)
class Call:
    """What the aggregates need to know about one call."""

    day: datetime
    tenant: str
    model: str
    app: str
    fingerprint: str
    error: bool
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float

    @classmethod
    def of(cls, record: Mapping[Any, Any]) -> Call:
        """From a capture record (``created_at`` in epoch seconds) or a stored row."""
        created = record["created_at"]
        if not isinstance(created, datetime):
            created = datetime.fromtimestamp(float(created), UTC)
        elif created.tzinfo is None:
            created = created.replace(tzinfo=UTC)
        metadata = record.get("metadata") or {}
        return cls(
            day=created.replace(hour=0, minute=0, second=0, microsecond=0),
            tenant=str(record["tenant"]),
            model=str(record.get("model_served") or record.get("model_requested") or ""),
            app=str(metadata.get(APP_TAG, "")) if isinstance(metadata, Mapping) else "",
            fingerprint=str(record.get("prompt_fingerprint") or ""),
            error=int(record["status"]) >= 400 or record.get("error") is not None,
            prompt_tokens=int(record.get("prompt_tokens") or 0),
            completion_tokens=int(record.get("completion_tokens") or 0),
            latency_ms=float(record.get("latency_ms") or 0.0),
        )

    def moved_to(self, app: str) -> Call:
        return Call(
            self.day,
            self.tenant,
            self.model,
            app,
            self.fingerprint,
            self.error,
            self.prompt_tokens,
            self.completion_tokens,
            self.latency_ms,
        )


Rows = dict[str, dict[tuple[Any, ...], dict[str, Any]]]


def group(calls: Iterable[Call], sign: int = 1) -> Rows:
    """Calls summed per table and key, each count times ``sign`` (-1: taking them away)."""
    rows: Rows = {table: {} for table in KEYS}
    for call in calls:
        for table, names in KEYS.items():
            key = tuple(getattr(call, name) for name in names)
            row = rows[table].get(key)
            if row is None:
                row = {**dict(zip(names, key, strict=True)), **dict.fromkeys(COUNTS, 0)}
                row["latency_ms_sum"] = 0.0
                rows[table][key] = row
            row["calls"] += sign
            row["errors"] += sign * call.error
            row["prompt_tokens"] += sign * call.prompt_tokens
            row["completion_tokens"] += sign * call.completion_tokens
            row["latency_ms_sum"] += sign * call.latency_ms
            row[HISTOGRAM[bucket(call.latency_ms)]] += sign
    return rows


def bucket(latency_ms: float) -> int:
    """The histogram bucket a latency falls in."""
    return bisect.bisect_right(EDGES, latency_ms)


def apply(conn: Connection, rows: Rows) -> None:
    """Add ``rows`` to the aggregates (negative counts subtract); emptied rows go."""
    for table in (APPS, TASKS):
        changes = rows.get(table.name) or {}
        if not changes:
            continue
        conn.execute(_upsert(conn.dialect.name, table), list(changes.values()))
        if any(row["calls"] < 0 for row in changes.values()):
            conn.execute(table.delete().where(table.c.calls <= 0))


@functools.cache
def _upsert(dialect_name: str, table: sa.Table) -> Any:
    """The statement that adds counts to ``table``'s rows: built once (building it cost the
    writer more than the inserts it follows)."""
    dialect = postgresql if dialect_name == "postgresql" else sqlite
    insert = dialect.insert(table)
    return insert.on_conflict_do_update(
        index_elements=list(KEYS[table.name]),
        set_={name: table.c[name] + insert.excluded[name] for name in COUNTS},
    )


def stored_calls(conn: Connection, completions: sa.Table, ids: Sequence[str]) -> list[Call]:
    """The calls among ``ids`` that are stored (read before they change or go)."""
    if not ids:
        return []
    query = sa.select(*(completions.c[name] for name in COLUMNS)).where(
        completions.c.id.in_(list(ids))
    )
    return [Call.of(row._mapping) for row in conn.execute(query)]


def percentile(histogram: Sequence[int], q: float) -> float | None:
    """The edge the ``q`` quantile lies below (``None``: no calls, or past the last edge).

    The quantile is the call at rank ``round(q * (calls - 1))``, as ``completions stats
    --exact`` takes it, so the exact value always lies in the bucket this bounds."""
    total = sum(histogram)
    if not total:
        return None
    rank, seen = round(q * (total - 1)), 0
    for index, count in enumerate(histogram):
        seen += count
        if seen > rank:
            return float(EDGES[index]) if index < len(EDGES) else None
    return None
