"""Online evals: a route's student graded against the teacher on live traffic.

The pairs are graded and stored by the route's judge (``judge.py``).  Here:
:func:`status` turns a route's recent pairs into its score, interval and verdict
against the bar, and the promotion policy (:func:`promote`, :func:`demote`, and
:func:`decide` for ``auto`` routes) moves a route's mode on that evidence.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

import structlog

from distillery.core.config import Price, RouteSettings, Settings
from distillery.core.errors import DistilleryError
from distillery.core.prices import cost
from distillery.curation.evals.evaluate import bootstrap
from distillery.store import Store
from distillery.store import routes as route_store

log = structlog.get_logger()
STATUS_COLUMNS = (
    "route",
    "mode",
    "samples",
    "score",
    "ci_low",
    "ci_high",
    "bar",
    "verdict",
    "win",
    "tie",
    "loss",
    "student_errors",
    "fallbacks",
    "dropped",
    "student_p50_ms",
    "teacher_p50_ms",
    "student_cost_usd",
    "teacher_cost_usd",
)


LADDER = ("off", "shadow", "canary", "on")


def promote(settings: Settings, store: Store, name: str, reason: str) -> tuple[str, str]:
    """One step up (off, shadow, canary, on); returns (was, now).  Into canary or on only
    on graded evidence: the score's lower bound over at least min_samples pairs clears the
    bar (for on, pairs graded since the canary began)."""
    route = _route(settings, name)
    standing = _standing_now(settings, store, name, route)
    was = standing["mode"]
    if was == "on":
        raise DistilleryError(f"Route {name!r} is already on.")
    now = LADDER[LADDER.index(was) + 1]
    if now in ("canary", "on"):
        evidence = standing if now == "canary" else _since_change(settings, store, name, route)
        if evidence["verdict"] != "clears the bar":
            raise DistilleryError(
                f"Route {name!r} stays in {was}: {evidence['verdict']} "
                f"({_evidence(evidence)}). Promotion needs the lower bound of the score over "
                f"at least {route.min_samples} graded pairs to clear the bar"
                + (" since the canary began." if now == "on" else ".")
            )
    route_store.set_mode(store, name, now, reason)
    log.info("route promoted", route=name, mode=now, was=was, reason=reason)
    return was, now


def demote(settings: Settings, store: Store, name: str, reason: str) -> tuple[str, str]:
    """One step down (on, canary, shadow, off); returns (was, now)."""
    route = _route(settings, name)
    was = _standing_now(settings, store, name, route)["mode"]
    if was == "off":
        raise DistilleryError(f"Route {name!r} is already off.")
    now = LADDER[LADDER.index(was) - 1]
    route_store.set_mode(store, name, now, reason)
    log.info("route demoted", route=name, mode=now, was=was, reason=reason)
    return was, now


def switch_off(settings: Settings, store: Store, name: str, reason: str) -> tuple[str, str]:
    """Straight to off from any mode (the teacher answers everything); returns (was, now)."""
    route = _route(settings, name)
    was = _standing_now(settings, store, name, route)["mode"]
    if was == "off":
        raise DistilleryError(f"Route {name!r} is already off.")
    route_store.set_mode(store, name, "off", reason)
    log.warning("route switched off", route=name, mode="off", was=was, reason=reason)
    return was, "off"


def decide(settings: Settings, store: Store, name: str) -> tuple[str, str] | None:
    """The automatic policy for one route: up a step when the evidence clears the bar,
    back to shadow when its upper bound falls below it; ``None`` when nothing changes."""
    route = _route(settings, name)
    standing = _standing_now(settings, store, name, route)
    mode = standing["mode"]
    if mode in ("canary", "on") and standing["verdict"] == "below the bar":
        reason = f"automatic: {_evidence(standing)}, below the bar"
        route_store.set_mode(store, name, "shadow", reason)
        log.warning("route demoted", route=name, mode="shadow", was=mode, reason=reason)
        return mode, "shadow"
    if mode == "shadow" and standing["verdict"] == "clears the bar":
        return promote(settings, store, name, f"automatic: {_evidence(standing)}")
    if mode == "canary":
        since = _since_change(settings, store, name, route)
        if since["verdict"] == "clears the bar":
            return promote(settings, store, name, f"automatic: {_evidence(since)}")
    return None


def _evidence(standing: dict[str, Any]) -> str:
    if standing["score"] is None:
        return "no graded pairs"
    return (
        f"score {standing['score']:.3f} [{standing['ci_low']:.3f}, {standing['ci_high']:.3f}] "
        f"over {standing['samples']} pairs, bar {standing['bar']}"
    )


def _route(settings: Settings, name: str) -> RouteSettings:
    if name not in settings.routes:
        known = ", ".join(sorted(settings.routes)) or "none"
        raise DistilleryError(f"No route {name!r} in the config (routes: {known}).")
    return settings.routes[name]


def _standing_now(
    settings: Settings, store: Store, name: str, route: RouteSettings
) -> dict[str, Any]:
    samples = route_store.recent(store, name, route.window)
    state = route_store.states(store).get(name)
    return _standing(name, route, samples, state, dict(settings.prices), {})


def _since_change(
    settings: Settings, store: Store, name: str, route: RouteSettings
) -> dict[str, Any]:
    """The standing over the pairs graded since the route's mode last changed."""
    state = route_store.states(store).get(name)
    samples = route_store.recent(store, name, route.window)
    if state is not None:
        samples = [s for s in samples if s["created_at"] >= state["changed_at"]]
    return _standing(name, route, samples, state, dict(settings.prices), {})


