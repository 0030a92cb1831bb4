"""``completions stats``: counts, tokens, latency percentiles and error rate, grouped.

Two ways to the same counts.  Where the filters are ones the daily aggregates
keep (a time range, tenants, an ``app`` tag; grouped by model, day, prompt
fingerprint or ``tag:app``), they answer: whole days from the aggregates
(``rollups.py``), and the part of a day a range starts or ends within from the
calls themselves, so counts are exact for any range.  Their latency percentiles
are bounds, the histogram edge each lies under (``p50_under_ms``).  Any other
filter, or ``exact=True``, scans the calls: exact percentiles (``p50_ms``), sorted
per group in Python (Postgres has ``percentile_cont``, SQLite nothing; one path
keeps the numbers identical on both), at the cost of reading every matching call.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import Any

import sqlalchemy as sa

from distillery.core.shapes import system_prompt
from distillery.store import overview
from distillery.store.db import COMPLETIONS, TAGS, Store
from distillery.store.query import Filters, QueryError, select_completions
from distillery.store.rollups import APP_TAG, percentile

C = COMPLETIONS.c
COUNT_COLUMNS = (
    "group",
    "calls",
    "errors",
    "error_rate",
    "prompt_tokens",
    "completion_tokens",
)
STAT_COLUMNS = (*COUNT_COLUMNS, "p50_ms", "p95_ms", "p99_ms")


# from the aggregates: the edge of the latency bucket each percentile lies in
AGGREGATE_COLUMNS = (*COUNT_COLUMNS, "p50_under_ms", "p95_under_ms", "p99_under_ms")
# --by as the aggregates' key
AGGREGATED: dict[str, overview.By] = {
    "model": "model",
    "day": "day",
    "fingerprint": "fingerprint",
    f"tag:{APP_TAG}": "app",
}


def aggregated(filters: Filters, by: str) -> bool:
    """Whether the daily aggregates answer ``filters`` grouped ``by``."""
    narrowed = replace(filters, since=None, until=None, tenants=None, tags=())
    if narrowed != Filters() or by not in AGGREGATED:
        return False
    if not filters.tags:
        return True
    (key, _), *more = filters.tags
    # The fingerprints' aggregates have no app: calls of one app per fingerprint need a scan.
    return not more and key == APP_TAG and by != "fingerprint"


def aggregate_stats(store: Store, filters: Filters, by: str) -> list[dict[str, Any]]:
    """The stats from the aggregates, for filters that ``aggregated`` accepts."""
    if not aggregated(filters, by):
        raise ValueError(f"the aggregates cannot answer {filters} by {by}")
    key = AGGREGATED[by]
    found: dict[Any, overview.Group] = {}
    for part in _parts(store, filters, key):
        for group in part:
            found.setdefault(group.name, overview.Group(group.name)).add(group)
    rows = []
    for group in overview.ordered(found, key):
        name = group.name.strftime("%Y-%m-%d") if key == "day" else group.name
        rows.append(
            {
                "group": name or "(none)",
                "calls": group.calls,
                "errors": group.errors,
                "error_rate": round(group.errors / group.calls, 4),
                "prompt_tokens": group.prompt_tokens,
                "completion_tokens": group.completion_tokens,
                "p50_under_ms": group.p50_ms,
                "p95_under_ms": group.p95_ms,
                "p99_under_ms": percentile(group.histogram, 0.99),
            }
        )
    return rows


def _parts(store: Store, filters: Filters, key: overview.By) -> list[list[overview.Group]]:
    """The range cut into whole days (aggregates) and the part of a day at either end (scans)."""
    since, until = filters.since, filters.until
    first = overview.next_midnight(since) if since is not None else None
    last = overview.day_of(until) if until is not None else None
    app = filters.tags[0][1] if filters.tags else None
    parts = []
    if first is not None and last is not None and last < first:
        # within one day
        return [overview.scanned(store, key, filters)]
    if first is None or last is None or first < last:
        parts.append(
            overview.groups(store, key, tenants=filters.tenants, since=first, until=last, app=app)
        )
    if since is not None and first is not None and since < first:
        parts.append(overview.scanned(store, key, replace(filters, until=first)))
    if until is not None and last is not None and last < until:
        parts.append(overview.scanned(store, key, replace(filters, since=last)))
    return parts


def _group_expression(store: Store, by: str) -> tuple[Any, Any]:
    """(expression, extra join) for ``--by``."""
    if by == "model":  # the model that answered, as the aggregates count it
        return sa.func.coalesce(C.model_served, C.model_requested), None
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
    # As the aggregates order them: days in time order, else the most calls first.
    rows.sort(key=lambda r: r["group"] if by == "day" else (-r["calls"], str(r["group"])))
    return [{column: row[column] for column in STAT_COLUMNS} for row in rows]


def top_fingerprints(
    store: Store, filters: Filters, limit: int = 10, exact: bool = False
) -> list[dict[str, Any]]:
    """The most frequent prompt fingerprints, each with its system prompt as an example."""
    if not exact and aggregated(filters, "fingerprint"):
        groups = [
            g for g in aggregate_stats(store, filters, "fingerprint") if g["group"] != "(none)"
        ]
        total = sum(g["calls"] for g in aggregate_stats(store, filters, "day"))
        top = groups[:limit]
        prompts = overview.system_prompts(store, [g["group"] for g in top], filters.tenants)
        return [
            {
                "fingerprint": g["group"],
                "calls": g["calls"],
                "share": f"{g['calls'] / total:.0%}",
                "example": prompts[g["group"]],
            }
            for g in top
        ]
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
