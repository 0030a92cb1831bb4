"""What a route's judge does, on an event loop of its own: asks each route's student
(from a bounded queue, ``concurrency`` at a time), grades its answer against the
teacher's with the route's graders (:class:`Grading`), stores the pair redacted, runs
the automatic policy, and reports what became of each pair.

:mod:`distillery.curation.judge` is the proxy's side: it hands the pairs over and runs
this in a process (or a thread) of its own.  This module is imported there only, and
only once there are routes: the graders and the openai SDK are not for a proxy
without routes to load.
"""

from __future__ import annotations

import asyncio
import queue
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
import structlog

from distillery.core.config import Settings
from distillery.core.errors import DistilleryError
from distillery.core.redact import Redactor
from distillery.core.shadow import (
    DROPPED,
    FAILED,
    GRADED,
    STUDENT_ERROR,
    Pair,
    student_headers,
    student_url,
)
from distillery.curation.endpoints import Endpoint, configured
from distillery.curation.evals.generate import Candidate, Generation, Generator
from distillery.curation.evals.graders import Context, Grader, load_all
from distillery.curation.evals.items import REPLAYED, Item
from distillery.curation.judge_wire import CLOSE_S, FRAME
from distillery.curation.online import apply_pins, decide, observe
from distillery.store import Store
from distillery.store import routes as route_store

log = structlog.get_logger()
POLICY_S = 1.0  # the automatic policy looks at a route at most this often
POLICY_SHARE = 10  # ...and waits ten times as long as its last look took
REPORT_S = 0.2  # how often the judge reports what became of its pairs
IDENTIFY_S = 30.0  # how often a route's student is asked which files it serves

Report = Callable[[str, str, str], None]  # (route, outcome, the pair's record id)


