"""Online evals: a route's student graded against the teacher on live traffic.

The pairs are graded and stored by the route's judge (``judging.py``).  Here:
:func:`status` turns a route's evidence into its score, anytime-valid bounds and
verdict against the bar (:mod:`.route_policy`), and the policy (:func:`promote`,
:func:`demote`, :func:`set_mode`, and :func:`decide` for ``auto`` routes) moves a
route's mode on that evidence.

Evidence is the current student's pairs since the route's mode last changed: a failed
student call scores 0 (it counts against promotion), a pair whose grader failed is left
out.  A new student (another model, or new files served under the same name) starts
in shadow with none (:func:`observe`).  A route whose config says ``pin = true`` keeps
the config's mode: commands and the automatic policy leave it alone.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import structlog

from distillery.core.config import Price, RouteSettings, Settings
from distillery.core.errors import DistilleryError
from distillery.core.prices import cost
from distillery.core.shadow import served_mode
from distillery.curation import route_policy
from distillery.store import Store
from distillery.store import routes as route_store

log = structlog.get_logger()
STATUS_COLUMNS = (
    "route",
    "mode",
    "pinned",
    "reason",
    "changed_at",
    "student",
    "samples",
    "student_errors",
    "score",
    "ci_low",
    "ci_high",
    "bar",
    "verdict",
    "win",
    "tie",
    "loss",
    "fallbacks",
    "dropped",
    "student_p50_ms",
    "teacher_p50_ms",
    "student_cost_usd",
    "teacher_cost_usd",
)
EVIDENCE_LIMIT = 100_000  # the most pairs a decision reads (the newest)
MODES = ("off", "shadow", "canary", "on")  # the ladder, bottom to top
DEMOTING = ("below the bar", "drifted below the bar", "too many errors", "scores changed")


def promote(settings: Settings, store: Store, name: str, reason: str) -> tuple[str, str]:
    """One step up (off, shadow, canary, on); returns (was, now).  Into canary or on only
    on the evidence since the mode last changed: at least min_samples pairs, errors within
    max_error_rate, and the score's lower bound clearing the bar."""
    route = _route(settings, name)
    standing = _standing_now(settings, store, name, route)
    was = standing["mode"]
    _unpinned(route, name)
    if was == "on":
        raise DistilleryError(f"Route {name!r} is already on.")
    now = MODES[MODES.index(was) + 1]
    if now in ("canary", "on") and standing["verdict"] != "clears the bar":
        raise DistilleryError(
            f"Route {name!r} stays in {was}: {standing['verdict']} ({_evidence(standing)}). "
            f"Promotion needs at least {route.min_samples} graded pairs since the mode last "
            "changed, errors within max_error_rate and the lower bound of the score at or "
            "above the bar (or `distillery routes set` to override)."
        )
    _write(store, name, now, reason, standing["student"], was)
    return was, now


def demote(settings: Settings, store: Store, name: str, reason: str) -> tuple[str, str]:
    """One step down (on, canary, shadow, off); returns (was, now)."""
    route = _route(settings, name)
    standing = _standing_now(settings, store, name, route)
    was = standing["mode"]
    _unpinned(route, name)
    if was == "off":
        raise DistilleryError(f"Route {name!r} is already off.")
    now = MODES[MODES.index(was) - 1]
    _write(store, name, now, reason, standing["student"], was)
    return was, now


def set_mode(
    settings: Settings, store: Store, name: str, mode: str, reason: str
) -> tuple[str, str]:
    """Any mode in one step, evidence or not (the operator's override; ``off`` is the kill
    switch); returns (was, now).  A pinned route is changed in its config only."""
    route = _route(settings, name)
    if mode not in MODES:
        raise DistilleryError(f"No mode {mode!r}: use one of {', '.join(MODES)}.")
    _unpinned(route, name)
    standing = _standing_now(settings, store, name, route)
    _write(store, name, mode, reason, standing["student"], standing["mode"])
    return standing["mode"], mode


def switch_off(settings: Settings, store: Store, name: str, reason: str) -> tuple[str, str]:
    """Straight to off from any mode (the teacher answers everything); returns (was, now)."""
    return set_mode(settings, store, name, "off", reason)


def decide(settings: Settings, store: Store, name: str) -> tuple[str, str] | None:
    """The automatic policy for one route: up a step when the evidence clears the bar,
    back to shadow when it falls below, drifts below or fails too often; ``None`` when
    nothing changes (and always for a pinned route)."""
    route = _route(settings, name)
    if route.pin:
        return None
    standing = _standing_now(settings, store, name, route)
    mode, verdict = standing["mode"], standing["verdict"]
    if mode in ("canary", "on") and verdict.startswith(DEMOTING):
        reason = f"automatic: {_evidence(standing)}, {verdict}"
        _write(store, name, "shadow", reason, standing["student"], mode)
        return mode, "shadow"
    if mode in ("shadow", "canary") and verdict == "clears the bar":
        now = MODES[MODES.index(mode) + 1]
        _write(store, name, now, f"automatic: {_evidence(standing)}", standing["student"], mode)
        return mode, now
    return None


