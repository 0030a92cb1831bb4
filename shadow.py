"""What the proxy hands a route's judge, and where the judge plugs in.

The proxy calls a route's student beside the teacher (``proxy/routes.py``); grading
the pair is curation's (``curation/online.py``).  Neither imports the other: the
entry point installs the judge on the proxy's app under ``JUDGE``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

# The tags a routed call carries (upstream and in the store): its route, and who answered.
ROUTE_TAG = "distillery_route"
SERVED_BY_TAG = "distillery_served_by"
# What a dataset never learns from unless asked: a student must not learn from itself.
STUDENT_ANSWERED = (SERVED_BY_TAG, "student")


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


# Grades a pair and stores it; called in a worker thread, one pair at a time per call.
Judge = Callable[[Pair], None]
JUDGE: web.AppKey[Judge] = web.AppKey("route_judge")
