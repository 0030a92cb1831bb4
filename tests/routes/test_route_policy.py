"""The route policy's numbers: anytime-valid bounds, exact at 0 and 1, consistent with the
decision they drive, and a false-promotion rate within the stated guarantee."""

from __future__ import annotations

import numpy as np

from distillery.curation.route_policy import bounds, clears_at, drifted, drifts_at


def test_small_samples_at_0_and_1_get_the_sequences_own_bounds() -> None:
    """A bootstrap gave [1.000, 1.000] for 50 perfect scores and let 59/60 clear a bar of
    0.95; the sequence's bounds do not: evidence of 0.95 takes more than that."""
    perfect = bounds([1.0] * 50, 0.05)
    assert (perfect.mean, perfect.high) == (1.0, 1.0) and perfect.low == 0.924
    one_miss = bounds([1.0] * 59 + [0.0], 0.05)
    assert one_miss.low is not None and one_miss.low < 0.95
    nothing = bounds([0.0] * 50, 0.05)
    assert (nothing.low, nothing.high) == (0.0, 0.076)
    assert bounds([], 0.05).mean is None and bounds([], 0.05).low is None
    # More confidence asked, wider bounds.
    assert (bounds([1.0] * 50, 0.01).low or 1) < perfect.low


def test_the_bounds_hold_the_mean_and_narrow_with_evidence() -> None:
    rng = np.random.default_rng(3)
    scores = rng.random(3000)  # uniform 0..1: mean 0.5
    few, many = bounds(scores[:100], 0.05), bounds(scores, 0.05)
    assert few.low is not None and few.high is not None
    assert many.low is not None and many.high is not None
    assert few.low < 0.5 < few.high and many.low < 0.5 < many.high
    assert many.high - many.low < few.high - few.low < 0.5


def test_clears_at_is_when_the_lower_bound_first_reaches_the_bar() -> None:
    """The decision (lower bound >= bar) and the one-pass answer the simulation uses agree
    at every prefix: the simulation measures the policy the product runs."""
    rng = np.random.default_rng(5)
    scores = (rng.random(400) < 0.98).astype(float)
    at = clears_at(scores, 0.9, 0.05)
    assert at is not None
    for n in range(max(1, at - 15), min(len(scores), at + 15)):
        low = bounds(scores[:n], 0.05).low
        assert low is not None and (low >= 0.9) == (n >= at), n
    assert clears_at([1.0] * 30, 0.9, 0.05) is None  # 38 perfect scores are needed


def test_watched_after_every_pair_a_student_at_the_bar_is_rarely_promoted() -> None:
    """The guarantee, simulated with a fixed seed: a student whose true score is the bar,
    looked at after each of 1,500 pairs, clears it in at most 5% of runs (the sliding
    bootstrap this replaced promoted 65%); 0.03 below it, in about none."""
    rng = np.random.default_rng(11)

    def promoted(p: float) -> float:
        runs = [clears_at((rng.random(1500) < p).astype(float), 0.9, 0.05) for _ in range(300)]
        return sum(r is not None for r in runs) / len(runs)

    assert promoted(0.9) <= 0.06
    assert promoted(0.87) <= 0.01
    assert promoted(0.99) == 1.0


def test_the_drift_detector_sees_a_fall_and_not_a_steady_student() -> None:
    rng = np.random.default_rng(7)
    good = (rng.random(600) < 0.99).astype(float)
    worse = (rng.random(600) < 0.7).astype(float)
    assert not drifted(good, 0.9, 0.05)
    at = drifts_at(np.concatenate([good, worse]), 0.9, 0.05)
    assert at is not None and 600 < at < 700  # within 100 pairs of the fall
    assert drifts_at([0.0] * 10, 0.9, 0.05) is not None
