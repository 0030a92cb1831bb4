"""A route's shadow pairs judged away from the proxy's request path.

The proxy hands each pair over (:meth:`Judge.submit`, never waiting) and goes on.
The judge's runtime (:mod:`distillery.curation.judging`), on an event loop of its
own, asks the student, grades its answer against the teacher's, stores the pair
redacted, and reports what became of it; the proxy collects those reports at its
next refresh.

``distillery proxy`` runs the runtime in a process of its own
(:class:`ProcessJudge`, :func:`install`): the student's answer is read, graded and
stored on another core, so a route in shadow does not slow the calls the proxy
answers.  :class:`ThreadJudge` (:func:`install_in_thread`) runs the same runtime in
a thread of the proxy's process, where a second process is not worth its start (tests,
embedding).

Every proxy that captures gets a judge; it starts with the first routes, at start or
at a reload (SIGHUP) that brings them.  This module stays light for that reason: the
runtime, the graders and what they import load when the judge starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import queue
import signal
import threading
from typing import Any

import orjson
import structlog
from aiohttp import web

from distillery.core import logs
from distillery.core.config import Settings
from distillery.core.shadow import GRADED, JUDGE, LOST, STUDENT_ERROR, Judge, Pair
from distillery.curation.judge_wire import CLOSE_S, FRAME
from distillery.store import Store
from distillery.store import routes as route_store
from distillery.store.db import create_engine

log = structlog.get_logger()
PAIR_BYTES = 16 * 2**20  # pairs handed over and not yet read by the judge, at most
# The judge's CPU priority: below the proxy's, yet not starved.  Measured with every core
# busy at niceness 0 (bench/judge_share.py): niceness 19 leaves the judge 4% of what it gets
# on an idle machine (its start, importing the graders, took 20 s on a busy one), 10 about
# 10%, 5 a third.  10: a small share the proxy's load cannot take away, and most of the CPU
# still the proxy's.  (A judge starved while it held SQLite's write lock would also stall
# the proxy's capture.)
JUDGE_NICENESS = 10


def install(app: web.Application, settings: Settings, store: Store | None) -> None:
    """The proxy's extension: judge its routes' shadow pairs in a process of its own
    (started with the first routes)."""
    if store is not None:
        judge: Judge = ProcessJudge(settings, store)
        app[JUDGE] = judge


def install_in_thread(app: web.Application, settings: Settings, store: Store | None) -> None:
    """As :func:`install`, with the runtime in a thread of the proxy's process."""
    if store is not None:
        judge: Judge = ThreadJudge(settings, store)
        app[JUDGE] = judge


class _Host:
    """What the proxy holds: writes pairs into the judge's pipe from the proxy's event
    loop (one write, no thread, never waiting: a full pipe buffers up to a bound, then
    pairs are dropped), collects outcomes, says standings."""

    control: Any = None
    outcome_queue: Any = None

    def __init__(self, settings: Settings, store: Store) -> None:
        _check(settings)  # a grader that does not load stops the proxy here
        self.settings = settings
        self.store = store
        self._pipe: asyncio.WriteTransport | None = None
        # Pairs handed over and not yet settled (record id -> route): what a judge that
        # crashes or stops takes with it, counted as lost rather than forgotten.
        self._unsettled: dict[str, str] = {}
        self._leftover: list[tuple[str, str]] = []

    async def _open_pipe(self) -> int:
        """A new pipe; its write end on this loop; the read end's fd, for the judge."""
        read, write = os.pipe()
        loop = asyncio.get_running_loop()
        self._pipe, _ = await loop.connect_write_pipe(
            asyncio.Protocol,
            open(write, "wb", buffering=0),  # noqa: SIM115 - the transport closes it
        )
        return read

    def submit(self, pair: Pair) -> bool:
        pipe = self._pipe
        if pipe is None or pipe.is_closing() or pipe.get_write_buffer_size() > PAIR_BYTES:
            return False
        try:
            frame = orjson.dumps(pair)
        except orjson.JSONEncodeError:  # e.g. an integer past 64 bits: not for the student
            return False
        pipe.write(FRAME.pack(len(frame)) + frame)
        self._unsettled[pair.record_id] = pair.route
        return True

    async def collect(self) -> list[tuple[str, str]]:
        settled, self._leftover = self._leftover, []
        if self.outcome_queue is None:
            return settled
        with contextlib.suppress(queue.Empty):
            while True:
                for route, outcome, record_id in self.outcome_queue.get_nowait():
                    self._unsettled.pop(record_id, None)
                    settled.append((route, outcome))
        return settled

    async def _settle_the_rest(self) -> list[tuple[str, str]]:
        """The judge is gone: each pair it was handed and never reported is graded when
        its pair was stored (it died between storing and saying so), else lost."""
        unsettled, self._unsettled = self._unsettled, {}
        if not unsettled:
            return []
        found = await asyncio.to_thread(route_store.stored, self.store, list(unsettled))
        as_stored = {"ok": GRADED, "error": STUDENT_ERROR}
        settled = [
            (route, as_stored.get(found.get(record_id, ""), LOST))
            for record_id, route in unsettled.items()
        ]
        lost = sum(1 for _, outcome in settled if outcome == LOST)
        if lost:
            log.warning("route pairs lost with the judge", pairs=lost)
        return settled

    async def _settle_at_close(self) -> None:
        """After the judge stopped: what it reported, then the rest (collected at the
        router's last refresh)."""
        settled = await _Host.collect(self)
        self._leftover = settled + await self._settle_the_rest()

    def standings(self) -> list[dict[str, Any]]:
        from distillery.curation.online import status

        return status(self.settings, self.store)

    def reconfigure(self, settings: Settings) -> None:
        _check(settings)  # refused here, before anything changes
        self.settings = settings  # what a judge started from now on begins with
        if self.control is not None:
            self.control.put(settings)

    def _close_pipe(self) -> None:
        if self._pipe is not None:
            self._pipe.close()  # the judge reads to the end, then sees it closed


