"""What the proxy hands a route's judge, and where the judge plugs in.

The proxy decides which calls a route covers and who answers them
(``proxy/routes.py``); in a route's shadow, asking the student, grading the pair and
storing it is the judge's (``curation/online.py``), away from the request path.
Neither imports the other: the entry point installs the judge on the proxy's app
under ``JUDGE``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from distillery.core.config import EndpointSettings, RouteSettings

# The tags a routed call carries (upstream and in the store): its route, and who answered.
ROUTE_TAG = "distillery_route"
SERVED_BY_TAG = "distillery_served_by"
# What a dataset never learns from unless asked: a student must not learn from itself,
STUDENT_ANSWERED = (SERVED_BY_TAG, "student")
# nor from the evals' own calls (the candidates' answers, made to be graded).
EVAL_TAG = ("distillery_eval", "1")


@dataclass
class Pair:
    """One request answered by the teacher and, in its shadow, by the student."""

    route: str
    record_id: str  # the teacher's call, as captured
    tenant: str
    created_at: float
    request: dict[str, Any]  # as the student is sent it
    teacher: dict[str, Any]  # the teacher's response
    teacher_latency_ms: float
    student: dict[str, Any] | None = None
    error: str | None = None  # the student's failure, when it gave no answer
    latency_ms: float | None = None
    # Who answered: MODEL@ENDPOINT, and #files:HASH when the endpoint reports the files
    # it serves (``distillery serve`` does); the evidence is this student's.
    student_id: str | None = None


# What became of a shadow pair, as the judge reports it back (and /metrics counts it).
GRADED = "graded"  # the student answered; graded and stored
STUDENT_ERROR = "student_error"  # the student failed (stored as such)
FAILED = "failed"  # the student answered but grading or storing failed (a bug, logged)
DROPPED = "dropped"  # no room in the route's queue: never asked
LOST = "lost"  # handed to a judge that crashed or stopped before settling it: never graded


class Judge(Protocol):
    """Takes a route's shadow pairs off the proxy: asks the student, grades, stores.
    The proxy calls it on its event loop, but for ``reconfigure`` (in a thread).  It is
    started with the first routes (at the proxy's start or at a reload), and may be
    reconfigured before it starts."""

    async def start(self) -> None: ...

    def submit(self, pair: Pair) -> bool:
        """Hand over a pair, never waiting; False when there is no room (dropped)."""

    async def collect(self) -> list[tuple[str, str]]:
        """``(route, outcome)`` for each pair settled since the last call, in order."""

    def standings(self) -> list[dict[str, Any]]:
        """Every route's standing (score, interval, bar), for /metrics."""

    def reconfigure(self, settings: Any) -> None:
        """The routes of a reloaded config; raises (and changes nothing) on a bad one."""

    async def close(self) -> None:
        """Stop: pairs being graded are stored, queued ones are not asked."""


JUDGE: web.AppKey[Judge] = web.AppKey("route_judge")


def student_url(endpoint: EndpointSettings) -> str:
    return endpoint.base_url.rstrip("/") + "/chat/completions"


def student_headers(endpoint: EndpointSettings) -> dict[str, str]:
    key = endpoint.api_key()
    return {"Authorization": f"Bearer {key}"} if key else {}


def served_mode(route: RouteSettings, state: Mapping[str, Any] | None) -> str:
    """The mode a route serves in: the config's when pinned or never changed, else the
    database's -- unless that was decided for another student (the config names a new
    one), which starts in shadow (or stays off)."""
    if route.pin or state is None:
        return route.mode
    student = state.get("student")
    if student is not None and str(student).partition("#")[0] != route.student:
        return "off" if route.mode == "off" else "shadow"
    return str(state["mode"])
