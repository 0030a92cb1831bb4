"""Aggregates over captured calls: counts, tokens, latency percentiles, error rate.

Counts and sums are computed by the database.  Percentiles come from the
latencies themselves, sorted per group in Python: Postgres could do it with
``percentile_cont`` but SQLite cannot, and one code path keeps the numbers
identical on both (a million latencies sort in well under a second).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import sqlalchemy as sa

from distillery.shapes import system_prompt
from distillery.store.db import COMPLETIONS, TAGS, Store
from distillery.store.query import Filters, QueryError, select_completions

C = COMPLETIONS.c
STAT_COLUMNS = (
    "group",
    "calls",
    "errors",
    "error_rate",
    "prompt_tokens",
    "completion_tokens",
    "p50_ms",
    "p95_ms",
    "p99_ms",
)


def _group_expression(store: Store, by: str) -> tuple[Any, Any]:
    """(expression, extra join) for ``--by``."""
    if by == "model":
        return C.model_requested, None
    if by == "fingerprint":
        return C.prompt_fingerprint, None
    if by == "day":
        if store.engine.dialect.name == "postgresql":
            return sa.func.to_char(sa.func.timezone("UTC", C.created_at), "YYYY-MM-DD"), None
        return sa.func.substr(C.created_at, 1, 10), None
    if by.startswith("tag:") and len(by) > 4:
        tag = TAGS.alias("group_tag")
        return tag.c.value, (tag, sa.and_(tag.c.completion_id == C.id, tag.c.key == by[4:]))
    raise QueryError(f"Cannot group by {by!r}: use model, day, fingerprint or tag:KEY.")


def _percentile(ordered: list[float], p: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))], 1)


def group_stats(store: Store, filters: Filters, by: str) -> list[dict[str, Any]]:
    group, join = _group_expression(store, by)
    is_error = sa.case((sa.or_(C.status >= 400, C.error.is_not(None)), 1), else_=0)
    base = select_completions(
        store,
        filters,
        columns=[
            group.label("group"),
            C.latency_ms,
            is_error.label("error"),
            C.prompt_tokens,
            C.completion_tokens,
        ],
    ).order_by(None)
    if join is not None:
        base = base.outerjoin(*join)
    inner = base.subquery()
    totals = (
        sa.select(
            inner.c.group,
            sa.func.count().label("calls"),
            sa.func.sum(inner.c.error).label("errors"),
            sa.func.sum(inner.c.prompt_tokens).label("prompt_tokens"),
            sa.func.sum(inner.c.completion_tokens).label("completion_tokens"),
        )
        .group_by(inner.c.group)
        .order_by(sa.func.count().desc())
    )
    latencies: dict[Any, list[float]] = defaultdict(list)
    with store.engine.connect() as conn:
        rows = [dict(row._mapping) for row in conn.execute(totals)]
        for key, latency in conn.execute(sa.select(inner.c.group, inner.c.latency_ms)):
            latencies[key].append(latency)
    for row in rows:
        ordered = sorted(latencies.get(row["group"], ()))
        row["errors"] = int(row["errors"] or 0)
        row["error_rate"] = round(row["errors"] / row["calls"], 4) if row["calls"] else 0.0
        row["prompt_tokens"] = int(row["prompt_tokens"] or 0)
        row["completion_tokens"] = int(row["completion_tokens"] or 0)
        row["p50_ms"] = _percentile(ordered, 0.50)
        row["p95_ms"] = _percentile(ordered, 0.95)
        row["p99_ms"] = _percentile(ordered, 0.99)
        if row["group"] is None:
            row["group"] = "(none)"
    return [{column: row[column] for column in STAT_COLUMNS} for row in rows]


def top_fingerprints(store: Store, filters: Filters, limit: int = 10) -> list[dict[str, Any]]:
    """The most frequent prompt fingerprints, each with its system prompt as an example."""
    inner = (
        select_completions(store, filters, columns=[C.id, C.prompt_fingerprint])
        .order_by(None)
        .subquery()
    )
    query = (
        sa.select(
            inner.c.prompt_fingerprint,
            sa.func.count().label("calls"),
            sa.func.max(inner.c.id).label("latest"),
        )
        .where(inner.c.prompt_fingerprint.is_not(None))
        .group_by(inner.c.prompt_fingerprint)
        .order_by(sa.func.count().desc())
        .limit(limit)
    )
    with store.engine.connect() as conn:
        total = conn.execute(sa.select(sa.func.count()).select_from(inner)).scalar_one()
        rows = conn.execute(query).all()
        examples = dict(
            conn.execute(
                sa.select(C.id, C.request).where(C.id.in_([row.latest for row in rows]))
            ).all()
        )
    result = []
    for fingerprint, calls, latest in rows:
        result.append(
            {
                "fingerprint": fingerprint,
                "calls": calls,
                "share": f"{calls / total:.0%}" if total else "",
                "example": system_prompt(examples.get(latest)),
            }
        )
    return result