def observe(settings: Settings, store: Store, name: str, student: str) -> None:
    """The judge saw ``student`` answer for the route: when its mode was decided for
    another student, the route starts over in shadow (or its pinned mode)."""
    route = settings.routes.get(name)
    state = route_store.states(store).get(name)
    if route is None or state is None or state["student"] in (None, student):
        return
    mode = route.mode if route.pin else ("off" if state["mode"] == "off" else "shadow")
    reason = f"new student {student}: evidence starts over"
    _write(store, name, mode, reason, student, state["mode"])


def apply_pins(settings: Settings, store: Store) -> None:
    """Write each pinned route's configured mode (so ``routes status`` says why and since
    when); the proxies follow the config at once."""
    states = route_store.states(store)
    for name, route in settings.routes.items():
        state = states.get(name)
        if route.pin and (state is None or state["mode"] != route.mode):
            was = state["mode"] if state else route.mode
            student = state["student"] if state else None
            _write(store, name, route.mode, "pinned in the config", student, was)


def _write(store: Store, name: str, mode: str, reason: str, student: str | None, was: str) -> None:
    route_store.set_mode(store, name, mode, reason, student)
    event = "route promoted" if MODES.index(mode) > MODES.index(was) else "route demoted"
    if mode == was:
        event = "route mode set"
    (log.warning if mode == "off" or event == "route demoted" else log.info)(
        event, route=name, mode=mode, was=was, reason=reason, student=student
    )


def _unpinned(route: RouteSettings, name: str) -> None:
    if route.pin:
        raise DistilleryError(
            f"Route {name!r} is pinned to {route.mode} in the config: change its mode there "
            "(or remove pin) and reload."
        )


def _evidence(standing: dict[str, Any]) -> str:
    if standing["score"] is None:
        return "no graded pairs"
    low, high = standing["ci_low"], standing["ci_high"]
    bounds = "no bounds" if low is None or high is None else f"[{low:.3f}, {high:.3f}]"
    return (
        f"score {standing['score']:.3f} {bounds} over {standing['samples']} pairs "
        f"({standing['student_errors']} errors), bar {standing['bar']}"
    )


def _route(settings: Settings, name: str) -> RouteSettings:
    if name not in settings.routes:
        known = ", ".join(sorted(settings.routes)) or "none"
        raise DistilleryError(f"No route {name!r} in the config (routes: {known}).")
    return settings.routes[name]


def _standing_now(
    settings: Settings, store: Store, name: str, route: RouteSettings
) -> dict[str, Any]:
    state = route_store.states(store).get(name)
    return _standing(settings, store, name, route, state, {})


def status(
    settings: Settings,
    store: Store,
    counts: Mapping[tuple[str, str], int] | None = None,
) -> list[dict[str, Any]]:
    """Every route's standing: its mode (and why, since when), its student, the score over
    the evidence with anytime-valid bounds, the bar and the verdict, win/tie/loss against
    the teacher, latency and cost of both.  ``counts``: the routes' counters (fallbacks,
    dropped shadow calls), read from the database unless given."""
    states = route_store.states(store)
    counts = route_store.counts(store) if counts is None else counts
    return [
        _standing(settings, store, name, route, states.get(name), counts)
        for name, route in settings.routes.items()
    ]


def student_of(store: Store, name: str, route: RouteSettings, state: dict[str, Any] | None) -> str:
    """The route's current student: as its state names it, else as its newest pair does,
    else as the config does (``MODEL@ENDPOINT``)."""
    for candidate in (state["student"] if state else None, route_store.newest_student(store, name)):
        if candidate is not None and candidate.partition("#")[0] == route.student:
            return candidate
    return route.student


