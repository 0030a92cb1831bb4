"""Running the proxy: uvloop, graceful shutdown, and N worker processes on one port.

The server runs as aiohttp's ``run_app`` would (see ``http.py`` for why not
``run_app`` itself), which already does what a graceful stop needs: on a signal it
stops accepting, waits up to ``shutdown_timeout`` for in-flight requests
(streams included) and then runs the app's cleanup, where the spool is closed and
the capture writer process stores what is left (or leaves it in the spool).

With ``--workers N`` a supervisor migrates the schema once, then starts N
processes that each bind the port with ``SO_REUSEPORT`` (the kernel spreads
connections over them), each with its own spool segments, and one capture writer
process for them all.  SIGTERM/SIGINT go to every worker; a worker or the writer
that dies is started again; the writer stops after the last worker.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import structlog
from sqlalchemy.engine import Engine

from distillery.core.config import Settings
from distillery.core.errors import DistilleryError
from distillery.proxy import http
from distillery.proxy.app import Extension, Writer, make_app
from distillery.proxy.metrics import MULTIPROC_ENV
from distillery.proxy.writer import WriterProcess
from distillery.store import Store
from distillery.store.db import create_engine, migrate

log = structlog.get_logger()


def open_capture_store(settings: Settings) -> Store:
    """The store for capture; a database that is down at start is not fatal (we spool)."""
    engine = create_engine(settings.storage.resolved_database_url())
    return Store(engine, migrated=_migrated(engine))


def _migrated(engine: Engine) -> bool:
    """Whether the schema could be brought up to date now; a database that is down (or
    locked) at start is said once, and the writer migrates when it answers."""
    try:
        notes = migrate(engine)
    except Exception as exc:
        log.error("database unavailable at start; capturing to the spool", error=str(exc))
        return False
    for note in notes:
        log.warning("database migrated", note=note)
    return True


def serve(
    settings: Settings,
    workers: int = 1,
    logging: dict[str, Any] | None = None,
    extensions: Sequence[Extension] = (),
    reload: Callable[[], Settings] | None = None,
) -> None:
    """Serve the proxy; ``extensions`` (module-level functions: workers are spawned) mount
    what the entry point adds beside the API, such as the dashboard; ``reload`` (picklable)
    reads the config again on SIGHUP, for its routes."""
    if workers <= 1:
        _serve_one(settings, reuse_port=False, extensions=extensions, reload=reload)
        return
    if settings.proxy.port == 0:
        raise DistilleryError("--workers needs a fixed --port: the workers share it.")
    _supervise(settings, workers, logging or {}, extensions, reload)


def _serve_one(
    settings: Settings,
    reuse_port: bool,
    extensions: Sequence[Extension] = (),
    reload: Callable[[], Settings] | None = None,
    writer: Writer = "process",
) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        loop = asyncio.new_event_loop()
    else:
        loop = uvloop.new_event_loop()
    # Threads of this process (the spool's retry, the routes' refresh) hold the GIL in
    # bursts; a short switch interval (default 5 ms) bounds how long the event loop can
    # wait for one, which is what p99 latency feels.
    sys.setswitchinterval(0.0005)
    needs_store = (
        settings.capture.enabled
        or settings.proxy.stored_completions == "local"
        or (settings.ui.enabled and bool(extensions))
        or bool(settings.routes)  # their modes and graded pairs live there
    )
    store = open_capture_store(settings) if needs_store else None
    if reload is not None:
        # Until the app installs its reload handler, a SIGHUP must not end the process (its
        # default): the app reads the config once more when it is up.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    app = make_app(settings, store, extensions, reload, writer=writer)
    try:
        http.run(
            http.serve_forever(
                app,
                settings.proxy.host,
                settings.proxy.port,
                shutdown_timeout=settings.proxy.shutdown_timeout,
                reuse_port=reuse_port,
            ),
            loop,
        )
    except OSError as exc:
        raise DistilleryError(
            f"Cannot listen on {settings.proxy.host}:{settings.proxy.port}: {exc.strerror}. "
            "Pick another port with --port."
        ) from None
    finally:
        if store is not None:
            store.close()


def _worker(
    settings: Settings,
    logging: dict[str, Any],
    extensions: Sequence[Extension],
    reload: Callable[[], Settings] | None,
    safe: Any,
) -> None:
    # A SIGHUP would end this process until the app's handler is in; from here on it is
    # ignored (the app reads the config once more when up), so the supervisor may send one.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    safe.set()
    from distillery.core import logs

    logs.configure(**logging)
    try:
        _serve_one(
            settings, reuse_port=True, extensions=extensions, reload=reload, writer="supervisor"
        )
    except DistilleryError as exc:
        log.error("worker cannot serve", error=str(exc))
        sys.exit(3)


def _supervise(
    settings: Settings,
    workers: int,
    logging: dict[str, Any],
    extensions: Sequence[Extension],
    reload: Callable[[], Settings] | None,
) -> None:
    if settings.capture.enabled:
        engine = create_engine(settings.storage.resolved_database_url())
        _migrated(engine)
        engine.dispose()
    # Workers write their metrics to files here; whichever answers /metrics serves the sum.
    shared_metrics = tempfile.mkdtemp(prefix="distillery-metrics-")
    os.environ[MULTIPROC_ENV] = shared_metrics  # spawned workers inherit it
    try:
        _run_workers(settings, workers, logging, shared_metrics, extensions, reload)
    finally:
        shutil.rmtree(shared_metrics, ignore_errors=True)


def _run_workers(
    settings: Settings,
    workers: int,
    logging: dict[str, Any],
    shared_metrics: str,
    extensions: Sequence[Extension],
    reload: Callable[[], Settings] | None,
) -> None:
    """Start the workers, start again one that dies, forward SIGHUP, stop them on
    SIGTERM/SIGINT.  The signal handlers only note the signal and this loop acts on it:
    a stop that came while a worker was being started again reaches that worker too."""
    context = multiprocessing.get_context("spawn")
    received: list[int] = []
    stopping = False
    told: set[int] = set()  # the workers that got it
    cannot_serve = False

    def start() -> tuple[Any, Any]:
        safe = context.Event()  # set once SIGHUP no longer ends the worker
        process = context.Process(
            target=_worker, args=(settings, logging, extensions, reload, safe), daemon=False
        )
        process.start()
        return process, safe

    def note(signum: int, _frame: Any) -> None:
        received.append(signum)

    for handled in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(handled, note)
    writer = WriterProcess(settings, logging) if settings.capture.enabled else None
    if writer is not None:
        writer.start()
    processes = [start() for _ in range(workers)]
    log.info("workers started", workers=workers, pids=[p.pid for p, _ in processes])
    while True:
        while received:
            signum = received.pop(0)
            if signum != signal.SIGHUP:
                stopping = True
                continue
            for process, safe in processes:
                # One not yet safe reads the config once it is up: no signal needed.
                if process.is_alive() and safe.is_set() and process.pid is not None:
                    os.kill(process.pid, signal.SIGHUP)
        if stopping:
            for process, _ in processes:
                if process.is_alive() and process.pid not in told:
                    told.add(process.pid)
                    # SIGTERM whatever the supervisor got, once each: a worker still
                    # starting can swallow a SIGINT (a KeyboardInterrupt raised in code
                    # that ignores it: CI saw one serve on), never a SIGTERM; a second
                    # signal to a worker that is stopping changes nothing (see http.run).
                    os.kill(process.pid, signal.SIGTERM)
            if all(not p.is_alive() for p, _ in processes):
                break
        elif writer is not None:
            writer.check()
        for index, (process, _) in enumerate(processes):
            process.join(timeout=0.2)
            if process.exitcode is None or stopping:
                continue
            if process.exitcode == 3:  # cannot serve at all (port taken): give up
                stopping = cannot_serve = True
                break
            log.warning("worker died; starting another", pid=process.pid, code=process.exitcode)
            from prometheus_client import multiprocess

            multiprocess.mark_process_dead(process.pid, shared_metrics)  # type: ignore[no-untyped-call]
            time.sleep(0.5)
            processes[index] = start()
    if writer is not None:
        writer.stop()  # after the last worker: it stores what they spooled
    if cannot_serve:
        raise DistilleryError("A worker could not listen; see the log above.")
    log.info("workers stopped")
