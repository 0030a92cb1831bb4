"""Routes: a student beside the teacher on the calls a route covers (``[routes.NAME]``).

In ``shadow`` mode the client gets the teacher's answer exactly as without a route.
Once the client has the whole answer, the pair (the request, the teacher's answer)
goes to the route's judge, which asks the student from a bounded queue, grades the
student against the teacher and stores the result, out of the request path (the
command runs it in a process of its own, so it does not share the proxy's CPU).
When the student is slow and the queue is full, the shadow call is dropped and
counted: the teacher's answer never waits on a student, and nothing queues without
limit.  What became of each pair comes back to the router at its next refresh, for
/metrics and to notice a student that is down, or back.

Grading is curation's business: the entry point installs the judge on the app
(``shadow.JUDGE``), so this package imports no grader.  Without one, routes stay
idle and say so.

A route's mode starts as configured; ``distillery routes promote|demote`` (or the
automatic policy) writes a new one to the database, which every proxy on it reads
every few seconds.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import itertools
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
import structlog

from distillery.core.config import EndpointSettings, RouteSettings, Settings
from distillery.core.shadow import (
    DROPPED,
    LOST,
    STUDENT_ERROR,
    Judge,
    Pair,
    served_mode,
    student_headers,
    student_url,
)
from distillery.proxy.metrics import Metrics
from distillery.store import Store
from distillery.store import routes as route_store

log = structlog.get_logger()
REFRESH_S = 2.0  # how often modes are read back from the database
STANDING_EVERY = 5  # refreshes between two readings of the routes' standing (10 s)
# What the teacher's request carries for OpenAI that a student is not sent.
NOT_FOR_STUDENT = ("store", "metadata", "stream", "stream_options", "service_tier")


@dataclass
class Route:
    name: str
    settings: RouteSettings
    endpoint: EndpointSettings
    mode: str

    failing_since: float | None = None  # monotonic time of the first failure in a row
    down: bool = False  # failing for down_after: the teacher answers everything

    def __post_init__(self) -> None:
        self.model = self.settings.student.partition("@")[0]
        self.url = student_url(self.endpoint)

    def matches(
        self,
        tenant: str,
        metadata: Mapping[str, str],
        fingerprint: str | None,
        model: str | None,
        app_key: str,
    ) -> bool:
        match = self.settings.match
        return (
            (not match.tenants or tenant in match.tenants)
            and (match.app is None or metadata.get(app_key) == match.app)
            and all(metadata.get(k) == v for k, v in match.tags.items())
            and (match.fingerprint is None or fingerprint == match.fingerprint)
            and (match.model is None or model == match.model)
        )

    def student_request(self, body: Mapping[str, Any]) -> dict[str, Any]:
        request = {k: v for k, v in body.items() if k not in NOT_FOR_STUDENT}
        request["model"] = self.model
        return request

    def validates_json(self, body: Mapping[str, Any]) -> bool:
        """Whether the student's answer must be JSON that parses."""
        if self.settings.validator == "auto":
            response_format = body.get("response_format")
            return isinstance(response_format, dict) and response_format.get("type") in (
                "json_object",
                "json_schema",
            )
        return self.settings.validator == "json"

    def headers(self) -> dict[str, str]:
        return student_headers(self.endpoint)


