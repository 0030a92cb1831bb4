"""Running the proxy: one process, uvloop, graceful shutdown on SIGTERM/SIGINT.

aiohttp's ``run_app`` already does what a graceful stop needs: on a signal it
stops accepting, waits up to ``shutdown_timeout`` for in-flight requests
(streams included) and then runs the app's cleanup, where the capture writer
flushes its queue to the database (or leaves it in the spool).
"""

from __future__ import annotations

import sys

import structlog
from aiohttp import web

from distillery.config import Settings
from distillery.errors import DistilleryError
from distillery.proxy.app import make_app
from distillery.store import Store
from distillery.store.db import create_engine, migrate

log = structlog.get_logger()


def open_capture_store(settings: Settings) -> Store:
    """The store for capture; a database that is down at start is not fatal (we spool)."""
    engine = create_engine(settings.storage.resolved_database_url())
    try:
        migrate(engine)
    except Exception as exc:
        log.error("database unavailable at start; capturing to the spool", error=str(exc))
        return Store(engine)
    return Store(engine, migrated=True)


def serve(settings: Settings) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        loop_factory = None
    else:
        loop_factory = uvloop.new_event_loop
    # The writer thread holds the GIL in bursts while it inserts a batch; a
    # short switch interval (default 5 ms) bounds how long the event loop can
    # wait for it, which is what p99 latency feels.
    sys.setswitchinterval(0.0005)
    needs_store = settings.capture.enabled or settings.proxy.stored_completions == "local"
    store = open_capture_store(settings) if needs_store else None
    app = make_app(settings, store)
    try:
        web.run_app(
            app,
            host=settings.proxy.host,
            port=settings.proxy.port,
            access_log=None,
            print=None,
            shutdown_timeout=settings.proxy.shutdown_timeout,
            loop=loop_factory() if loop_factory else None,
        )
    except OSError as exc:
        raise DistilleryError(
            f"Cannot listen on {settings.proxy.host}:{settings.proxy.port}: {exc.strerror}. "
            "Pick another port with --port."
        ) from None
    finally:
        if store is not None:
            store.close()