def status(
    settings: Settings,
    store: Store,
    counts: Mapping[tuple[str, str], int] | None = None,
) -> list[dict[str, Any]]:
    """Every route's standing: its mode, the score over its recent pairs with a 95%
    interval, the bar and whether the evidence clears it, win/tie/loss against the
    teacher, latency and cost of both.  ``counts``: the routes' counters (dropped shadow
    calls), read from the database unless given."""
    states = route_store.states(store)
    counts = route_store.counts(store) if counts is None else counts
    rows = []
    for name, route in settings.routes.items():
        samples = route_store.recent(store, name, route.window)
        state = states.get(name)
        rows.append(_standing(name, route, samples, state, dict(settings.prices), counts))
    return rows


def _standing(
    name: str,
    route: RouteSettings,
    samples: list[dict[str, Any]],
    state: dict[str, Any] | None,
    prices: Mapping[str, Price],
    counts: Mapping[tuple[str, str], int],
) -> dict[str, Any]:
    graded = [s for s in samples if s["score"] is not None]
    scores = [float(s["score"]) for s in graded]
    teacher_scores = [float(s["teacher_score"]) for s in graded if s["teacher_score"] is not None]
    mean = low = high = None
    if scores:
        mean, low, high = (round(v, 4) for v in bootstrap(scores))
    bar: float | None = route.bar
    if route.relative:
        bar = round(route.bar * statistics.fmean(teacher_scores), 4) if teacher_scores else None
    verdict = "no evidence"
    if low is not None and high is not None and bar is not None:
        if len(scores) < route.min_samples:
            verdict = f"needs {route.min_samples - len(scores)} more"
        elif low >= bar:
            verdict = "clears the bar"
        elif high < bar:
            verdict = "below the bar"
        else:
            verdict = "undecided"
    win = sum(
        1 for s in graded if s["teacher_score"] is not None and s["score"] > s["teacher_score"]
    )
    tie = sum(
        1 for s in graded if s["teacher_score"] is not None and s["score"] == s["teacher_score"]
    )
    loss = sum(
        1 for s in graded if s["teacher_score"] is not None and s["score"] < s["teacher_score"]
    )
    student_model = route.student.partition("@")[0]
    return {
        "route": name,
        "mode": state["mode"] if state else route.mode,
        "samples": len(scores),
        "score": mean,
        "ci_low": low,
        "ci_high": high,
        "bar": bar,
        "verdict": verdict,
        "win": win,
        "tie": tie,
        "loss": loss,
        "student_errors": sum(1 for s in samples if s["status"] == "error"),
        "fallbacks": counts.get((name, "fallbacks"), 0),
        "dropped": counts.get((name, "dropped"), 0),
        "student_p50_ms": _median([s["latency_ms"] for s in samples if s["status"] == "ok"]),
        "teacher_p50_ms": _median([s["teacher_latency_ms"] for s in samples]),
        "student_cost_usd": _mean_cost(
            [(student_model, s["prompt_tokens"], s["completion_tokens"]) for s in graded], prices
        ),
        "teacher_cost_usd": _mean_cost(
            [
                (
                    s["teacher_model"] or "",
                    s["teacher_prompt_tokens"],
                    s["teacher_completion_tokens"],
                )
                for s in samples
            ],
            prices,
        ),
    }


def _mean_cost(calls: list[tuple[str, Any, Any]], prices: Mapping[str, Price]) -> float | None:
    """Mean USD per call; unknown (None) if any call's model has no price."""
    if not calls:
        return None
    costs = [cost(model, int(p or 0), int(c or 0), prices) for model, p, c in calls]
    if any(c is None for c in costs):
        return None
    return round(statistics.fmean(c for c in costs if c is not None), 8)


def _median(values: list[Any]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return round(statistics.median(present), 1) if present else None
