"""Routes' state and evidence: each route's mode as last changed, and the graded pairs
(teacher's call, student's answer) that promotion and demotion are decided on."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite

from distillery.store.db import Store, as_record
from distillery.store.models import CompletionTag, RouteCounter, RouteSample, RouteState

STATES: sa.Table = RouteState.__table__  # type: ignore[attr-defined]
SAMPLES: sa.Table = RouteSample.__table__  # type: ignore[attr-defined]
COUNTERS: sa.Table = RouteCounter.__table__  # type: ignore[attr-defined]
TAGS: sa.Table = CompletionTag.__table__  # type: ignore[attr-defined]


def _insert(store: Store) -> Any:
    return (postgresql if store.engine.dialect.name == "postgresql" else sqlite).insert


def set_mode(store: Store, name: str, mode: str, reason: str, student: str | None) -> None:
    """Write the route's mode, why, and the student it was decided for."""
    row = {
        "name": name,
        "mode": mode,
        "reason": reason,
        "changed_at": datetime.now(UTC),
        "student": student,
    }
    insert = _insert(store)(STATES).values(**row)
    upsert = insert.on_conflict_do_update(
        index_elements=[STATES.c.name], set_={k: insert.excluded[k] for k in row if k != "name"}
    )
    with store.engine.begin() as conn:
        conn.execute(upsert)


def states(store: Store) -> dict[str, dict[str, Any]]:
    """Every route whose mode was changed: name -> {mode, reason, changed_at, student}."""
    with store.engine.connect() as conn:
        return {row["name"]: row for row in map(as_record, conn.execute(sa.select(STATES)))}


def add_sample(store: Store, sample: dict[str, Any]) -> None:
    """Store a graded pair (once: the same teacher call again is ignored)."""
    with store.engine.begin() as conn:
        conn.execute(_insert(store)(SAMPLES).values(**sample).on_conflict_do_nothing())


def recent(store: Store, route: str, limit: int) -> list[dict[str, Any]]:
    """The route's newest ``limit`` samples, newest first (ids are time-ordered)."""
    query = (
        sa.select(SAMPLES)
        .where(SAMPLES.c.route == route)
        .order_by(SAMPLES.c.id.desc())
        .limit(limit)
    )
    with store.engine.connect() as conn:
        return [as_record(row) for row in conn.execute(query)]


def evidence(
    store: Store,
    route: str,
    student: str,
    since: datetime | None,
    limit: int,
    slice_tag: str | None = None,
    scores_only: bool = False,
) -> list[dict[str, Any]]:
    """``student``'s pairs on the route since ``since`` (all when None), oldest first; at
    most the newest ``limit``.  With ``slice_tag``, each pair's ``slice`` is the value of
    that tag on the teacher's captured call (None when it has none, or is not stored).
    ``scores_only``: id, status, score and teacher_score (what a decision reads: a
    tenth of the time of whole rows)."""
    columns = (
        [SAMPLES.c.id, SAMPLES.c.status, SAMPLES.c.score, SAMPLES.c.teacher_score]
        if scores_only
        else [SAMPLES]
    )
    if slice_tag is None:
        query = sa.select(*columns)
    else:
        tag = TAGS.alias("slice_tag")
        joined = SAMPLES.outerjoin(
            tag, sa.and_(tag.c.completion_id == SAMPLES.c.id, tag.c.key == slice_tag)
        )
        query = sa.select(*columns, tag.c.value.label("slice")).select_from(joined)
    query = query.where(SAMPLES.c.route == route, SAMPLES.c.student == student)
    if since is not None:
        query = query.where(SAMPLES.c.created_at >= since)
    query = query.order_by(SAMPLES.c.id.desc()).limit(limit)
    with store.engine.connect() as conn:
        return [as_record(row) for row in conn.execute(query)][::-1]


def stored(store: Store, ids: list[str]) -> dict[str, str]:
    """Which of these pairs are stored: record id -> status (ok or error)."""
    found: dict[str, str] = {}
    for start in range(0, len(ids), 500):
        query = sa.select(SAMPLES.c.id, SAMPLES.c.status).where(
            SAMPLES.c.id.in_(ids[start : start + 500])
        )
        with store.engine.connect() as conn:
            found.update({row.id: row.status for row in conn.execute(query)})
    return found


def newest_student(store: Store, route: str) -> str | None:
    """The student that answered the route's newest pair."""
    query = (
        sa.select(SAMPLES.c.student)
        .where(SAMPLES.c.route == route, SAMPLES.c.student.is_not(None))
        .order_by(SAMPLES.c.id.desc())
        .limit(1)
    )
    with store.engine.connect() as conn:
        return conn.execute(query).scalar()


def add_counts(store: Store, deltas: dict[tuple[str, str], int]) -> None:
    """Add what one process counted since it last wrote (route, kind) -> n."""
    rows = [{"route": r, "kind": k, "count": n} for (r, k), n in deltas.items() if n]
    if not rows:
        return
    insert = _insert(store)(COUNTERS)
    upsert = insert.on_conflict_do_update(
        index_elements=[COUNTERS.c.route, COUNTERS.c.kind],
        set_={"count": COUNTERS.c.count + insert.excluded.count},
    )
    with store.engine.begin() as conn:
        conn.execute(upsert, rows)


def counts(store: Store) -> dict[tuple[str, str], int]:
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(COUNTERS.c.route, COUNTERS.c.kind, COUNTERS.c["count"]))
        return {(route, kind): int(count) for route, kind, count in rows}