class Grading:
    """Grades a pair with its route's graders and stores it (and runs the automatic
    policy).  The teacher's answer is graded the same way, against itself (1 for a
    reference grader, a tie for a pairwise judge): a relative bar and win/tie/loss
    compare with it."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self.store = store
        self._decided: dict[str, float] = {}
        # Graded on what was said, stored as the captured calls are: redacted.
        self.redact = Redactor.from_settings(
            settings.redact.defaults, [(p.name, p.pattern) for p in settings.redact.patterns]
        )
        self.reconfigure(settings)

    def reconfigure(self, settings: Settings) -> None:
        """The routes, graders and endpoints of a (re)loaded config.  Graders load here,
        so a bad one stops the proxy at start, or leaves a reload undone, not a pair at a
        time."""
        graders = {name: load_all(route.graders) for name, route in settings.routes.items()}
        endpoints = configured(settings)
        self.context = Context(Generator(self.store), endpoints, Endpoint.from_env("default"))
        self.settings, self.graders, self.endpoints = settings, graders, endpoints
        try:
            apply_pins(settings, self.store)
        except Exception as exc:  # the database is away: the proxies follow the config anyway
            log.warning("pinned route modes not written", error=str(exc))

    async def __call__(self, pair: Pair) -> None:
        settings = self.settings
        route = settings.routes.get(pair.route)
        if route is None:  # the route went in a reload while its pair waited
            return
        scores: dict[str, float | None] = {}
        teacher: dict[str, float | None] = {}
        if pair.student is not None:
            scores, teacher = await self._grade(pair, self.graders.get(pair.route, []))
        await asyncio.to_thread(self._store, settings, pair, scores, teacher)

    def _store(
        self,
        settings: Settings,
        pair: Pair,
        scores: dict[str, float | None],
        teacher: dict[str, float | None],
    ) -> None:
        route = settings.routes[pair.route]
        usage = (pair.student or {}).get("usage") or {}
        teacher_usage = pair.teacher.get("usage") or {}
        route_store.add_sample(
            self.store,
            {
                "id": pair.record_id,
                "route": pair.route,
                "tenant": pair.tenant,
                "created_at": _utc(pair.created_at),
                "student_model": route.student.partition("@")[0],
                "student": pair.student_id or route.student,
                "status": "error" if pair.student is None else "ok",
                "error": self.redact.text(pair.error) if pair.error else None,
                "response": self.redact(pair.student),
                "latency_ms": pair.latency_ms,
                "prompt_tokens": _int(usage.get("prompt_tokens")),
                "completion_tokens": _int(usage.get("completion_tokens")),
                "teacher_model": _string(pair.teacher.get("model")),
                "teacher_latency_ms": pair.teacher_latency_ms,
                "teacher_prompt_tokens": _int(teacher_usage.get("prompt_tokens")),
                "teacher_completion_tokens": _int(teacher_usage.get("completion_tokens")),
                "scores": scores,
                "score": _mean(scores),
                "teacher_score": _mean(teacher),
            },
        )
        observe(settings, self.store, pair.route, pair.student_id or route.student)
        if route.auto:
            self._decide(settings, pair.route)

    def _decide(self, settings: Settings, name: str) -> None:
        """The automatic policy, at most every POLICY_S per route, and never more than a
        tenth of the judge's time: it reads the route's whole evidence, which grows."""
        now = time.monotonic()
        if now < self._decided.get(name, float("-inf")):
            return
        try:
            decide(settings, self.store, name)
        except DistilleryError as exc:  # e.g. promotion refused after a race: said, not raised
            log.info("route policy", route=name, outcome=str(exc))
        took = time.monotonic() - now
        self._decided[name] = now + max(POLICY_S, POLICY_SHARE * took)

    async def _grade(
        self, pair: Pair, graders: list[Grader]
    ) -> tuple[dict[str, float | None], dict[str, float | None]]:
        route = self.settings.routes[pair.route]
        request = pair.request
        item = Item(
            0,
            list(request.get("messages") or []),
            _message(pair.teacher) or {},
            {key: request[key] for key in REPLAYED if key in request},
        )
        model, _, endpoint = route.student.partition("@")
        candidate = Candidate(route.student, model, self.endpoints[endpoint])
        student = Generation(
            _message(pair.student or {}), {}, pair.latency_ms, cached=False, error=pair.error
        )
        reference = Generation(_message(pair.teacher), {}, pair.teacher_latency_ms, cached=False)
        scores: dict[str, float | None] = {}
        teacher: dict[str, float | None] = {}
        for grader in graders:
            scores[grader.name] = (await grader.grade(student, item, candidate, self.context)).score
            teacher[grader.name] = (
                await grader.grade(reference, item, candidate, self.context)
            ).score
        return scores, teacher


@dataclass
class _Lane:
    """One route's queue and the workers that ask its student."""

    # Two lanes are equal when one's queue and workers can serve the other.
    url: str
    headers: dict[str, str]
    size: int
    concurrency: int
    student: str  # MODEL@ENDPOINT as configured
    timeout: float = field(compare=False)
    queue: asyncio.Queue[Pair] = field(init=False, compare=False)
    workers: list[asyncio.Task[None]] = field(default_factory=list, compare=False)
    identity: str | None = field(default=None, compare=False)  # as the endpoint reports it
    identified: float = field(default=float("-inf"), compare=False)  # monotonic, when

    def __post_init__(self) -> None:
        self.queue = asyncio.Queue(maxsize=self.size)


def _lanes(settings: Settings) -> dict[str, _Lane]:
    lanes = {}
    for name, route in settings.routes.items():
        endpoint = settings.endpoints[route.student.partition("@")[2]]
        lanes[name] = _Lane(
            student_url(endpoint),
            student_headers(endpoint),
            route.queue,
            route.concurrency,
            route.student,
            route.timeout,
        )
    return lanes