def _standing(
    settings: Settings,
    store: Store,
    name: str,
    route: RouteSettings,
    state: dict[str, Any] | None,
    counts: Mapping[tuple[str, str], int],
) -> dict[str, Any]:
    student = student_of(store, name, route, state)
    mode = served_mode(route, state)
    decided_for_this = state is not None and state.get("student") in (None, student)
    since: datetime | None = state["changed_at"] if state and decided_for_this else None
    slice_tag = route.by[4:] if route.by else None
    samples = route_store.evidence(
        store, name, student, since, EVIDENCE_LIMIT, slice_tag, scores_only=True
    )
    used = [s for s in samples if s["status"] == "error" or s["score"] is not None]
    scores, errors = _scores(used)
    graded = [s for s in used if s["status"] != "error"]
    teacher_scores = [float(s["teacher_score"]) for s in graded if s["teacher_score"] is not None]
    alpha = 1 - route.confidence
    bounds = route_policy.bounds(scores, alpha)
    bar: float | None = route.bar
    if route.relative:
        bar = round(route.bar * statistics.fmean(teacher_scores), 4) if teacher_scores else None
    verdict = _verdict(route, bounds, bar, errors, mode, scores)
    slices = _slices(route, used, bar, mode) if slice_tag else {}
    verdict = _with_slices(verdict, slices, slice_tag)
    recent = route_store.evidence(store, name, student, since, route.window)
    return {
        "route": name,
        "mode": mode,
        "pinned": route.pin,
        "reason": state["reason"] if state else "config",
        "changed_at": state["changed_at"] if state else None,
        "student": student,
        "samples": bounds.n,
        "student_errors": errors,
        "score": None if bounds.mean is None else round(bounds.mean, 4),
        "ci_low": bounds.low,
        "ci_high": bounds.high,
        "bar": bar,
        "verdict": verdict,
        **({"slices": slices} if slice_tag else {}),
        **_against_teacher(graded),
        "fallbacks": counts.get((name, "fallbacks"), 0),
        "dropped": counts.get((name, "dropped"), 0),
        **_latency_and_cost(route, recent, dict(settings.prices)),
    }


def _scores(used: list[dict[str, Any]]) -> tuple[list[float], int]:
    """The evidence's scores (a failed call scores 0), and how many calls failed."""
    scores = [0.0 if s["status"] == "error" else float(s["score"]) for s in used]
    return scores, sum(1 for s in used if s["status"] == "error")


def _slices(
    route: RouteSettings, used: list[dict[str, Any]], bar: float | None, mode: str
) -> dict[str, dict[str, Any]]:
    """Each slice's evidence, bounds and verdict (``by = "tag:KEY"``): the tag's value on
    the teacher's call, "(untagged)" without one."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for sample in used:
        groups.setdefault(sample.get("slice") or "(untagged)", []).append(sample)
    slices = {}
    for value, members in sorted(groups.items()):
        scores, errors = _scores(members)
        bounds = route_policy.bounds(scores, 1 - route.confidence)
        slices[value] = {
            "samples": bounds.n,
            "student_errors": errors,
            "score": None if bounds.mean is None else round(bounds.mean, 4),
            "ci_low": bounds.low,
            "ci_high": bounds.high,
            "verdict": _verdict(route, bounds, bar, errors, mode, scores),
        }
    return slices


def _with_slices(verdict: str, slices: dict[str, dict[str, Any]], tag: str | None) -> str:
    """The route's verdict once each slice has had its say: it clears the bar only when
    every slice does; any slice that fails, or is still short, is named."""
    if not slices or verdict.startswith(DEMOTING):
        return verdict
    for wanted in (DEMOTING, ("needs", "undecided", "no evidence")):
        for value, standing in slices.items():
            if standing["verdict"].startswith(wanted):
                return f"{standing['verdict']} in {tag}={value}"
    return verdict


def _verdict(
    route: RouteSettings,
    bounds: route_policy.Bounds,
    bar: float | None,
    errors: int,
    mode: str,
    scores: list[float],
) -> str:
    if bounds.n == 0 or bar is None:
        return "no evidence"
    if bounds.n < route.min_samples:
        return f"needs {route.min_samples - bounds.n} more"
    if errors > route.max_error_rate * bounds.n:
        return "too many errors"
    serving = mode in ("canary", "on")
    # The bounds assume one mean all along; serving, a change is looked for first.
    if serving and route_policy.drifted(scores, bar, 1 - route.confidence):
        return "drifted below the bar"
    if bounds.low is None or bounds.high is None:
        return "scores changed"
    if bounds.low >= bar:
        return "clears the bar"
    if bounds.high < bar:
        return "below the bar"
    return "undecided"


def _against_teacher(graded: list[dict[str, Any]]) -> dict[str, int]:
    compared = [s for s in graded if s["teacher_score"] is not None and s["score"] is not None]
    return {
        "win": sum(1 for s in compared if s["score"] > s["teacher_score"]),
        "tie": sum(1 for s in compared if s["score"] == s["teacher_score"]),
        "loss": sum(1 for s in compared if s["score"] < s["teacher_score"]),
    }


def _latency_and_cost(
    route: RouteSettings, samples: list[dict[str, Any]], prices: Mapping[str, Price]
) -> dict[str, float | None]:
    """Over the newest ``window`` pairs."""
    student_model = route.student.partition("@")[0]
    graded = [s for s in samples if s["score"] is not None]
    return {
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
