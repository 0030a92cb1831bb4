"""When a route's evidence decides: anytime-valid bounds on a student's mean score.

A route looks at its evidence after every graded pair, for as long as it runs.  A
bound that is only right at one planned sample size (a bootstrap or a t-interval)
is wrong under that kind of watching: re-tested after every pair, a student below
the bar clears it sooner or later.  Here the bounds are a *confidence sequence*:

    If the student's true mean score is at or below the bar, the chance that its
    lower bound ever clears the bar -- however many pairs are graded and however
    often anyone looks -- is at most 1 - confidence (5% by default); the same
    holds for the upper bound falling below the bar for a student at or above it.

(Pairs are taken as independent draws from the route's traffic; each score lies
in 0..1, a failed student call scoring 0.)  The construction is the predictable
plug-in empirical-Bernstein betting martingale of Waudby-Smith & Ramdas,
"Estimating means of bounded random variables by betting" (JRSS-B, 2023): for
each candidate mean m a gambler bets on the scores against m; by Ville's
inequality the wealth reaches 1/alpha with probability at most alpha when m is
the truth, so every m whose wealth ever did is ruled out (the running
intersection).  At 0 and 1 the bound is the sequence's own: 50 perfect scores
give a lower bound of 0.924, not 1.

Demotion adds a drift detector, because evidence gathered while a student was good
would otherwise take long to outweigh: an e-CUSUM (Shin, Ramdas & Rinaldo,
"E-detectors", 2023) bets that the newest scores fall below the bar, restarting
whenever it has lost; it raises an alarm when its wealth reaches 1/alpha, and a
student whose mean is at or above the bar raises one on average no sooner than
every 1/alpha pairs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

GRID = np.round(np.linspace(0.0, 1.0, 1001), 3)  # the candidate means, to 0.001
TRUNCATE = 0.75  # a bet never risks more than this share of the wealth
RECENT = 20  # pairs the drift detector sizes its bets on
Scores = Sequence[float] | np.ndarray  # each 0..1, oldest first


@dataclass(frozen=True)
class Bounds:
    """The mean of the scores so far and its anytime-valid bounds (each side at alpha)."""

    n: int
    mean: float | None
    low: float | None
    high: float | None


def bounds(scores: Scores, alpha: float) -> Bounds:
    """Lower and upper confidence-sequence bounds on the mean of ``scores`` (0..1, oldest
    first), each valid at level ``alpha`` at every n at once, to the grid's 0.001."""
    x = _scores(scores)
    if len(x) == 0:
        return Bounds(0, None, None, None)
    lam = _plug_in(x, alpha)
    threshold = math.log(1 / alpha)
    # The "above m" wealth falls as m rises and the "below m" wealth rises with it, so
    # each rules out one end of the grid: the bounds are where each stops.
    low = _first(lambda m: _wealth(x, lam, m, +1).max() < threshold)
    high = _first(lambda m: _wealth(x, lam, m, -1).max() >= threshold) - 1
    if high < low:  # every mean ruled out: the scores changed while watched (no bounds)
        return Bounds(len(x), float(x.mean()), None, None)
    return Bounds(len(x), float(x.mean()), float(GRID[low]), float(GRID[high]))


def clears_at(scores: Scores, bar: float, alpha: float) -> int | None:
    """The number of pairs after which the lower bound first reached ``bar`` (None: not
    yet): ``bounds(scores[:n], alpha).low >= bar`` from that n on, and never before."""
    x = _scores(scores)
    below = GRID[bar - 1e-9 > GRID]
    if len(x) == 0:
        return None
    if len(below) == 0:
        return 0
    wealth = _wealth(x, _plug_in(x, alpha), float(below[-1]), +1)
    crossed = np.flatnonzero(wealth >= math.log(1 / alpha))
    return int(crossed[0]) + 1 if len(crossed) else None


def _scores(scores: Scores) -> np.ndarray:
    clipped: np.ndarray = np.clip(np.asarray(scores, dtype=float), 0.0, 1.0)
    return clipped


def _wealth(x: np.ndarray, lam: np.ndarray, m: float, side: int) -> np.ndarray:
    """Log-wealth after each pair of betting that the mean is above (+1) or below (-1) m."""
    room = m if side > 0 else 1 - m
    bet = np.minimum(lam, TRUNCATE / max(room, 1e-12))
    return np.cumsum(np.log1p(side * bet * (x - m)))


def _first(holds: Callable[[float], bool]) -> int:
    """The first grid index where ``holds`` (false, then true along the grid) is true;
    len(GRID) when it never is."""
    lo, hi = 0, len(GRID)
    while lo < hi:
        mid = (lo + hi) // 2
        if holds(float(GRID[mid])):
            hi = mid
        else:
            lo = mid + 1
    return lo


def _plug_in(x: np.ndarray, alpha: float) -> np.ndarray:
    """Each pair's bet size, from the pairs before it only (predictable): large while the
    scores vary little, shrinking as evidence accumulates."""
    n = len(x)
    i = np.arange(1, n + 1)
    running_mean = (0.5 + np.cumsum(x)) / (i + 1)
    previous_mean = np.concatenate(([0.5], running_mean[:-1]))
    variance = (0.25 + np.cumsum((x - previous_mean) ** 2)) / (i + 1)
    previous_variance = np.concatenate(([0.25], variance[:-1]))
    lam: np.ndarray = np.sqrt(2 * math.log(1 / alpha) / (previous_variance * i * np.log1p(i)))
    return lam


def drifted(scores: Scores, bar: float, alpha: float) -> bool:
    """Whether the scores (oldest first) have fallen below ``bar`` at some point: the
    e-CUSUM's wealth reached 1/alpha."""
    return drifts_at(scores, bar, alpha) is not None


def drifts_at(scores: Scores, bar: float, alpha: float) -> int | None:
    """The number of pairs after which the e-CUSUM first raised its alarm (None: never).
    Each bet is sized on the RECENT pairs before it, starting from no bet."""
    x = _scores(scores)
    total = np.concatenate(([0.0], np.cumsum(x)))
    squares = np.concatenate(([0.0], np.cumsum(x * x)))
    log_wealth, threshold = 0.0, math.log(1 / alpha)
    most = TRUNCATE / max(1 - bar, 1e-12)
    for t in range(len(x)):
        start = max(0, t - RECENT)
        k = t - start
        mean = (bar + total[t] - total[start]) / (k + 1)
        # sum over the recent pairs of (x - mean)^2, plus the prior's 0.25
        spread = squares[t] - squares[start] - 2 * mean * (total[t] - total[start]) + k * mean**2
        variance = (0.25 + spread) / (k + 1)
        gap = bar - mean
        bet = min(max(gap / (variance + gap * gap), 0.0), most)
        log_wealth = max(log_wealth, 0.0) + math.log1p(-bet * (x[t] - bar))
        if log_wealth >= threshold:
            return t + 1
    return None
