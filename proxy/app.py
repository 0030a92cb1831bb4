"""The aiohttp application: routes, the canonical log line, health and metrics."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Literal

import aiohttp
import orjson
import structlog
from aiohttp import web

from distillery.core import logs
from distillery.core.api_errors import APIError, from_http_exception, unhandled
from distillery.core.config import Settings
from distillery.core.redact import Redactor
from distillery.core.shadow import JUDGE
from distillery.proxy import stored
from distillery.proxy.capture import Capture
from distillery.proxy.chat import chat_completions
from distillery.proxy.forward import passthrough, unreadable_body
from distillery.proxy.metrics import Metrics
from distillery.proxy.spool import new_record_id
from distillery.proxy.state import AFTER_RESPONSE, LOG_FIELDS, PROXY, REQUEST_ID, Proxy
from distillery.proxy.tagging import Tagger
from distillery.proxy.writer import WriterProcess, spool_dir
from distillery.store import Store

log = structlog.get_logger()

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Writer = Literal["thread", "process", "supervisor"]
WRITER = web.AppKey("writer", WriterProcess)
WRITER_CHECK_S = 0.5
DRAIN_SECONDS = 10.0  # aiohttp's own lingering time


def _route_name(request: web.Request) -> str:
    name = request.match_info.route.name
    return name.removesuffix("_app") if name else "other"


@web.middleware
async def canonical_request(request: web.Request, handler: Handler) -> web.StreamResponse:
    """OpenAI-shaped errors, metrics, and exactly one log line per request."""
    started = time.perf_counter()
    # One id names the request in every log line and, for a chat completion,
    # is the stored record's id.
    request_id = request[REQUEST_ID] = new_record_id()
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    fields: dict[str, object] = {}
    request[LOG_FIELDS] = fields
    request[AFTER_RESPONSE] = []
    proxy = request.app[PROXY]
    task = asyncio.current_task()
    if task is not None:
        proxy.inflight.add(task)
    try:
        response = await handler(request)
    except APIError as error:
        fields.setdefault("error", error.message)
        response = error.response(request_id)
    except web.RequestPayloadError as exc:
        # A body no route could read (a Content-Encoding it does not honour).
        unreadable = unreadable_body(request, exc)
        fields.setdefault("error", unreadable.message)
        response = unreadable.response(request_id)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = from_http_exception(exc, request).response(request_id)
    except Exception:
        # A bug, never the client's fault: the traceback is for us, the client
        # still gets OpenAI's shape and an id to quote.
        log.exception("unhandled error", request_id=request_id, path=request.path)
        fields["error"] = "unhandled"
        response = unhandled("proxy").response(request_id)
    finally:
        if task is not None:
            proxy.inflight.discard(task)
    await _drain(request, response)
    for work in request[AFTER_RESPONSE]:
        work()
    elapsed = time.perf_counter() - started
    route = _route_name(request)
    proxy.metrics.answered(route, response.status, elapsed)
    if proxy.settings.proxy.access_log and route not in ("healthz", "metrics"):
        log.info(
            "request",
            request_id=request_id,
            method=request.method,
            path=request.path,
            status=response.status,
            latency_ms=round(elapsed * 1000, 3),
            **fields,
        )
    return response


async def _drain(request: web.Request, response: web.StreamResponse) -> None:
    """Read what a handler left unread of the body (it answered before needing it).

    aiohttp would do this itself after the handler ("lingering"), outside any
    middleware, where a body it cannot decode (a false Content-Encoding) is
    logged as an unhandled exception; closing without reading instead makes
    the kernel reset the connection, and the client can lose the answer.
    """
    content = request.content
    if not request.body_exists or content.is_eof() or response.keep_alive is False:
        return  # nothing left, or an answer that closes the connection anyway
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            while not content.is_eof():
                await content.readany()
    except web.RequestPayloadError:
        content.feed_eof()  # the rest cannot be read: close after the answer
        response.force_close()
    except (TimeoutError, ConnectionError):
        response.force_close()


async def healthz(request: web.Request) -> web.Response:
    """Liveness and what storage looks like; 200 even while spooling (nothing is lost)."""
    proxy = request.app[PROXY]
    body: dict[str, object] = {"status": "ok", "upstream": proxy.upstream_url, "pid": os.getpid()}
    if proxy.capture is not None:
        capture = proxy.capture.health()
        body["capture"] = capture
        if capture["problems"]:
            body["status"] = "degraded"
    return web.Response(body=orjson.dumps(body), content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    return web.Response(
        body=request.app[PROXY].metrics.render(),
        headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
    )


# Something the proxy's entry point mounts beside the API (the dashboard at /ui/), given
# the app, the settings and the store.  Passed in, so this package imports none of them.
Extension = Callable[[web.Application, Settings, Store | None], None]


def make_app(
    settings: Settings,
    store: Store | None,
    extensions: Sequence[Extension] = (),
    reload: Callable[[], Settings] | None = None,
    writer: Writer = "thread",
) -> web.Application:
    """Build the proxy; ``store=None`` (or capture disabled) forwards without recording.

    Captured calls go to the database through ``writer``: a ``"process"`` the app starts,
    watches and stops with it (``distillery proxy``); a ``"thread"`` of this process
    (tests); or one started by someone else (``"supervisor"``: the workers' supervisor).
    """
    capture = None
    redactor = Redactor.from_settings(
        settings.redact.defaults, [(p.name, p.pattern) for p in settings.redact.patterns]
    )
    if store is not None and settings.capture.enabled:
        directory = spool_dir(settings)
        own = store if writer == "thread" else None
        capture = Capture(
            own,
            directory,
            settings.capture,
            redactor,
            database=store.url,
            database_ok=store.migrated,
        )
    proxy = Proxy(
        settings=settings,
        tagger=Tagger(settings),
        metrics=Metrics(),
        capture=capture,
        redactor=redactor,
        store=store,
        reload=reload,
    )
    serve_stored = store is not None and settings.proxy.stored_completions == "local"
    if capture is not None:
        capture.on_event = proxy.metrics.capture_event
        capture.on_buffered = proxy.metrics.buffered
        proxy.metrics.watch_writer(capture.directory)

    app = web.Application(
        middlewares=[canonical_request],
        client_max_size=int(settings.proxy.max_body_mb * 1024 * 1024),
    )
    app[PROXY] = proxy
    if capture is not None and writer == "process":
        app[WRITER] = WriterProcess(settings, dict(logs.CONFIGURED))
    app.on_shutdown.append(_cut_at_timeout)
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_get("/healthz", healthz, name="healthz")
    app.router.add_get("/metrics", metrics, name="metrics")
    for prefix in ("", "/a/{app}"):
        suffix = "_app" if prefix else ""
        app.router.add_post(prefix + "/v1/chat/completions", chat_completions, name="chat" + suffix)
        if serve_stored:
            stored.add_routes(app, prefix, suffix)
        app.router.add_route(
            "*", prefix + "/v1/{tail:.*}", passthrough, name="passthrough" + suffix
        )
    for extend in extensions:
        extend(app, settings, store)
    if any(r.canonical == "/ui" for r in app.router.resources()):
        # A browser pointed at the proxy finds the dashboard.
        proxy.dashboard = "/ui/"
        app.router.add_get("/", _to_dashboard, name="root")
    return app


async def _to_dashboard(request: web.Request) -> web.StreamResponse:
    raise web.HTTPFound("/ui/")


async def _cut_at_timeout(app: web.Application) -> None:
    """Requests still running ``shutdown_timeout`` after a stop was asked are cancelled
    (a stream is cut, and recorded as cancelled).  aiohttp alone waits that long, then
    cancels the request's payload -- which a handler reading its upstream never sees --
    and waits as long again before it closes the connection: twice the timeout."""
    proxy = app[PROXY]

    def cut() -> None:
        if proxy.inflight:
            log.warning(
                "shutdown timeout: cutting requests in flight", requests=len(proxy.inflight)
            )
        for task in list(proxy.inflight):
            task.cancel()

    asyncio.get_running_loop().call_later(proxy.settings.proxy.shutdown_timeout, cut)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    """One client session and one writer for the app's life; flushed on the way out."""
    proxy = app[PROXY]
    upstream = proxy.settings.upstream
    proxy.session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1000, ttl_dns_cache=300),
        timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=upstream.connect_timeout, sock_read=upstream.timeout
        ),
        auto_decompress=False,
    )
    if proxy.capture is not None:
        proxy.capture.start()
    writer = app.get(WRITER)
    watch = None
    if writer is not None:
        writer.start()
        watch = asyncio.get_running_loop().create_task(_watch(writer))
    proxy.router.judge = app.get(JUDGE)
    await proxy.router.start()
    if proxy.reload is not None and threading.current_thread() is threading.main_thread():
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(reload_routes(app)))
        # A SIGHUP that came while this process started was ignored (see server.py), and a
        # worker started again by the supervisor was given the config of the first start:
        # read it now, so that every worker routes by the file as it is.
        await reload_routes(app)
    yield
    await proxy.router.stop()
    await proxy.session.close()
    if watch is not None:
        watch.cancel()
    if proxy.capture is not None:
        await asyncio.to_thread(proxy.capture.close)
    if writer is not None:
        await asyncio.to_thread(writer.stop)
    if proxy.capture is not None:
        log.info("capture flushed", **proxy.capture.health())