class Runtime:
    """Asks each route's student, grades and stores the pairs; on one event loop."""

    def __init__(self, settings: Settings, store: Store, report: Report) -> None:
        self.grading = Grading(settings, store)
        self.report = report
        self.lanes: dict[str, _Lane] = {}
        self._busy: set[asyncio.Future[None]] = set()  # pairs being graded and stored
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession()
        self._replace_lanes(_lanes(self.grading.settings))

    def take(self, pair: Pair) -> None:
        lane = self.lanes.get(pair.route)
        if lane is None:  # the route went in a reload
            return
        try:
            lane.queue.put_nowait(pair)
        except asyncio.QueueFull:
            self.report(pair.route, DROPPED, pair.record_id)

    def reconfigure(self, settings: Settings) -> None:
        """A reloaded config: a route whose student, queue and concurrency did not change
        keeps its queue and workers."""
        try:
            self.grading.reconfigure(settings)
        except Exception as exc:  # checked by the proxy before it was sent: not expected
            log.error("judge not reconfigured", error=str(exc))
            return
        self._replace_lanes(_lanes(settings))

    def _replace_lanes(self, lanes: dict[str, _Lane]) -> None:
        loop = asyncio.get_running_loop()
        for name, lane in lanes.items():
            old = self.lanes.pop(name, None)
            if old is not None and old == lane:
                old.timeout = lane.timeout
                lanes[name] = old
                continue
            if old is not None:
                self._cancel(old)
            lane.workers = [
                loop.create_task(self._work(name, lane)) for _ in range(lane.concurrency)
            ]
        for old in self.lanes.values():  # routes that went
            self._cancel(old)
        self.lanes = lanes

    @staticmethod
    def _cancel(lane: _Lane) -> None:
        for task in lane.workers:
            task.cancel()

    async def stop(self) -> None:
        """Queued pairs are not asked; those being graded are stored (within CLOSE_S)."""
        workers = [task for lane in self.lanes.values() for task in lane.workers]
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        if self._busy:
            await asyncio.wait(self._busy, timeout=CLOSE_S)
        if self._session is not None:
            await self._session.close()

    async def _work(self, name: str, lane: _Lane) -> None:
        while True:
            pair = await lane.queue.get()
            try:
                pair.student_id = await self._identify(lane)
                await self._ask(lane, pair)
                grading = asyncio.ensure_future(self.grading(pair))
                self._busy.add(grading)
                grading.add_done_callback(self._busy.discard)
                await asyncio.shield(grading)  # on stop, the pair is still stored
                outcome = STUDENT_ERROR if pair.error else GRADED
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug in grading or a database away: logged, and on
                log.exception("shadow pair failed", route=name)
                outcome = STUDENT_ERROR if pair.error else FAILED
            self.report(name, outcome, pair.record_id)

    async def _identify(self, lane: _Lane) -> str:
        """The student as its endpoint serves it now: ``MODEL@ENDPOINT``, with
        ``#files:HASH`` when ``/models`` reports the served files' content hash (as
        ``distillery serve`` does), so new files under the same name are a new student.
        Asked again every IDENTIFY_S."""
        if time.monotonic() - lane.identified < IDENTIFY_S and lane.identity is not None:
            return lane.identity
        assert self._session is not None
        model = lane.student.partition("@")[0]
        models_url = lane.url.removesuffix("/chat/completions") + "/models"
        found = lane.student
        try:
            timeout = aiohttp.ClientTimeout(total=lane.timeout)
            async with self._session.get(models_url, headers=lane.headers, timeout=timeout) as got:
                listing = await got.json(content_type=None) if got.status == 200 else {}
            for entry in listing.get("data") or [] if isinstance(listing, dict) else []:
                if isinstance(entry, dict) and entry.get("id") == model:
                    digest = entry.get("distillery_model_hash")
                    if isinstance(digest, str) and digest:
                        found = f"{lane.student}#files:{digest[:16]}"
        except (aiohttp.ClientError, TimeoutError, ValueError):
            found = lane.identity or lane.student  # unknown now: as last seen
        if found != lane.identity and lane.identity is not None:
            log.warning("route student changed", student=found, was=lane.identity)
        lane.identity, lane.identified = found, time.monotonic()
        return found

    async def _ask(self, lane: _Lane, pair: Pair) -> None:
        assert self._session is not None
        started = time.perf_counter()
        wait = lane.timeout  # for the connection, then between bytes
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=wait, sock_read=wait)
        try:
            async with self._session.post(
                lane.url, json=pair.request, headers=lane.headers, timeout=timeout
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


class _Frames(asyncio.Protocol):
    """The judge's end of the pairs pipe: length-prefixed JSON pairs, to ``take``."""

    def __init__(self, take: Callable[[Pair], None], ended: asyncio.Event) -> None:
        self.take, self.ended = take, ended
        self.buffer = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= FRAME.size:
            (size,) = FRAME.unpack_from(self.buffer)
            if len(self.buffer) < FRAME.size + size:
                return
            frame = bytes(self.buffer[FRAME.size : FRAME.size + size])
            del self.buffer[: FRAME.size + size]
            self.take(Pair(**orjson.loads(frame)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended.set()  # the proxy closed its end, or is gone


def run(
    settings: Settings,
    store: Store,
    pairs_fd: int,
    control: Any,
    outcomes: Any,
    ready: Any = None,
) -> None:
    """Serve the runtime until the proxy says stop on ``control``, or its end of the
    pairs pipe closes (it stopped, or died): pairs from the pipe, reloaded settings from
    ``control``, what became of the pairs put on ``outcomes`` in batches."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        loop = asyncio.new_event_loop()
    else:
        loop = uvloop.new_event_loop()

    async def main() -> None:
        settled: list[tuple[str, str, str]] = []
        runtime = Runtime(settings, store, lambda *outcome: settled.append(outcome))
        await runtime.start()
        stop = asyncio.Event()
        running = threading.Event()
        running.set()

        def commands() -> None:
            while running.is_set():
                try:
                    item = control.get(timeout=0.5)
                except queue.Empty:
                    continue
                try:
                    if item is None:
                        loop.call_soon_threadsafe(stop.set)
                        return
                    loop.call_soon_threadsafe(runtime.reconfigure, item)
                except RuntimeError:  # the loop closed meanwhile: stopped already
                    return

        def report() -> None:
            if settled:
                outcomes.put(settled.copy())
                settled.clear()

        async def report_forever() -> None:
            while True:
                await asyncio.sleep(REPORT_S)
                report()

        reader = threading.Thread(target=commands, name="judge-control", daemon=True)
        reader.start()
        pipe, _ = await loop.connect_read_pipe(
            lambda: _Frames(runtime.take, stop),
            open(pairs_fd, "rb", buffering=0),  # noqa: SIM115 - the transport closes it
        )
        reporting = loop.create_task(report_forever())
        if ready is not None:
            ready.set()
        try:
            await stop.wait()
        finally:
            running.clear()
            pipe.close()
            await runtime.stop()
            reporting.cancel()
            report()

    try:
        loop.run_until_complete(main())
    finally:
        loop.close()


def check(settings: Settings) -> None:
    """Raise, naming the problem, when the routes' graders or endpoints do not load, or a
    grader does not score 0..1 (a route's bar and bounds are on that scale)."""
    for name, route in settings.routes.items():
        for grader in load_all(route.graders):
            low, high = grader.scale()
            if (low, high) != (0, 1):
                raise DistilleryError(
                    f"Route {name!r}: grader {grader.name!r} scores {low:g}..{high:g}; a "
                    "route's graders must score 0..1 (the bar and its bounds are on that scale)."
                )
    configured(settings)


def _mean(scores: Mapping[str, float | None]) -> float | None:
    if not scores or any(v is None for v in scores.values()):
        return None
    return statistics.fmean(v for v in scores.values() if v is not None)


def _message(response: Mapping[str, Any]) -> dict[str, Any] | None:
    choices = response.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        return message if isinstance(message, dict) else None
    return None


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)
