"""The HTTP server under the app: OpenAI-shaped errors even for requests aiohttp cannot parse.

A request line, header block or body framing that aiohttp's parser rejects
never reaches the application, so its middleware cannot shape the answer:
aiohttp writes a plain-text ``400 Bad Request`` itself, from
``RequestHandler.handle_error``.  An OpenAI client would then fail to read the
error.  :class:`ProxyRunner` is an ``AppRunner`` whose connections are served
by a handler that answers those errors in OpenAI's JSON shape too, with a
request id and a log line.

aiohttp offers no public hook for this, so it relies on two of its
internals (``AppRunner._make_server`` and ``Server``'s constructor
arguments); ``tests/test_faults.py`` sends malformed HTTP to catch a change.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any

import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from distillery.core.api_errors import APIError
from distillery.proxy.spool import new_record_id
from distillery.proxy.state import PROXY

log = structlog.get_logger()


class _Handler(RequestHandler):
    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            # Part of a response is out already: aiohttp closes the connection.
            return super().handle_error(request, status, exc, message)
        request_id = new_record_id()
        reason = message or (str(exc) if exc else None) or "malformed HTTP request"
        if status >= 500:
            log.error("unhandled error", request_id=request_id, status=status, exc_info=exc)
            text = "The proxy failed to handle this request; see its log for the request id."
            error = APIError(status, text, type="server_error")
        else:
            log.warning("bad HTTP request", request_id=request_id, status=status, error=reason)
            error = APIError(status, f"Malformed HTTP request: {reason}", code="bad_http_request")
        on_error = getattr(self._manager, "on_error", None)
        if on_error is not None:
            on_error(status)
        response = error.response(request_id)
        response.force_close()
        return response


class _Server(web.Server):
    on_error: Any = None

    def __call__(self) -> RequestHandler:
        return _Handler(self, loop=self._loop, **self._kwargs)


class ProxyRunner(web.AppRunner):
    """``web.AppRunner`` whose low-level errors are OpenAI-shaped too."""

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        server = _Server(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=made._loop,
            **made._kwargs,
        )
        proxy = self.app.get(PROXY)
        if proxy is not None:
            server.on_error = lambda status: proxy.metrics.requests.labels(
                "malformed", str(status)
            ).inc()
        return server


async def serve_forever(
    app: web.Application,
    host: str,
    port: int,
    *,
    shutdown_timeout: float,
    reuse_port: bool = False,
) -> None:
    """What ``web.run_app`` does, on a :class:`ProxyRunner`: serve until cancelled or signalled."""
    runner = ProxyRunner(
        app, access_log=None, shutdown_timeout=shutdown_timeout, handle_signals=True
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port or None)
        await site.start()
        # Only now, bound: "ready" with the address a client can use.
        bound_host, bound_port = runner.addresses[0][:2]
        if ":" in bound_host:
            bound_host = f"[{bound_host}]"
        proxy = app[PROXY]
        log.info(
            "proxy ready",
            address=f"http://{bound_host}:{bound_port}/v1",
            upstream=proxy.upstream_url,
            capture="on" if proxy.capture else "off",
            database=proxy.capture.database if proxy.capture else None,
            dashboard=f"http://{bound_host}:{bound_port}{proxy.dashboard}"
            if proxy.dashboard
            else None,
        )
        while True:
            await asyncio.sleep(3600)
    finally:
        await runner.cleanup()


def run(coro: Any, loop: asyncio.AbstractEventLoop) -> None:
    """Run ``serve_forever`` until SIGTERM/SIGINT, then shut down gracefully (as ``run_app``)."""
    asyncio.set_event_loop(loop)
    main = loop.create_task(coro)
    try:
        loop.run_until_complete(main)
    except (web.GracefulExit, KeyboardInterrupt):
        # Stopping: a second SIGTERM/SIGINT (Ctrl-C reaches the workers and their
        # supervisor forwards it) must not cut short the wait for in-flight requests
        # or the capture's flush.
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, _already_stopping, signum)
    finally:
        # Cancelling the main task runs the runner's cleanup: in-flight requests
        # get shutdown_timeout, then the capture writer flushes.
        if not main.done():
            main.cancel()
            with contextlib.suppress(asyncio.CancelledError, web.GracefulExit):
                loop.run_until_complete(main)
        close_loop(loop)
        asyncio.set_event_loop(None)


def close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is still pending on a stopped ``loop``, let it finish, and close it.

    Cleanup leaves some tasks behind: after a client that sent less body than its
    Content-Length goes away, aiohttp lingers on the connection (10 s) for the rest
    of the body, in a task no server still tracks.  Closed with it pending, the loop
    drops the task, and whenever the collector finds it asyncio logs "Task was
    destroyed but it is pending!".  ``asyncio.run`` and ``run_app`` do the same.
    """
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:  # (gather of nothing would belong to this thread's loop, not ``loop``)
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


def _already_stopping(signum: int) -> None:
    log.info("already stopping", signal=signal.Signals(signum).name)