def _draw(route: Route, body: Mapping[str, Any], tenant: str, metadata: Mapping[str, str]) -> float:
    """A number in [0, 1) fixed by the call's sticky key (random for "none")."""
    sticky = route.settings.sticky
    key: str | None = None
    if sticky == "none":
        return random.random()
    if sticky == "user":
        user = body.get("user")
        key = user if isinstance(user, str) and user else None
    elif sticky == "key":
        key = tenant or None
    elif sticky.startswith("tag:"):
        key = metadata.get(sticky[4:])
    if key is None:
        key = "conversation\0" + _first_user_message(body)
    digest = hashlib.blake2b(f"{route.name}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _first_user_message(body: Mapping[str, Any]) -> str:
    messages = body.get("messages")
    for message in messages if isinstance(messages, list) else ():
        if isinstance(message, dict) and message.get("role") == "user":
            return orjson.dumps(message.get("content")).decode()
    return ""


class Router:
    def __init__(self, settings: Settings, store: Store | None, metrics: Metrics) -> None:
        self.store = store
        self.metrics = metrics
        self.app_key = settings.tagging.app_key
        self.routes = [
            Route(name, route, settings.endpoints[route.student.partition("@")[2]], route.mode)
            for name, route in settings.routes.items()
        ]
        self.judge: Judge | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._serving = False  # between start() and stop()
        self._started = False  # routes (and their judge) running: since the first routes
        # Counted here, added to the database's counters at the next refresh.
        self._unwritten: collections.Counter[tuple[str, str]] = collections.Counter()

    async def reconfigure(self, settings: Settings) -> None:
        """New routes from a reloaded config, without dropping a request: a call already
        routed keeps its route; new calls see the new ones (the judge is told apart)."""
        kept = {route.name: route for route in self.routes}
        routes = []
        for name, config in settings.routes.items():
            endpoint = settings.endpoints[config.student.partition("@")[2]]
            old = kept.get(name)
            if old is not None and old.settings.student == config.student:
                # Same student: its mode, and whether it is down, carry over.
                old.settings, old.endpoint, old.url = config, endpoint, student_url(endpoint)
                routes.append(old)
            else:
                routes.append(Route(name, config, endpoint, config.mode))
        self.routes = routes
        if self._serving and not self._started and routes:
            await self._begin()  # the first routes of a proxy started without any
        elif self._started:
            await self._refresh()
        log.info("routes reloaded", routes=[r.name for r in routes])

    def route_for(
        self,
        tenant: str,
        metadata: Mapping[str, str],
        fingerprint: str | None,
        model: str | None,
    ) -> Route | None:
        """The first route (in config order) that covers the call and is not off."""
        for route in self.routes:
            if route.mode != "off" and route.matches(
                tenant, metadata, fingerprint, model, self.app_key
            ):
                return route
        return None

    def student_answers(
        self,
        route: Route,
        body: Mapping[str, Any] | None = None,
        tenant: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> bool:
        """Whether the student takes this call: canary's fraction, all but on's holdout,
        drawn by the route's sticky key (one conversation, user or key: one model); never
        while it is down."""
        if route.down or route.mode not in ("canary", "on"):
            return False
        draw = _draw(route, body or {}, tenant, metadata or {})
        if route.mode == "canary":
            return draw < route.settings.canary
        return draw >= route.settings.holdout

    def served(self, route: Route, by: str) -> None:
        self.metrics.route_served.labels(route.name, by).inc()

    def fell_back(self, route: Route, reason: str) -> None:
        """The student failed a call it was to answer; the teacher answers instead."""
        self.metrics.route_fallbacks.labels(route.name, reason).inc()
        self._unwritten[route.name, "fallbacks"] += 1
        self.failed(route)

    def failed(self, route: Route) -> None:
        now = time.monotonic()
        if route.failing_since is None:
            route.failing_since = now
        elif not route.down and now - route.failing_since >= route.settings.down_after:
            route.down = True
            log.warning(
                "route student down: the teacher answers every call until it answers again",
                route=route.name,
                failing_for_s=round(now - route.failing_since),
            )

    def answered(self, route: Route) -> None:
        if route.down:
            log.info("route student answers again", route=route.name)
        route.failing_since, route.down = None, False

    def shadow(self, route: Route, pair: Pair) -> None:
        """Hand the pair to the judge, or drop it (counted) when it has no room."""
        if self.judge is not None and not self.judge.submit(pair):
            self._settled(route.name, DROPPED)

    def _settled(self, name: str, outcome: str) -> None:
        self.metrics.route_shadow.labels(name, outcome).inc()
        if outcome in (DROPPED, LOST):
            self._unwritten[name, "dropped"] += 1
            return
        route = next((r for r in self.routes if r.name == name), None)
        if route is not None:  # the shadow is what tells a down student is back
            self.failed(route) if outcome == STUDENT_ERROR else self.answered(route)

    async def start(self) -> None:
        self._serving = True
        if self.routes:
            await self._begin()

    async def _begin(self) -> None:
        if self.judge is None:
            log.warning(
                "routes configured but no judge installed: shadow calls are off",
                routes=[r.name for r in self.routes],
            )
        else:
            await self.judge.start()
        self._started = True
        await self._refresh()
        self._tasks.append(asyncio.get_running_loop().create_task(self._refresh_forever()))

    async def stop(self) -> None:
        self._serving = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        if self.judge is not None and self._started:
            await self.judge.close()  # pairs being graded are stored
        await self._refresh()  # the last outcomes and counts

    async def _refresh(self) -> None:
        """Read the modes back, and write what was counted since the last time."""
        if self.judge is not None:
            for name, outcome in await self.judge.collect():
                self._settled(name, outcome)
        if self.store is None:
            return
        counted, self._unwritten = self._unwritten, collections.Counter()
        try:
            await asyncio.to_thread(route_store.add_counts, self.store, dict(counted))
            states = await asyncio.to_thread(route_store.states, self.store)
        except Exception as exc:  # the database is away: keep the modes we have
            log.warning("route modes not refreshed", error=str(exc))
            self._unwritten.update(counted)
            return
        for route in self.routes:
            state = states.get(route.name)
            mode = served_mode(route.settings, state)
            if mode != route.mode:
                log.info(
                    "route mode",
                    route=route.name,
                    mode=mode,
                    was=route.mode,
                    reason=state["reason"] if state else "config",
                )
                self.metrics.route_mode.labels(route.name, mode).inc()
                route.mode = mode

    async def _refresh_forever(self) -> None:
        for turn in itertools.count(1):
            await asyncio.sleep(REFRESH_S)
            await self._refresh()
            if turn % STANDING_EVERY == 0:
                await self.publish_standing()

    async def publish_standing(self) -> None:
        """Each route's score and interval on /metrics, from the judge (when it can say)."""
        standings = getattr(self.judge, "standings", None)
        if standings is None:
            return
        try:
            rows: list[dict[str, Any]] = await asyncio.to_thread(standings)
        except Exception as exc:
            log.warning("route standing not read", error=str(exc))
            return
        for row in rows:
            for stat in ("samples", "score", "ci_low", "ci_high", "bar"):
                if row[stat] is None:  # no number rather than a made-up one
                    with contextlib.suppress(KeyError):
                        self.metrics.route_standing.remove(row["route"], stat)
                else:
                    self.metrics.route_standing.labels(row["route"], stat).set(row[stat])
