"""`distillery eval run`: generate with every candidate, grade, summarise, store.

Numbers a user can trust: each mean comes with a 95% bootstrap confidence
interval (2,000 resamples, seeded, so a re-run prints the same interval),
and comparisons between runs are paired per item.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from distillery.core.config import Price
from distillery.curation.evals.generate import Candidate, Generator
from distillery.curation.evals.graders import Context, Grader, describe
from distillery.curation.evals.items import Item
from distillery.store import Store, evals, query
from distillery.store.records import (
    CandidateSummary,
    EvalItemRecord,
    EvalRunRecord,
    EvalSampleRecord,
    GraderStats,
    Grading,
    Role,
    Summary,
)

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
) -> list[EvalSampleRecord]:
    async def one(candidate: Candidate, item: Item) -> EvalSampleRecord:
        generation = await generator.complete(candidate, item.messages, item.params)
        grades: dict[str, Grading] = {}
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
) -> EvalRunRecord:
    """Run, store and summarise one eval; returns the stored run."""
    samples = asyncio.run(_evaluate(items, candidates, graders, generator, context, progress))
    summary = summarise(samples, items, candidates, graders, prices, by_tag)
    summary["calls"] = {"made": generator.calls, "cached": generator.cache_hits}
    config = {
        **config,
        "reference_models": reference_models(store, items),
        "graders": [describe(g) for g in graders],
        "candidates": [
            {"label": c.label, "model": c.model, "base_url": c.endpoint.base_url, "role": c.role}
            for c in candidates
        ],
    }
    graded: list[EvalItemRecord] = [
        {"item": i.index, "item_key": i.key, "messages": i.messages, "reference": i.reference}
        for i in items
    ]
    return evals.save_run(store, new_run_id(), config, summary, samples, graded)


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
    samples: list[EvalSampleRecord],
    items: list[Item],
    candidates: list[Candidate],
    graders: list[Grader],
    prices: dict[str, Price],
    by_tag: str | None,
) -> Summary:
    tags = {item.index: item.tags for item in items}
    result: Summary = {"items": len(items), "candidates": {}}
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
        entry: CandidateSummary = {
            "model": candidate.model,
            "role": candidate.role,
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
            graded = [
                (s, score) for s in mine if (score := s["grades"][grader.name]["score"]) is not None
            ]
            scores = [score for _, score in graded]
            passed = [s["grades"][grader.name]["passed"] for s, _ in graded]
            stats: GraderStats = {
                **_mean_ci(scores),  # type: ignore[typeddict-item]
                "pass_rate": round(sum(passed) / len(passed), 4) if passed else None,
                "n": len(scores),
                "errors": len(mine) - len(graded),
                "scale": list(grader.scale()),
            }
            if by_tag:
                groups: dict[str, list[float]] = {}
                for sample, score in graded:
                    value = tags.get(sample["item"], {}).get(by_tag, "(none)")
                    groups.setdefault(value, []).append(score)
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


def _ungraded(sample: EvalSampleRecord) -> bool:
    return any(grade["score"] is None for grade in sample["grades"].values())


def _why(sample: EvalSampleRecord) -> str:
    if sample["error"]:
        return str(sample["error"])
    name, grade = next((n, g) for n, g in sample["grades"].items() if g["score"] is None)
    return f"{name}: {grade['detail']}"


# Runs stored before candidates had roles: distill's labels said who was who.
LEGACY_ROLES: tuple[tuple[str, Role], ...] = (
    ("teacher:", "teacher"),
    ("base:", "base"),
    ("base student", "base"),
    ("tuned:", "tuned"),
    ("fine-tuned", "tuned"),
)


def role(label: str, entry: CandidateSummary) -> Role:
    if "role" in entry:
        return entry["role"]
    return next((r for prefix, r in LEGACY_ROLES if label.startswith(prefix)), "candidate")


def with_role(summary: Summary, wanted: Role) -> list[str]:
    """The labels of the candidates that play ``wanted`` in this run."""
    return [label for label, entry in summary["candidates"].items() if role(label, entry) == wanted]


@dataclass(frozen=True)
class Miss:
    """A candidate whose mean for a grader is below its ``--fail-under`` bar (or has none)."""

    candidate: str
    role: Role
    grader: str
    mean: float | None
    bar: float

    def __str__(self) -> str:
        return f"{self.candidate}/{self.grader}: {self.mean} < {self.bar}"


def failing(summary: Summary, thresholds: dict[str, float]) -> list[Miss]:
    """Candidate/grader pairs whose mean is below the grader's threshold (or has none)."""
    return [
        Miss(label, role(label, entry), name, stats["mean"], thresholds[name])
        for label, entry in summary["candidates"].items()
        for name, stats in entry["graders"].items()
        if name in thresholds and (stats["mean"] is None or stats["mean"] < thresholds[name])
    ]


