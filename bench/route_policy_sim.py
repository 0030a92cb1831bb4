"""How often does a route's policy promote the wrong student, and how fast does it demote a
student that got worse?  Prints a table; the numbers go in the README.

Drives the policy's own code (``distillery.curation.route_policy``, which ``routes status``,
``routes promote`` and ``auto`` decide with) on simulated pairs: each pair scores 1 with the
student's true probability of answering as well as the teacher, else 0 (the hardest case for
a bound: all variance), or 0 for a failed call.  The policy looks after every pair, for as long
as the run lasts (continuous monitoring); with the running intersection, "promoted by pair n"
is "the lower bound reached the bar within n pairs", which ``clears_at`` gives in one pass.

    python bench/route_policy_sim.py [--runs 1000] [--pairs 2000] [--bar 0.95]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np

from distillery.curation.route_policy import clears_at, drifts_at

ALPHA = 0.05  # confidence = 0.95, the default
MIN_SAMPLES = 50
HOLDOUT = 0.05  # the default, and the least `auto` accepts


def promotion(rng: np.random.Generator, p: float, fail: float, runs: int, pairs: int, bar: float):
    """Share of runs promoted within ``pairs``, and the median pairs it took."""
    taken = []
    for _ in range(runs):
        scores = (rng.random(pairs) < p).astype(float)
        scores[rng.random(pairs) < fail] = 0.0  # failed calls score 0
        at = clears_at(scores, bar, ALPHA)
        if at is not None:
            taken.append(max(at, MIN_SAMPLES))
    return len(taken) / runs, (statistics.median(taken) if taken else None)


def demotion(
    rng: np.random.Generator, good: float, bad: float, calls_before: int, runs: int, bar: float
):
    """A student serving `on` (holdout graded) degrades from ``good`` to ``bad`` after
    ``calls_before`` calls: calls until demotion, and wrong answers served meanwhile."""
    calls, wrong = [], []
    before = int(calls_before * HOLDOUT)
    for _ in range(runs):
        scores = np.concatenate([(rng.random(before) < good), (rng.random(20_000) < bad)]).astype(
            float
        )
        at = drifts_at(scores, bar, ALPHA)
        if at is None or at <= before:
            continue  # never, or a false alarm before the change (counted apart)
        pairs_after = at - before
        calls.append(pairs_after / HOLDOUT)
        wrong.append(pairs_after / HOLDOUT * (1 - HOLDOUT) * (1 - bad))
    return statistics.median(calls), statistics.median(wrong)


def false_demotion(rng: np.random.Generator, p: float, calls: int, runs: int, bar: float) -> float:
    pairs = int(calls * HOLDOUT)
    alarms = sum(
        drifts_at((rng.random(pairs) < p).astype(float), bar, ALPHA) is not None
        for _ in range(runs)
    )
    return alarms / runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--bar", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    bar, runs, pairs = args.bar, args.runs, args.pairs
    started = time.perf_counter()
    print(
        f"{runs} runs each; bar {bar}, confidence {1 - ALPHA}, min_samples {MIN_SAMPLES}; "
        f"{platform.machine()}, Python {platform.python_version()}"
    )
    print()
    print(f"promotion, watched after every pair for {pairs} pairs")
    print(f"{'student':<38} {'promoted':>9} {'median pairs':>13}")
    cases = [
        (f"true score {bar:.2f} (at the bar)", bar, 0.0),
        (f"true score {bar - 0.03:.2f} (0.03 below)", bar - 0.03, 0.0),
        (f"true score {bar - 0.01:.2f} (0.01 below)", bar - 0.01, 0.0),
        ("true score 0.99", 0.99, 0.0),
        ("true score 1.00", 1.0, 0.0),
        ("perfect answers, 50% of calls failing", 1.0, 0.5),
        ("true score 0.99, 3% of calls failing", 0.99, 0.03),
    ]
    for label, p, fail in cases:
        share, median = promotion(rng, p, fail, runs, pairs, bar)
        shown = "-" if median is None else f"{median:,.0f}"
        print(f"{label:<38} {share:>8.1%} {shown:>13}")
    print()
    print(f"demotion in `on` (holdout {HOLDOUT:.0%} graded), the student degrading to 0.80")
    print(f"{'good for (calls), 0.99 before':<38} {'median calls':>13} {'wrong served':>13}")
    for before in (2_000, 10_000, 40_000):
        calls, wrong = demotion(rng, 0.99, 0.80, before, runs, bar)
        print(f"{before:<38,} {calls:>13,.0f} {wrong:>13,.0f}")
    print()
    print("false demotion: a steady student in `on`, watched for 20,000 calls")
    for p in (0.99, 0.97):
        print(f"  true score {p:.2f}: {false_demotion(rng, p, 20_000, runs, bar):.1%} of runs")
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
