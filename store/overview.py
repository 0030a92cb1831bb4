"""The overview's numbers, from the daily aggregates (``rollups.py``), never a scan.

Groups come out with calls, errors, tokens, latency percentiles (histogram edges:
upper bounds) and cost.  A group's cost is the sum over its models; if any of them
has no price, the group's cost is unknown (``None``), not a partial sum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import sqlalchemy as sa

from distillery.config import Price
from distillery.prices import cost
from distillery.shapes import system_prompt
from distillery.store import rollups
from distillery.store.db import COMPLETIONS, Store, utc
from distillery.store.query import Filters, select_completions
from distillery.store.rollups import APPS, HISTOGRAM, TASKS, percentile

By = Literal["model", "app", "fingerprint", "day"]


@dataclass
class Group:
    name: Any
    calls: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * len(HISTOGRAM))
    cost_usd: float | None = 0.0

    def add(self, other: Group) -> None:
        """Count ``other`` in; an unknown cost on either side makes the sum unknown."""
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
    def p50_ms(self) -> float | None:
        return percentile(self.histogram, 0.5)

    @property
    def p95_ms(self) -> float | None:
        return percentile(self.histogram, 0.95)

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


def ordered(found: Mapping[Any, Group], by: By) -> list[Group]:
    """Largest first (``day``: in time order)."""
    if by == "day":
        return sorted(found.values(), key=lambda g: g.name)
    return sorted(found.values(), key=lambda g: (-g.calls, str(g.name)))


def day_of(moment: datetime) -> datetime:
    """The start of the UTC day ``moment`` is in: the aggregates' resolution."""
    return moment.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


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