def erroring(summary: Summary, max_error_rate: float) -> list[str]:
    """Candidates that failed on more than ``max_error_rate`` of the items, with the first error."""
    items = summary["items"] or 1
    return [
        f"{label}: {entry['failed_items']} of {summary['items']} items failed "
        f"(first: {entry['first_error']})"
        for label, entry in summary["candidates"].items()
        if entry.get("failed_items", 0) / items > max_error_rate
    ]


def compare(
    a: list[EvalSampleRecord],
    b: list[EvalSampleRecord],
    candidate_a: str,
    candidate_b: str,
    grader: str,
) -> dict[str, Any]:
    """Paired comparison over the items both runs graded (matched by prompt)."""
    # An item either side could not score is no evidence for either.
    left, right = _scores(a, candidate_a, grader), _scores(b, candidate_b, grader)
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


def _scores(samples: list[EvalSampleRecord], candidate: str, grader: str) -> dict[str, float]:
    """Item key -> score, for the items ``candidate`` was scored on by ``grader``."""
    return {
        s["item_key"]: score
        for s in samples
        if s["candidate"] == candidate
        and grader in s["grades"]
        and (score := s["grades"][grader]["score"]) is not None
    }


RESULT_COLUMNS = (
    "candidate",
    "grader",
    "mean",
    "ci_95",
    "pass_rate",
    "n",
    "errors",
    "p50_ms",
    "p95_ms",
    "tokens_in",
    "tokens_out",
    "cost_usd",
)


def result_rows(summary: Summary) -> list[dict[str, Any]]:
    """One row per candidate and grader: what `eval run`, `distill` and the dashboard show."""
    rows = []
    for label, entry in summary["candidates"].items():
        for name, stats in entry["graders"].items():
            rows.append(
                {
                    "candidate": label,
                    "grader": name,
                    "mean": stats["mean"],
                    "ci_95": (
                        f"[{stats['ci_low']:.3f}, {stats['ci_high']:.3f}]"
                        if stats["mean"] is not None
                        else None
                    ),
                    "pass_rate": stats["pass_rate"],
                    "n": stats["n"],
                    # Items without a score (a failed call, a judge without a verdict):
                    # the mean is over the n that have one.
                    "errors": stats.get("errors", 0),
                    "p50_ms": entry["latency_p50_ms"],
                    "p95_ms": entry["latency_p95_ms"],
                    "tokens_in": entry["prompt_tokens"],
                    "tokens_out": entry["completion_tokens"],
                    "cost_usd": entry["cost_usd"],
                }
            )
    return rows


# Below this many graded items a score carries a warning with its (Wilson) interval.
FEW_GRADED = 30


def wilson(mean: float, n: int, scale: list[float]) -> tuple[float, float]:
    """The 95% Wilson score interval of a mean of ``n`` scores on ``scale`` (its ends).

    The eval's bootstrap interval collapses to a point when a few scores are all alike
    (2 of 2 correct: "1.000-1.000"); Wilson's does not (0.342-1.000), and it holds for any
    score bounded by the scale, since none varies more than a pass/fail at the same mean."""
    low, high = (scale[0], scale[-1]) if len(scale) >= 2 and scale[-1] > scale[0] else (0.0, 1.0)
    p = min(max((mean - low) / (high - low), 0.0), 1.0)
    z2 = 1.959963984540054**2
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = math.sqrt(z2 * p * (1 - p) / n + z2 * z2 / (4 * n * n)) / (1 + z2 / n)
    return low + (centre - half) * (high - low), low + (centre + half) * (high - low)


def few_graded(summary: Summary) -> list[str]:
    """A warning per candidate and grader scored on fewer than FEW_GRADED items, with the
    score's Wilson interval: what a table of means alone does not say."""
    lines = []
    for label, entry in summary["candidates"].items():
        for name, stats in entry["graders"].items():
            n, mean = stats["n"], stats["mean"]
            if mean is None or not n or n >= FEW_GRADED:
                continue
            low, high = wilson(mean, n, stats["scale"])
            lines.append(
                f"Warning: {label} ({name}) scored on {n} items, 95% interval "
                f"{low:.3f}-{high:.3f}: too few to trust a difference; grade {FEW_GRADED} or more."
            )
    return lines
