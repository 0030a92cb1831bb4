"""Routes: a student beside the teacher on the calls a route covers (``[routes.NAME]``).

In ``shadow`` mode the client gets the teacher's answer exactly as without a route.
Once the teacher's answer is in, the same request goes to the student from a bounded
queue beside the request path, never in front of it, and the pair (the teacher's
answer, the student's) goes to the route's judge, which grades the student against
the teacher and stores the result.  When the student is slow and the queue is full,
the shadow call is dropped and counted: the teacher's answer never waits on a student,
and nothing queues without limit.

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
import itertools
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import structlog

from distillery.config import EndpointSettings, RouteSettings, Settings
from distillery.proxy.metrics import Metrics
from distillery.shadow import Judge, Pair
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
    queue: asyncio.Queue[Pair] = field(init=False)

    failing_since: float | None = None  # monotonic time of the first failure in a row
    down: bool = False  # failing for down_after: the teacher answers everything

    def __post_init__(self) -> None:
        self.model = self.settings.student.partition("@")[0]
        self.url = self.endpoint.base_url.rstrip("/") + "/chat/completions"
        self.queue = asyncio.Queue(maxsize=self.settings.queue)

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
        key = self.endpoint.api_key()
        return {"Authorization": f"Bearer {key}"} if key else {}


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
        self._grading: set[asyncio.Future[None]] = set()  # pairs being graded in threads
        self._workers: dict[str, list[asyncio.Task[None]]] = {}  # each route's shadow workers
        # Counted here, added to the database's counters at the next refresh.
        self._unwritten: collections.Counter[tuple[str, str]] = collections.Counter()
        self._session: aiohttp.ClientSession | None = None

    async def reconfigure(self, settings: Settings) -> None:
        """New routes from a reloaded config, without dropping a request: a call already
        routed keeps its route; new calls see the new ones.  A route whose student, queue
        and concurrency did not change keeps its queue and workers."""
        kept = {route.name: route for route in self.routes}
        routes, stale = [], []
        for name, config in settings.routes.items():
            endpoint = settings.endpoints[config.student.partition("@")[2]]
            old = kept.pop(name, None)
            if old is not None and _same_workers(old, config, endpoint):
                old.settings, old.endpoint = config, endpoint
                routes.append(old)
                continue
            if old is not None:
                stale.append(old)
            routes.append(Route(name, config, endpoint, config.mode))
        stale.extend(kept.values())
        fresh = [r for r in routes if r not in self.routes]
        self.routes = routes
        for route in stale:
            for task in self._workers.pop(route.name, []):
                task.cancel()
        if self._session is None:  # not started: start() starts them all
            return
        for route in fresh:
            self._start_workers(route)
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

    def student_answers(self, route: Route) -> bool:
        """Whether the student takes this call: canary's fraction, all but on's holdout;
        never while it is down."""
        if route.down:
            return False
        if route.mode == "canary":
            return random.random() < route.settings.canary
        if route.mode == "on":
            return random.random() >= route.settings.holdout
        return False

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
        """Queue the student's half of a pair, or drop it (counted) when the queue is full."""
        if self.judge is None:
            return
        try:
            route.queue.put_nowait(pair)
        except asyncio.QueueFull:
            self.metrics.route_shadow.labels(route.name, "dropped").inc()
            self._unwritten[route.name, "dropped"] += 1

    async def start(self) -> None:
        if not self.routes:
            return
        if self.judge is None:
            log.warning(
                "routes configured but no judge installed: shadow calls are off",
                routes=[r.name for r in self.routes],
            )
        self._session = aiohttp.ClientSession()
        await self._refresh()
        self._tasks.append(asyncio.get_running_loop().create_task(self._refresh_forever()))
        for route in self.routes:
            self._start_workers(route)

    def _start_workers(self, route: Route) -> None:
        loop = asyncio.get_running_loop()
        self._workers[route.name] = [
            loop.create_task(self._work(route)) for _ in range(route.settings.concurrency)
        ]

    async def stop(self) -> None:
        tasks = [*self._tasks, *(t for workers in self._workers.values() for t in workers)]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self._workers.clear()
        await asyncio.gather(*self._grading, return_exceptions=True)
        close = getattr(self.judge, "close", None)
        if close is not None:
            close()
        if self._session is not None:
            await self._session.close()
        await self._refresh()  # the last counts

    async def _refresh(self) -> None:
        """Read the modes back, and write what was counted since the last time."""
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
            mode = state["mode"] if state else route.settings.mode
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

    async def _work(self, route: Route) -> None:
        while True:
            pair = await route.queue.get()
            try:
                await self._ask_student(route, pair)
                # The shadow is what tells a down student is back.
                if pair.error:
                    self.failed(route)
                else:
                    self.answered(route)
                judge = self.judge
                if judge is not None:
                    grading = asyncio.ensure_future(asyncio.to_thread(judge, pair))
                    self._grading.add(grading)
                    grading.add_done_callback(self._grading.discard)
                    await asyncio.shield(grading)  # on stop, the pair is still stored
                outcome = "student_error" if pair.error else "graded"
            except Exception:  # a bug in grading: logged, and the next pair goes on
                log.exception("shadow pair failed", route=route.name)
                outcome = "failed"
            self.metrics.route_shadow.labels(route.name, outcome).inc()

    async def _ask_student(self, route: Route, pair: Pair) -> None:
        assert self._session is not None
        started = time.perf_counter()
        wait = route.settings.timeout  # for the connection, then between bytes
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=wait, sock_read=wait)
        try:
            async with self._session.post(
                route.url, json=pair.request, headers=route.headers(), timeout=timeout
            ) as answer:
                body = await answer.json(content_type=None)
                if answer.status >= 400 or not isinstance(body, dict) or "error" in body:
                    pair.error = f"HTTP {answer.status}: {str(body)[:300]}"
                else:
                    pair.student = body
        except TimeoutError:
            pair.error = "timed out"
        except (aiohttp.ClientError, ValueError) as exc:
            pair.error = f"{type(exc).__name__}: {exc}"[:300]
        pair.latency_ms = round((time.perf_counter() - started) * 1000, 3)


def _same_workers(route: Route, config: RouteSettings, endpoint: EndpointSettings) -> bool:
    """Whether a reloaded route can keep the route's queue and shadow workers."""
    old = route.settings
    return (
        endpoint.base_url == route.endpoint.base_url
        and config.student == old.student
        and (config.queue, config.concurrency) == (old.queue, old.concurrency)
    )