def problem(settings: Settings) -> str | None:
    """What stops the routes' judge from starting, in words; None when nothing does."""
    try:
        _check(settings)
    except Exception as exc:
        return str(exc)
    return None


def _check(settings: Settings) -> None:
    """Raise, naming the problem, when the routes' graders or endpoints do not load
    (without routes there is nothing to load, and nothing is imported)."""
    if settings.routes:
        from distillery.curation.judging import check

        check(settings)


class ThreadJudge(_Host):
    """The runtime in a thread of the proxy's process, on the proxy's store."""

    def __init__(self, settings: Settings, store: Store) -> None:
        super().__init__(settings, store)
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        from distillery.curation.judging import run

        # Made at the start (as a process judge's are): a reload before it is in
        # ``self.settings``, not queued to be applied a second time.
        self.control = queue.Queue()
        self.outcome_queue = queue.Queue()
        read = await self._open_pipe()
        self._thread = threading.Thread(
            target=run,
            args=(self.settings, self.store, read, self.control, self.outcome_queue),
            name="distillery-judge",
            daemon=True,
        )
        self._thread.start()

    async def close(self) -> None:
        if self._thread is not None:
            self.control.put(None)
            self._close_pipe()
            await asyncio.to_thread(self._thread.join, CLOSE_S + 5)
            await self._settle_at_close()


class ProcessJudge(_Host):
    """The runtime in a process of its own (spawned: no fork of a running event loop),
    at a lower CPU priority than the proxy, with its own connection to the database.  It
    stops when told, or when the proxy's end of its pipe closes (the proxy died); a
    judge still starting when the proxy stops is not waited for, and one that died is
    started again."""

    def __init__(self, settings: Settings, store: Store) -> None:
        super().__init__(settings, store)
        self._context = multiprocessing.get_context("spawn")
        self._process: Any = None
        self._closing = False

    async def start(self) -> None:
        read = await self._open_pipe()
        context = self._context
        self.control = context.Queue()
        self.outcome_queue = context.Queue()
        self._ready = context.Event()
        # A Connection crosses to a spawned process with its fd (a raw fd would not).
        pairs = multiprocessing.connection.Connection(read, writable=False)
        self._process = context.Process(
            target=_run_process,
            args=(
                self.settings,
                logs.CONFIGURED,
                pairs,
                self.control,
                self.outcome_queue,
                self._ready,
            ),
            name="distillery-judge",
            daemon=True,
        )
        self._process.start()
        pairs.close()  # the judge has its own copy; ours would keep the pipe open
        log.info("route judge started", pid=self._process.pid)

    async def collect(self) -> list[tuple[str, str]]:
        settled = await super().collect()
        process = self._process
        if process is not None and not self._closing and not process.is_alive():
            log.error("route judge died; starting another", code=process.exitcode)
            settled += await _Host.collect(self)  # what it said before it died
            settled += await self._settle_the_rest()
            self._close_pipe()
            await self.start()  # new queues too: it may have died holding a lock
        return settled

    async def close(self) -> None:
        self._closing = True
        process = self._process
        if process is None:
            return
        ready = self._ready.is_set()
        if ready:
            self.control.put(None)
        self._close_pipe()
        await asyncio.to_thread(self._stop, process, ready)
        await self._settle_at_close()

    @staticmethod
    def _stop(process: Any, ready: bool) -> None:
        if ready:
            process.join(CLOSE_S + 5)
        if process.is_alive():  # still starting (or stuck): nothing of ours to wait on
            process.kill()  # (it ignores SIGTERM: see _run_process)
            process.join()


def _run_process(
    settings: Settings,
    logging: dict[str, Any],
    pairs: Any,
    control: Any,
    outcomes: Any,
    ready: Any,
) -> None:
    # Ctrl-C reaches the whole process group, and systemd's stop the whole cgroup: the
    # proxy stops this process, in order, once its own requests are done.
    for ignored in (signal.SIGINT, signal.SIGTERM):
        signal.signal(ignored, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads come from the proxy
    # Background work: when the machine is busy, the proxy's requests come first (a
    # judge that falls behind drops pairs, counted, as with a slow student).
    os.nice(JUDGE_NICENESS)
    logs.configure(**logging)
    outcomes.cancel_join_thread()  # outcomes not yet collected at exit are only counts
    pairs_fd = os.dup(pairs.fileno())
    pairs.close()
    from distillery.curation.judging import run

    store = Store(create_engine(settings.storage.resolved_database_url()), migrated=True)
    try:
        run(settings, store, pairs_fd, control, outcomes, ready)
    finally:
        store.close()