async def _watch(writer: WriterProcess) -> None:
    """Start the writer again whenever it dies (the spool keeps what it had not stored)."""
    while True:
        await asyncio.sleep(WRITER_CHECK_S)
        writer.check()


async def reload_routes(app: web.Application) -> bool:
    """Read the config again and apply its [routes] and [endpoints] (SIGHUP), without
    dropping a request; a config that does not load changes nothing.  Whether it applied."""
    proxy = app[PROXY]
    if proxy.reload is None:
        return False
    rest = {"routes", "endpoints"}
    try:
        settings = await asyncio.to_thread(proxy.reload)
        if settings.model_dump(include=rest) == proxy.settings.model_dump(include=rest):
            return True  # nothing to change
        judge = app.get(JUDGE)
        if judge is not None:
            await asyncio.to_thread(judge.reconfigure, settings)  # loads graders: may refuse
    except Exception as exc:  # a bad edit: said, and the running routes stay
        log.error("config not reloaded", error=str(exc))
        return False
    if settings.model_dump(exclude=rest) != proxy.settings.model_dump(exclude=rest):
        log.warning("config reloaded: only [routes] and [endpoints]; restart for the rest")
    proxy.settings = proxy.settings.model_copy(
        update={"routes": settings.routes, "endpoints": settings.endpoints}
    )
    await proxy.router.reconfigure(settings)
    return True
