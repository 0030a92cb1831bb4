"""`distillery eval run`: generate with every candidate, grade, summarise, store.

Numbers a user can trust: each mean comes with a 95% bootstrap confidence
interval (2,000 resamples, seeded, so a re-run prints the same interval),
and comparisons between runs are paired per item.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import numpy as np
import sqlalchemy as sa

from distillery.config import Price
from distillery.curation.evals.generate import Candidate, Generator
from distillery.curation.evals.graders import Context, Grader, describe
from distillery.curation.evals.items import Item
from distillery.store import Store, query
from distillery.store.db import EVAL_RUNS, EVAL_SAMPLES, as_record

RESAMPLES = 2000


def new_run_id() -> str:
    return f"eval_{time.time_ns():016x}{secrets.token_hex(4)}"


def bootstrap(values: list[float], seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the 95% percentile bootstrap interval of the mean."""
    if not values:
        return float("nan"), float("nan"), float("nan")
    data = np.asarray(values, dtype=float)
    if len(data) == 1:
        return float(data[0]), float(data[0]), float(data[0])
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(RESAMPLES, len(data)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(data.mean()), float(low), float(high)


def percentile(values: list[float], p: float) -> float | None:
    return float(np.percentile(values, p)) if values else None


async def _evaluate(
    items: list[Item],
    candidates: list[Candidate],
    graders: list[Grader],
    generator: Generator,
    context: Context,
    progress: Callable[[int], None] | None,
) -> list[dict[str, Any]]:
    async def one(candidate: Candidate, item: Item) -> dict[str, Any]:
        generation = await generator.complete(candidate, item.messages, item.params)
        grades = {}
        for grader in graders:
            grade = await grader.grade(generation, item, candidate, context)
            grades[grader.name] = {
                "score": grade.score,
                "passed": grade.passed,
                "detail": grade.detail,
            }
        if progress is not None:
            progress(1)
        return {
            "item": item.index,
            "candidate": candidate.label,
            "item_key": item.key,
            "output": generation.message,
            "error": generation.error,
            "grades": grades,
            "latency_ms": generation.latency_ms,
            "prompt_tokens": generation.usage.get("prompt_tokens"),
            "completion_tokens": generation.usage.get("completion_tokens"),
            "cached": generation.cached,
        }

    try:
        return await asyncio.gather(*(one(c, i) for c in candidates for i in items))
    finally:
        await generator.close()


def run(
    store: Store,
    items: list[Item],
    candidates: list[Candidate],
    graders: list[Grader],
    generator: Generator,
    context: Context,
    *,
    config: dict[str, Any],
    prices: dict[str, Price],
    by_tag: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run, store and summarise one eval; returns the stored run."""
    samples = asyncio.run(_evaluate(items, candidates, graders, generator, context, progress))
    summary = summarise(samples, items, candidates, graders, prices, by_tag)
    summary["calls"] = {"made": generator.calls, "cached": generator.cache_hits}
    run_id = new_run_id()
    config = {
        **config,
        "reference_models": reference_models(store, items),
        "graders": [describe(g) for g in graders],
        "candidates": [
            {"label": c.label, "model": c.model, "base_url": c.endpoint.base_url}
            for c in candidates
        ],
    }
    with store.engine.begin() as conn:
        conn.execute(
            EVAL_RUNS.insert().values(
                id=run_id, created_at=datetime.now(UTC), config=config, summary=summary
            )
        )
        rows = [
            {**{k: v for k, v in s.items() if k != "cached"}, "run_id": run_id} for s in samples
        ]
        for start in range(0, len(rows), 1000):
            conn.execute(EVAL_SAMPLES.insert(), rows[start : start + 1000])
    return {"id": run_id, "config": config, "summary": summary}


def reference_models(store: Store, items: list[Item]) -> dict[str, int]:
    """Which models wrote the reference answers (the teacher), and for how many items.

    Empty when the items come from a file: their references name no model.
    """
    ids = [item.source for item in items if item.source]
    found: Counter[str] = Counter()
    for start in range(0, len(ids), 500):
        chunk = tuple(ids[start : start + 500])
        for record in query.find(store, query.Filters(ids=chunk), limit=None):
            found[record.get("model_served") or record.get("model_requested") or "unknown"] += 1
    return dict(found.most_common())


def summarise(
    samples: list[dict[str, Any]],
    items: list[Item],
    candidates: list[Candidate],
    graders: list[Grader],
    prices: dict[str, Price],
    by_tag: str | None,
) -> dict[str, Any]:
    tags = {item.index: item.tags for item in items}
    result: dict[str, Any] = {"items": len(items), "candidates": {}}
    for candidate in candidates:
        mine = [s for s in samples if s["candidate"] == candidate.label]
        latencies = [s["latency_ms"] for s in mine if s["latency_ms"] is not None]
        prompt_tokens = sum(s["prompt_tokens"] or 0 for s in mine)
        completion_tokens = sum(s["completion_tokens"] or 0 for s in mine)
        price = prices.get(candidate.model)
        cost = (
            (prompt_tokens * price.input + completion_tokens * price.output) / 1_000_000
            if price
            else None
        )
        failed = [s for s in mine if s["error"] or _ungraded(s)]
        entry: dict[str, Any] = {
            "model": candidate.model,
            "errors": sum(1 for s in mine if s["error"]),
            # Items with no call answer or some grader without a score, and why the first did.
            "failed_items": len(failed),
            "first_error": _why(failed[0]) if failed else None,
            "latency_p50_ms": percentile(latencies, 50),
            "latency_p95_ms": percentile(latencies, 95),
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "cost_usd": round(cost, 6) if cost is not None else None,
            "graders": {},
        }
        for grader in graders:
            graded = [s for s in mine if s["grades"][grader.name]["score"] is not None]
            scores = [s["grades"][grader.name]["score"] for s in graded]
            passed = [s["grades"][grader.name]["passed"] for s in graded]
            stats: dict[str, Any] = {
                **_mean_ci(scores),
                "pass_rate": round(sum(passed) / len(passed), 4) if passed else None,
                "n": len(scores),
                "errors": len(mine) - len(graded),
                "scale": list(grader.scale()),
            }
            if by_tag:
                groups: dict[str, list[float]] = {}
                for sample in graded:
                    value = tags.get(sample["item"], {}).get(by_tag, "(none)")
                    groups.setdefault(value, []).append(sample["grades"][grader.name]["score"])
                stats["by_tag"] = {
                    value: _mean_ci(v) | {"n": len(v)} for value, v in sorted(groups.items())
                }
            entry["graders"][grader.name] = stats
        result["candidates"][candidate.label] = entry
    return result


def _mean_ci(scores: list[float]) -> dict[str, float | None]:
    """Mean and 95% interval over the scored items; all ``None`` when none was scored."""
    if not scores:
        return {"mean": None, "ci_low": None, "ci_high": None}
    mean, low, high = bootstrap(scores)
    return {"mean": round(mean, 4), "ci_low": round(low, 4), "ci_high": round(high, 4)}


def _ungraded(sample: dict[str, Any]) -> bool:
    return any(grade["score"] is None for grade in sample["grades"].values())


def _why(sample: dict[str, Any]) -> str:
    if sample["error"]:
        return str(sample["error"])
    name, grade = next((n, g) for n, g in sample["grades"].items() if g["score"] is None)
    return f"{name}: {grade['detail']}"


def failing(summary: dict[str, Any], thresholds: dict[str, float]) -> list[str]:
    """Candidate/grader pairs whose mean is below the grader's threshold (or has none)."""
    return [
        f"{label}/{name}: {stats['mean']} < {thresholds[name]}"
        for label, entry in summary["candidates"].items()
        for name, stats in entry["graders"].items()
        if name in thresholds and (stats["mean"] is None or stats["mean"] < thresholds[name])
    ]


def erroring(summary: dict[str, Any], max_error_rate: float) -> list[str]:
    """Candidates that failed on more than ``max_error_rate`` of the items, with the first error."""
    items = summary["items"] or 1
    return [
        f"{label}: {entry['failed_items']} of {summary['items']} items failed "
        f"(first: {entry['first_error']})"
        for label, entry in summary["candidates"].items()
        if entry.get("failed_items", 0) / items > max_error_rate
    ]


def load_run(store: Store, run_id: str) -> dict[str, Any] | None:
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(EVAL_RUNS).where(EVAL_RUNS.c.id == run_id)).first()
    return as_record(row) if row else None


def list_runs(store: Store, limit: int | None = 20) -> list[dict[str, Any]]:
    query = sa.select(EVAL_RUNS).order_by(EVAL_RUNS.c.id.desc())
    if limit:
        query = query.limit(limit)
    with store.engine.connect() as conn:
        return [as_record(row) for row in conn.execute(query)]


def load_samples(store: Store, run_id: str) -> list[dict[str, Any]]:
    query = (
        sa.select(EVAL_SAMPLES)
        .where(EVAL_SAMPLES.c.run_id == run_id)
        .order_by(EVAL_SAMPLES.c.candidate, EVAL_SAMPLES.c.item)
    )
    with store.engine.connect() as conn:
        return [as_record(row) for row in conn.execute(query)]


def compare(
    a: list[dict[str, Any]],
    b: list[dict[str, Any]],
    candidate_a: str,
    candidate_b: str,
    grader: str,
) -> dict[str, Any]:
    """Paired comparison over the items both runs graded (matched by prompt)."""
    # An item either side could not score is no evidence for either.
    left = {
        s["item_key"]: s["grades"][grader]["score"]
        for s in a
        if s["candidate"] == candidate_a
        and grader in s["grades"]
        and s["grades"][grader]["score"] is not None
    }
    right = {
        s["item_key"]: s["grades"][grader]["score"]
        for s in b
        if s["candidate"] == candidate_b
        and grader in s["grades"]
        and s["grades"][grader]["score"] is not None
    }
    shared = sorted(left.keys() & right.keys())
    differences = [right[k] - left[k] for k in shared]
    mean, low, high = bootstrap(differences)
    return {
        "grader": grader,
        "a": candidate_a,
        "b": candidate_b,
        "items": len(shared),
        "b_wins": sum(d > 0 for d in differences),
        "a_wins": sum(d < 0 for d in differences),
        "ties": sum(d == 0 for d in differences),
        "mean_difference": round(mean, 4),
        "ci_low": round(low, 4),
        "ci_high": round(high, 4),
    }
