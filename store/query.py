"""Finding, labelling and pruning captured calls: the queries the CLI and the API share.

Listing order is the record id, which is minted from the clock (``cap_`` +
nanoseconds), so id order is time order and the primary key is the sort
index.  A tag filter starts from ``completion_tags(key, value, completion_id)``
and walks that index in id order, so "the newest 20 with ``app=x``" reads 20
index entries whether the tag is on ten rows or on a million.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, cast

import sqlalchemy as sa

from distillery.core.errors import DistilleryError
from distillery.core.shapes import check_metadata, message_text
from distillery.store import rollups, search
from distillery.store.db import COMPLETIONS, TAGS, Store, as_record
from distillery.store.records import StoredCompletion

C = COMPLETIONS.c
Order = Literal["asc", "desc"]

_RELATIVE = re.compile(r"^\s*(\d+)\s*([smhdwy])\s*$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


class QueryError(DistilleryError):
    """A filter or label the user gave cannot be applied; the message says why."""


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """``7d``/``12h``/``30m``/``2w``/``1y`` before now, or an ISO date/time (UTC unless it says)."""
    match = _RELATIVE.match(text)
    if match:
        amount, unit = match.groups()
        return (now or datetime.now(UTC)) - timedelta(seconds=int(amount) * _UNITS[unit])
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise QueryError(
            f"Cannot read {text!r} as a time: use an ISO date like 2026-11-01, "
            "a date and time like 2026-11-01T09:30, or a span like 7d, 12h, 30m, 2w."
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def parse_tag(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise QueryError(f"Tag {text!r} must look like key=value.")
    return key, value


def parse_filters(
    tags: Sequence[str] = (),
    model: str | None = None,
    since: str | None = None,
    until: str | None = None,
    status: str | None = None,
    finish_reason: str | None = None,
    stream: bool | None = None,
    text: str | None = None,
    tenants: Sequence[str] | None = None,
    ids: Sequence[str] = (),
) -> Filters:
    """Filters from what a person types (the CLI's options, the dashboard's form)."""
    if status not in (None, "ok", "error"):
        raise QueryError(f"Status {status!r} must be ok or error.")
    return Filters(
        tags=tuple(parse_tag(tag) for tag in tags),
        model=model or None,
        since=parse_when(since) if since else None,
        until=parse_when(until) if until else None,
        status=status,  # type: ignore[arg-type]
        finish_reason=finish_reason or None,
        stream=stream,
        text=text or None,
        tenants=tuple(tenants) if tenants is not None else None,
        ids=tuple(ids),
    )


@dataclass(frozen=True)
class Filters:
    """Which captured calls a command or API request is about; empty means all."""

    tags: tuple[tuple[str, str], ...] = ()
    model: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    status: Literal["ok", "error"] | None = None
    finish_reason: str | None = None
    stream: bool | None = None
    text: str | None = None
    tenants: tuple[str, ...] | None = None  # None: every tenant
    ids: tuple[str, ...] = ()  # record ids or upstream completion ids
    completions_only: bool = False  # successful chat completions (what the API lists)
    exclude_tags: tuple[tuple[str, str], ...] = ()
    after_id: str | None = None  # only records captured after this record id
    upto_id: str | None = None  # ... and up to this one

    def conditions(self, engine: Any) -> list[Any]:
        where: list[Any] = []
        if self.model:
            where.append(sa.or_(C.model_requested == self.model, C.model_served == self.model))
        if self.since:
            where.append(C.created_at >= self.since)
        if self.until:
            where.append(C.created_at < self.until)
        if self.status == "ok" or self.completions_only:
            where.append(sa.and_(C.status < 400, C.error.is_(None)))
        elif self.status == "error":
            where.append(sa.or_(C.status >= 400, C.error.is_not(None)))
        if self.completions_only:
            where.append(C.response.is_not(None))
        if self.finish_reason:
            where.append(C.finish_reason == self.finish_reason)
        if self.stream is not None:
            where.append(C.stream.is_(self.stream))
        if self.text is not None:
            if not search.words(self.text):
                raise QueryError("The search text has no words in it.")
            matches = search.matching_ids(engine, self.text).subquery()
            where.append(C.id.in_(sa.select(matches.c.completion_id)))
        if self.tenants is not None:
            where.append(C.tenant.in_(self.tenants))
        if self.ids:
            where.append(sa.or_(C.id.in_(self.ids), C.completion_id.in_(self.ids)))
        if self.after_id is not None:
            where.append(C.id > self.after_id)
        if self.upto_id is not None:
            where.append(C.id <= self.upto_id)
        for key, value in self.exclude_tags:
            where.append(
                ~sa.exists().where(
                    TAGS.c.completion_id == C.id, TAGS.c.key == key, TAGS.c.value == value
                )
            )
        for key, value in self.tags[1:]:
            where.append(
                sa.exists().where(
                    TAGS.c.completion_id == C.id, TAGS.c.key == key, TAGS.c.value == value
                )
            )
        return where


def select_completions(
    store: Store,
    filters: Filters,
    *,
    columns: Sequence[Any] | None = None,
    order: Order = "desc",
    after: str | None = None,
    limit: int | None = None,
) -> sa.Select[Any]:
    """The SELECT behind every listing; ``after`` is a record id (exclusive cursor)."""
    query = sa.select(*(columns if columns is not None else COMPLETIONS.c))
    if filters.tags:
        key, value = filters.tags[0]
        first = TAGS.alias("first_tag")
        query = query.select_from(first.join(COMPLETIONS, C.id == first.c.completion_id)).where(
            first.c.key == key, first.c.value == value
        )
        sort_key = first.c.completion_id
    else:
        sort_key = C.id
    query = query.where(*filters.conditions(store.engine))
    if after is not None:
        query = query.where(sort_key > after if order == "asc" else sort_key < after)
    query = query.order_by(sort_key.asc() if order == "asc" else sort_key.desc())
    if limit:
        query = query.limit(limit)
    return query


def find(
    store: Store,
    filters: Filters,
    *,
    order: Order = "desc",
    after: str | None = None,
    limit: int | None = 20,
) -> list[StoredCompletion]:
    """Whole records, newest first unless ``order`` says otherwise."""
    query = select_completions(store, filters, order=order, after=after, limit=limit)
    with store.engine.connect() as conn:
        return [cast(StoredCompletion, as_record(row)) for row in conn.execute(query)]


def iterate(
    store: Store,
    filters: Filters,
    *,
    order: Order = "asc",
    columns: Sequence[Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """Every matching record (or the ``columns`` asked for), streamed in batches."""
    query = select_completions(store, filters, order=order, columns=columns)
    with store.engine.connect() as conn:
        result = conn.execution_options(stream_results=True, yield_per=500).execute(query)
        for row in result:
            yield as_record(row)


def totals(store: Store, filters: Filters) -> tuple[int, int]:
    """(calls, tokens) of the matching records, tokens as the upstream counted them."""
    columns = [sa.func.count(), sa.func.coalesce(sa.func.sum(C.total_tokens), 0)]
    query = select_completions(store, filters, columns=columns).order_by(None)
    with store.engine.connect() as conn:
        calls, tokens = conn.execute(query).one()
    return int(calls), int(tokens)


def count(store: Store, filters: Filters) -> int:
    query = select_completions(store, filters, columns=[sa.func.count()]).order_by(None)
    with store.engine.connect() as conn:
        return int(conn.execute(query).scalar_one())


def get(store: Store, ref: str, tenants: tuple[str, ...] | None = None) -> StoredCompletion | None:
    """One record by its id or its upstream completion id (the newest if several share it)."""
    rows = find(store, Filters(ids=(ref,), tenants=tenants), limit=1)
    return rows[0] if rows else None


def id_quantiles(store: Store, filters: Filters, offsets: Sequence[int]) -> list[str]:
    """The ids at these positions of the matching records in id order (for cutting a
    selection into ranges of about equal size); positions past the end give nothing."""
    ids = select_completions(store, filters, columns=[C.id], order="asc")
    found: list[str] = []
    with store.engine.connect() as conn:
        for offset in offsets:
            row = conn.execute(ids.limit(1).offset(offset)).first()
            if row is not None:
                found.append(row[0])
    return found


def matching_ids(store: Store, filters: Filters) -> list[str]:
    query = select_completions(store, filters, columns=[C.id], order="asc")
    with store.engine.connect() as conn:
        return [row[0] for row in conn.execute(query)]


def _chunks(items: Sequence[str], size: int = 500) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def relabel(
    store: Store,
    ids: Sequence[str],
    *,
    set_tags: Mapping[str, str] | None = None,
    remove: Sequence[str] = (),
    replace_all: bool = False,
) -> int:
    """Change the metadata of records: add/overwrite ``set_tags``, drop ``remove`` keys.

    The metadata JSON and the tag rows change together, in one transaction per
    500 records, and every result must still fit OpenAI's limits (it is what
    an export or a re-send would carry); otherwise nothing changes.
    """
    changed = 0
    for chunk in _chunks(list(ids)):
        with store.engine.begin() as conn:
            rows = conn.execute(sa.select(C.id, C.metadata).where(C.id.in_(chunk))).all()
            moved = _app_moves(conn, rows, set_tags or {}, remove, replace_all)
            for record_id, metadata in rows:
                updated = {} if replace_all else dict(metadata or {})
                for key in remove:
                    updated.pop(key, None)
                updated.update(set_tags or {})
                problem = check_metadata(updated)
                if problem:
                    raise QueryError(f"Cannot relabel {record_id}: {problem}")
                if updated == metadata:
                    continue
                conn.execute(COMPLETIONS.update().where(C.id == record_id).values(metadata=updated))
                conn.execute(TAGS.delete().where(TAGS.c.completion_id == record_id))
                if updated:
                    conn.execute(
                        TAGS.insert(),
                        [
                            {"completion_id": record_id, "key": key, "value": value}
                            for key, value in updated.items()
                        ],
                    )
                changed += 1
            rollups.apply(conn, rollups.group(moved[0], -1))
            rollups.apply(conn, rollups.group(moved[1]))
    return changed


def _app_moves(
    conn: Any,
    rows: Sequence[Any],
    set_tags: Mapping[str, str],
    remove: Sequence[str],
    replace_all: bool,
) -> tuple[list[rollups.Call], list[rollups.Call]]:
    """(before, after) for the calls whose app tag a relabel changes: the aggregates move."""
    app = rollups.APP_TAG
    changing = []
    for record_id, metadata in rows:
        old = (metadata or {}).get(app, "")
        new = "" if replace_all or app in remove else old
        new = set_tags.get(app, new)
        if old != new:
            changing.append((record_id, new))
    if not changing:
        return [], []
    calls = {
        row.id: rollups.Call.of(row._mapping)
        for row in conn.execute(
            sa.select(C.id, *(C[name] for name in rollups.COLUMNS)).where(
                C.id.in_([record_id for record_id, _ in changing])
            )
        )
    }
    before = [calls[record_id] for record_id, _ in changing]
    after = [calls[record_id].moved_to(new) for record_id, new in changing]
    return before, after


def delete(store: Store, ids: Sequence[str]) -> int:
    """Delete records with their tags and search entries; returns how many went."""
    deleted = 0
    for chunk in _chunks(list(ids)):
        with store.engine.begin() as conn:
            gone = rollups.stored_calls(conn, COMPLETIONS, list(chunk))
            rollups.apply(conn, rollups.group(gone, -1))
            search.delete(conn, list(chunk))
            conn.execute(TAGS.delete().where(TAGS.c.completion_id.in_(chunk)))
            deleted += conn.execute(COMPLETIONS.delete().where(C.id.in_(chunk))).rowcount
    return deleted


def with_filters(filters: Filters, **changes: Any) -> Filters:
    return replace(filters, **changes)


def recent_tags(store: Store, tenants: Sequence[str] | None, calls: int = 1000) -> list[str]:
    """The ``key=value`` tags of the tenants' newest ``calls`` calls, most used first: a
    filter's suggestions (the newest calls, not a scan of every tag ever written)."""
    newest = sa.select(C.id).order_by(C.id.desc()).limit(calls)
    if tenants is not None:
        newest = newest.where(C.tenant.in_(list(tenants)))
    ids = newest.subquery()
    count = sa.func.count()
    select = (
        sa.select(TAGS.c.key, TAGS.c.value)
        .where(TAGS.c.completion_id.in_(sa.select(ids.c.id)))
        .group_by(TAGS.c.key, TAGS.c.value)
        .order_by(count.desc(), TAGS.c.key, TAGS.c.value)
        .limit(200)
    )
    with store.engine.connect() as conn:
        return [f"{key}={value}" for key, value in conn.execute(select)]


# -- a listing's row ----------------------------------------------------------------

LIST_COLUMNS = (
    "id",
    "created_at",
    "model",
    "status",
    "error",
    "tokens",
    "latency_ms",
    "tags",
    "prompt",
)


def summary(record: Mapping[str, Any]) -> dict[str, Any]:
    """The table view of one record: what a person scans for."""
    messages = (record.get("request") or {}).get("messages") or []
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    prompt = message_text(users[-1]) if users else ""
    return {
        "id": record["id"],
        "created_at": record["created_at"],
        "model": record.get("model_requested"),
        "status": record["status"],
        "error": error_kind(record.get("error")),
        "tokens": record.get("total_tokens"),
        "latency_ms": record.get("latency_ms"),
        "tags": ",".join(f"{k}={v}" for k, v in (record.get("metadata") or {}).items()),
        "prompt": " ".join(prompt.split()),
    }


def error_kind(error: Any) -> str | None:
    """A short name for what went wrong: the error's type (OpenAI's shape or ours)."""
    if error is None:
        return None
    if isinstance(error, dict):
        nested = error.get("error")
        inner: dict[str, Any] = nested if isinstance(nested, dict) else error
        return str(inner.get("type") or inner.get("code") or "error")
    return "error"
