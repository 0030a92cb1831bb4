"""The overview's numbers: from the daily aggregates (``rollups.py``) for long windows,
from the calls themselves for short ones.

Groups come out with calls, errors, tokens, latency percentiles and cost.  From the
aggregates, percentiles are the histogram's edges (upper bounds); where a group holds
its calls' latencies (a short window's scan, or a window of at most ``EXACT_LIMIT``
calls) they are exact, taken as ``completions stats --exact`` takes them.  A group's
cost is the sum over its models; if any of them has no price, the group's cost is
unknown (``None``), not a partial sum.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa

from distillery.core.config import Price
from distillery.core.prices import cost
from distillery.core.shapes import system_prompt
from distillery.store import rollups
from distillery.store.db import COMPLETIONS, Store, utc
from distillery.store.query import Filters, select_completions
from distillery.store.rollups import APP_TAG, APPS, HISTOGRAM, TASKS, percentile

By = Literal["model", "app", "fingerprint", "day"]
EXACT_LIMIT = 50_000  # a range with at most this many calls gets exact total percentiles
HOUR, DAY = timedelta(hours=1), timedelta(days=1)


@dataclass
class Group:
    name: Any
    calls: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * len(HISTOGRAM))
    cost_usd: float | None = 0.0
    # Every call's latency, when known (then the percentiles are exact); None: not known.
    latencies: list[float] | None = None
    # Or only the exact quantiles asked for, q -> ms (counted by the database).
    known: dict[float, float] | None = None

    def add(self, other: Group) -> None:
        """Count ``other`` in; an unknown cost on either side makes the sum unknown, and
        so do unknown latencies make the percentiles bounds (an empty group knows them)."""
        self.known = None  # quantiles of a part are not those of the sum
        if not self.calls:
            self.latencies = None if other.latencies is None else list(other.latencies)
        elif not other.calls:
            pass
        elif self.latencies is None or other.latencies is None:
            self.latencies = None
        else:
            self.latencies.extend(other.latencies)
        self.calls += other.calls
        self.errors += other.errors
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.histogram = [a + b for a, b in zip(self.histogram, other.histogram, strict=True)]
        if self.cost_usd is None or other.cost_usd is None:
            self.cost_usd = None
        else:
            self.cost_usd += other.cost_usd

    @property
    def exact(self) -> bool:
        """Whether the percentiles are exact (else: the histogram's upper bounds)."""
        return self.latencies is not None or self.known is not None

    @property
    def p50_ms(self) -> float | None:
        return self.quantile(0.5)

    @property
    def p95_ms(self) -> float | None:
        return self.quantile(0.95)

    def quantile(self, q: float) -> float | None:
        if self.latencies is None and self.known is not None and q in self.known:
            return self.known[q]
        if self.latencies is None:
            return percentile(self.histogram, q)
        if not self.latencies:
            return None
        ordered = sorted(self.latencies)
        return round(ordered[round(q * (len(ordered) - 1))], 1)

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.calls if self.calls else None


def groups(
    store: Store,
    by: By,
    *,
    tenants: tuple[str, ...] | None,
    since: datetime | None = None,
    until: datetime | None = None,
    prices: Mapping[str, Price] | None = None,
    app: str | None = None,
) -> list[Group]:
    """Totals per ``by`` value over the whole days from ``since`` (of the calls tagged
    ``app=APP``, when given), largest first (``day``: in time order)."""
    if app is not None and by == "fingerprint":
        raise ValueError("the prompt fingerprints' aggregates do not know the app tag")
    R = (TASKS if by == "fingerprint" else APPS).c
    column = R[by]
    query = sa.select(
        column.label("name"),
        R.model,
        sa.func.sum(R.calls),
        sa.func.sum(R.errors),
        sa.func.sum(R.prompt_tokens),
        sa.func.sum(R.completion_tokens),
        *(sa.func.sum(R[name]) for name in HISTOGRAM),
    ).group_by(column, R.model)
    if tenants is not None:
        query = query.where(R.tenant.in_(tenants))
    if since is not None:
        query = query.where(R.day >= day_of(since))
    if until is not None:
        query = query.where(R.day < until)
    if app is not None:
        query = query.where(R.app == app)
    found: dict[Any, Group] = {}
    with store.engine.connect() as conn:
        for row in conn.execute(query):
            name, model, calls, errors, prompt, completion, *histogram = row
            if by == "day":
                name = _utc(name)
            found.setdefault(name, Group(name)).add(
                Group(
                    name,
                    int(calls),
                    int(errors),
                    int(prompt),
                    int(completion),
                    [int(count) for count in histogram],
                    cost(model, int(prompt), int(completion), prices or {}),
                )
            )
    return ordered(found, by)


def scanned(
    store: Store, by: By, filters: Filters, prices: Mapping[str, Price] | None = None
) -> list[Group]:
    """The same groups, counted from the calls themselves: for the part of a day that the
    daily aggregates cannot cut out (a range starting or ending within a day)."""
    columns = [COMPLETIONS.c[name] for name in rollups.COLUMNS]
    query = select_completions(store, filters, columns=columns).order_by(None)
    found: dict[Any, Group] = {}
    with store.engine.connect() as conn:
        rows = conn.execution_options(stream_results=True, yield_per=1000).execute(query)
        for row in rows:
            call = rollups.Call.of(row._mapping)
            name = getattr(call, by)
            one = Group(
                name,
                1,
                int(call.error),
                call.prompt_tokens,
                call.completion_tokens,
                [0] * len(HISTOGRAM),
                cost(call.model, call.prompt_tokens, call.completion_tokens, prices or {}),
            )
            one.histogram[rollups.bucket(call.latency_ms)] = 1
            found.setdefault(name, Group(name)).add(one)
    return ordered(found, by)


def window(
    store: Store,
    *,
    tenants: tuple[str, ...] | None,
    start: datetime,
    end: datetime,
    prices: Mapping[str, Price] | None = None,
) -> dict[str, list[Group]]:
    """Every call in [start, end), counted exactly: groups by ``hour`` (every hour drawn,
    empty ones too), ``model``, ``app`` and ``fingerprint``, and the ``total``.

    For short windows (a day or three): one indexed range scan of a few columns, where
    the aggregates could only answer for whole days and bound the percentiles.  One
    statement, so that every count and every latency come from the same calls."""
    C = COMPLETIONS.c
    is_error = sa.case((sa.or_(C.status >= 400, C.error.is_not(None)), 1), else_=0)
    # The app tag from the call's own metadata, as the aggregates take it: a join with the
    # tags made Postgres hash every app tag ever written (0.66 s for three days of a
    # million calls, 0.10 s this way; on SQLite 0.18 s and 0.16 s).
    app = C["metadata"][APP_TAG].as_string()
    query = sa.select(
        _hour(store),
        sa.func.coalesce(C.model_served, C.model_requested, ""),
        sa.func.coalesce(app, ""),
        sa.func.coalesce(C.prompt_fingerprint, ""),
        is_error,
        sa.func.coalesce(C.prompt_tokens, 0),
        sa.func.coalesce(C.completion_tokens, 0),
        sa.func.coalesce(C.latency_ms, 0.0),
    ).where(C.created_at >= start, C.created_at < end)
    if tenants is not None:
        query = query.where(C.tenant.in_(tenants))
    # Per dimension, (name, model) -> [calls, errors, prompt, completion, latencies]: the
    # model kept apart until the end, for the cost.
    sums: list[dict[tuple[str, str], list[Any]]] = [{}, {}, {}, {}]
    with store.engine.connect() as conn:
        for hour, model, app_name, fingerprint, error, prompt, completion, latency in conn.execute(
            query
        ):
            for table, name in zip(sums, (hour, model, app_name, fingerprint), strict=True):
                entry = table.get((name, model))
                if entry is None:
                    entry = table[(name, model)] = [0, 0, 0, 0, []]
                entry[0] += 1
                entry[1] += error
                entry[2] += prompt
                entry[3] += completion
                entry[4].append(float(latency))
    found: dict[str, dict[Any, Group]] = {}
    for by, table in zip(("hour", "model", "app", "fingerprint"), sums, strict=True):
        groups = found[by] = {}
        for (name, model), (calls, errors, prompt, completion, latencies) in table.items():
            key = _hour_start(name) if by == "hour" else name
            group = groups.get(key)
            if group is None:
                group = groups[key] = Group(key, latencies=[])
            group.add(
                Group(
                    key,
                    calls,
                    errors,
                    prompt,
                    completion,
                    cost_usd=cost(model, prompt, completion, prices or {}),
                    latencies=latencies,
                )
            )
    total = Group("all", latencies=[])
    for group in found["model"].values():
        total.add(group)
    return {
        "hour": filled(found["hour"].values(), start, end, HOUR),
        "model": ordered(found["model"], "model"),
        "app": ordered(found["app"], "app"),
        "fingerprint": ordered(found["fingerprint"], "fingerprint"),
        "total": [total],
    }


def _hour(store: Store) -> Any:
    """A call's UTC hour as text, ``YYYY-MM-DD HH`` (text: no timestamp parsed per call)."""
    created = COMPLETIONS.c.created_at
    if store.engine.dialect.name == "postgresql":
        return sa.func.to_char(sa.func.timezone("UTC", created), "YYYY-MM-DD HH24")
    return sa.func.substr(created, 1, 13)  # SQLite keeps 'YYYY-MM-DD HH:MM:SS.ffffff', UTC


def _hour_start(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%d %H").replace(tzinfo=UTC)


def filled(
    buckets: Iterable[Group], start: datetime, end: datetime, step: timedelta
) -> list[Group]:
    """The series with a group for every bucket from ``start``'s to ``end``'s: a quiet
    hour or day is drawn as an empty column, not left out."""
    by_start = {group.name: group for group in buckets}
    first = start.replace(minute=0, second=0, microsecond=0) if step == HOUR else day_of(start)
    series, moment = [], first
    while moment < end:
        series.append(by_start.get(moment) or Group(moment, latencies=[]))
        moment += step
    return series


def quantiles(
    store: Store,
    *,
    tenants: tuple[str, ...] | None,
    start: datetime,
    end: datetime | None,
    qs: Sequence[float] = (0.5, 0.95),
    limit: int = EXACT_LIMIT,
) -> dict[float, float] | None:
    """The exact latency quantiles of the calls in [start, end) (the call at rank
    ``round(q * (n - 1))``, as ``completions stats --exact`` takes it), ranked by the
    database: no call's latency crosses the wire but the ones asked for.  None when there
    are more than ``limit`` calls, or when calls came or went between counting and ranking."""
    C = COMPLETIONS.c
    where = [C.created_at >= start]
    if end is not None:
        where.append(C.created_at < end)
    if tenants is not None:
        where.append(C.tenant.in_(tenants))
    latency = sa.func.coalesce(C.latency_ms, 0.0)
    with store.engine.connect() as conn:
        n = conn.execute(sa.select(sa.func.count()).where(*where)).scalar_one()
        if n > limit:
            return None
        if n == 0:
            return {}
        ranks = {q: round(q * (n - 1)) for q in qs}
        rank = sa.func.row_number().over(order_by=(latency, C.id)) - 1
        ranked = sa.select(latency.label("latency"), rank.label("rank")).where(*where).subquery()
        chosen = sa.select(ranked.c.rank, ranked.c.latency).where(
            ranked.c.rank.in_(sorted(set(ranks.values())))
        )
        found = {int(r): latency_ms for r, latency_ms in conn.execute(chosen)}
    if any(r not in found for r in ranks.values()):
        return None
    return {q: round(float(found[r]), 1) for q, r in ranks.items()}


def ordered(found: Mapping[Any, Group], by: By) -> list[Group]:
    """Largest first (``day``: in time order)."""
    if by == "day":
        return sorted(found.values(), key=lambda g: g.name)
    return sorted(found.values(), key=lambda g: (-g.calls, str(g.name)))


def day_of(moment: datetime) -> datetime:
    """The start of the UTC day ``moment`` is in: the aggregates' resolution."""
    return moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def stored_values(store: Store, tenants: Sequence[str] | None) -> dict[str, list[str]]:
    """Every model and ``app`` tag value the tenants' calls have, from the aggregates (a
    few rows per day, not a scan): what the completions page's pickers offer."""
    found: dict[str, list[str]] = {}
    with store.engine.connect() as conn:
        for name in ("model", "app"):
            select = sa.select(APPS.c[name]).distinct().order_by(APPS.c[name])
            if tenants is not None:
                select = select.where(APPS.c.tenant.in_(list(tenants)))
            found[name] = [value for (value,) in conn.execute(select) if value]
    return found


def next_midnight(moment: datetime) -> datetime:
    """``moment`` itself if it is a UTC midnight, else the next one."""
    day = day_of(moment)
    return day if day == moment else day + DAY


def system_prompts(
    store: Store, fingerprints: list[str], tenants: Sequence[str] | None = None
) -> dict[str, str]:
    """One call's system prompt per prompt fingerprint (any call: they share a template),
    from the calls of ``tenants`` only (``None``: anyone's, for an admin).

    The fingerprint ignores digits, so two tenants' prompts that differ only in an account
    number share it: the prompt shown must be one the viewer sent.  No ORDER BY: "the
    newest" would sort every call of the template (20,000 of them for a busy one); the
    fingerprint index hands back one at once."""
    found: dict[str, str] = {}
    with store.engine.connect() as conn:
        for fingerprint in fingerprints:
            select = sa.select(COMPLETIONS.c.request).where(
                COMPLETIONS.c.prompt_fingerprint == fingerprint
            )
            if tenants is not None:
                select = select.where(COMPLETIONS.c.tenant.in_(list(tenants)))
            row = conn.execute(select.limit(1)).first()
            found[fingerprint] = system_prompt(row[0] if row else None)
    return found


def _utc(value: Any) -> datetime:
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    assert isinstance(moment, datetime)
    return utc(moment)
