"""``POST /v1/chat/completions``: tag, forward, relay, capture.

The order of work is chosen for latency and for the no-loss promise: the
request is parsed and tagged, forwarded, and the answer relayed as it arrives;
the capture record is spooled after the last upstream byte but *before* the
client receives the end of the response (the body of a JSON answer, the
``[DONE]`` of a stream).  Logging and metrics happen after delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from distillery.core.api_errors import APIError, json_object, too_deep
from distillery.core.config import ProxySettings
from distillery.core.shadow import ROUTE_TAG, SERVED_BY_TAG, Pair
from distillery.proxy.errors import upstream_timeout, upstream_unreachable
from distillery.proxy.forward import (
    abort,
    request_headers,
    response_headers,
    skip_user_agent,
    unreadable_body,
    upstream_url,
)
from distillery.proxy.routes import Route
from distillery.proxy.state import PROXY, REQUEST_ID, Proxy, after_response, log_fields
from distillery.proxy.stream import StreamRelay, malformed
from distillery.proxy.tagging import merge_metadata, prompt_fingerprint
from distillery.store.records import CaptureRecord

log = structlog.get_logger()

LARGE_BODY = 1 << 20
CLIENT_GONE = {"type": "client_error", "message": "client disconnected before the response ended"}
STREAM_CLIENT_GONE = {
    "type": "client_error",
    "message": "client disconnected before the stream ended",
}
CANCELLED = {
    "type": "cancelled",
    "message": "the proxy stopped before the call ended (shutdown timeout)",
}


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _integer(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Call:
    """Everything known about one chat completion call, turned into a record at the end."""

    def __init__(
        self, proxy: Proxy, request: web.Request, tenant: str, body: dict[str, Any], size: int = 0
    ):
        self.proxy = proxy
        # Bytes of request and answer: above LARGE_BODY, the work on them leaves the loop.
        self.size = size
        self.request = request
        self.id = request[REQUEST_ID]
        self.created_at = time.time()
        self.started = time.perf_counter()
        self.path = request.path
        self.tenant = tenant
        self.body = body
        self.stream = body.get("stream") is True
        self.fingerprint = prompt_fingerprint(body)
        tags = proxy.tagger.tags(
            body, request.headers, tenant, request.match_info.get("app"), self.fingerprint
        )
        client_metadata = body.get("metadata")
        self.metadata, dropped = merge_metadata(client_metadata, tags)
        model = body.get("model")
        self.route = proxy.router.route_for(
            tenant, self.metadata, self.fingerprint, model if isinstance(model, str) else None
        )
        self.served_by = "teacher"
        self.upstream = proxy.upstream_url  # where the answer came from
        self.fell_back = False  # the student failed and the teacher answered
        if self.route is not None:
            # Said in the stored record and upstream: who answered, on which route.
            self.metadata, more = merge_metadata(
                self.metadata, {ROUTE_TAG: self.route.name, SERVED_BY_TAG: self.served_by}
            )
            dropped += more
        if dropped:
            log.warning(
                "metadata tags dropped",
                dropped=[{"key": key, "reason": reason} for key, reason in dropped],
            )
        upstream = proxy.settings.upstream
        if upstream.store and "store" not in body:
            body["store"] = True
        # Client metadata that is not an object is left for the upstream to reject.
        if (
            upstream.metadata
            and self.metadata
            and (client_metadata is None or isinstance(client_metadata, dict))
        ):
            body["metadata"] = self.metadata
        options = body.get("stream_options")
        self.strip_usage = (
            self.stream
            and upstream.stream_usage
            and (options is None or isinstance(options, dict))
            and not (options or {}).get("include_usage")
        )
        self.capture = proxy.capture if proxy.capture and proxy.sampled(self.metadata) else None
        self.ttft_ms: float | None = None
        self.finished = False
        # The model name is the client's text like any other: it may hold an e-mail.
        self.model = proxy.redactor.text(model) if isinstance(model, str) else None

    def answered_by(self, who: str, upstream: str) -> None:
        """Who answers this call, said in its tags (stored and, for the teacher, upstream)."""
        self.served_by, self.upstream = who, upstream
        if SERVED_BY_TAG in self.metadata:
            self.metadata[SERVED_BY_TAG] = who
            if isinstance(self.body.get("metadata"), dict):
                self.body["metadata"] = self.metadata

    def route_headers(self) -> dict[str, str]:
        """What every answer to a routed call says: the route, and who answered."""
        if self.route is None:
            return {}
        return {"X-Distillery-Route": self.route.name, "X-Distillery-Served-By": self.served_by}

    def response_headers(self, upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
        """The upstream's headers as relayed, plus the route's (duplicates kept)."""
        headers = response_headers(upstream)
        headers.extend(self.route_headers())
        return headers

    def payload(self) -> bytes:
        body = self.body
        if self.strip_usage:
            options = dict(body.get("stream_options") or {}, include_usage=True)
            body = {**body, "stream_options": options}
        try:
            return orjson.dumps(body)
        except orjson.JSONEncodeError:
            raise too_deep() from None

    async def settle(
        self,
        status: int,
        response: dict[str, Any] | None,
        error: Any,
        headers: CIMultiDictProxy[str] | None = None,
    ) -> str:
        """``finish``, in a thread for a large call: redacting and spooling 20 MB holds the
        event loop for half a second, and every other client with it."""
        if self.size > LARGE_BODY:
            return await asyncio.to_thread(self.finish, status, response, error, headers)
        return self.finish(status, response, error, headers)

    def finish(
        self,
        status: int,
        response: dict[str, Any] | None,
        error: Any,
        headers: CIMultiDictProxy[str] | None = None,
    ) -> str:
        """Hand the record to capture; returns the outcome for the log line."""
        if self.finished:
            return "recorded"
        self.finished = True
        response = response or {}
        usage = response.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        served = response.get("model")
        served = self.proxy.redactor.text(served) if isinstance(served, str) else None
        seconds = time.perf_counter() - self.started
        # Metrics wait until the answer is out (the middleware runs after_response work).
        after_response(
            self.request,
            lambda: self.proxy.metrics.chat(
                model=served or self.model,
                app=self.metadata.get(self.proxy.settings.tagging.app_key),
                seconds=seconds,
                ttft_seconds=self.ttft_ms / 1000 if self.ttft_ms is not None else None,
                prompt_tokens=_integer(usage.get("prompt_tokens")),
                completion_tokens=_integer(usage.get("completion_tokens")),
            ),
        )
        if self.route is not None:
            self.proxy.router.served(self.route, self.served_by)
        if (
            self.route is not None
            and self.served_by == "teacher"
            and not self.fell_back
            and status < 400
            and response.get("choices")
        ):
            # Made and handed over once the client has the whole answer: the student's
            # call never competes with sending it.
            route, router, teacher = self.route, self.proxy.router, response
            after_response(
                self.request,
                lambda: router.shadow(
                    route,
                    Pair(
                        route=route.name,
                        record_id=self.id,
                        tenant=self.tenant,
                        created_at=self.created_at,
                        request=route.student_request(self.body),
                        teacher=teacher,
                        teacher_latency_ms=round(seconds * 1000, 3),
                    ),
                ),
            )
        if self.capture is None:
            return "sampled_out" if self.proxy.capture else "off"
        choices = response.get("choices")
        first = choices[0] if isinstance(choices, list) and choices else None
        first = first if isinstance(first, dict) else {}
        record: CaptureRecord = {
            "id": self.id,
            "completion_id": _string(response.get("id")),
            "created_at": self.created_at,
            "tenant": self.tenant,
            "upstream": self.upstream,
            "path": self.path,
            "model_requested": self.model,
            "model_served": served,
            "status": status,
            "stream": self.stream,
            "finish_reason": _string(first.get("finish_reason")),
            "prompt_tokens": _integer(usage.get("prompt_tokens")),
            "completion_tokens": _integer(usage.get("completion_tokens")),
            "total_tokens": _integer(usage.get("total_tokens")),
            "latency_ms": round((time.perf_counter() - self.started) * 1000, 3),
            "ttft_ms": self.ttft_ms,
            "upstream_request_id": headers.get("x-request-id") if headers else None,
            "prompt_fingerprint": self.fingerprint,
            "request": self.body,
            "response": response or None,
            "error": error,
            "metadata": self.metadata,
        }
        try:
            outcome = self.capture.submit(record)
        except Exception:  # a bug: the call is still answered
            log.exception("capture failed", record_id=self.id)
            outcome = "failed"
        self.proxy.metrics.capture_outcome(outcome)
        return outcome


async def chat_completions(request: web.Request) -> web.StreamResponse:
    proxy = request.app[PROXY]
    tenant, authorization = proxy.authorize(request)
    fields = log_fields(request)
    fields["tenant"] = tenant
    target = upstream_url(proxy.upstream_url, request)
    body, size = await _read_body(request, proxy.settings.proxy)
    call = Call(proxy, request, tenant, body, size)
    fields.update(model=call.model, stream=call.stream, tags=len(call.metadata))
    route = call.route
    if route is not None and proxy.router.student_answers(route, body, tenant, call.metadata):
        answered = await _student_answers(request, call, route, fields)
        if answered is not None:
            return answered
    body_bytes = await asyncio.to_thread(call.payload) if call.size > LARGE_BODY else call.payload()
    # aiohttp writes a BytesIO in 64 KB pieces, yielding to the loop between them.
    payload = io.BytesIO(body_bytes) if len(body_bytes) > LARGE_BODY else body_bytes
    del body_bytes
    headers = request_headers(request.headers, authorization, identity=True)
    headers["Content-Type"] = "application/json"
    try:
        async with proxy.session.post(
            target,
            data=payload,
            headers=headers,
            allow_redirects=False,
            skip_auto_headers=skip_user_agent(headers),
        ) as upstream:
            del payload  # the request can be large: hold one copy, not two
            if (
                call.stream
                and upstream.status == 200
                and upstream.content_type == "text/event-stream"
            ):
                return await _relay_stream(request, upstream, call, fields)
            content = await upstream.read()
    except (TimeoutError, aiohttp.ClientError) as exc:
        timed_out = isinstance(exc, TimeoutError)
        failure = upstream_timeout() if timed_out else upstream_unreachable(exc)
        proxy.metrics.upstream_errors.labels("timeout" if timed_out else "unreachable").inc()
        fields["capture"] = call.finish(failure.status, None, failure.body())
        raise failure from None
    except asyncio.CancelledError:
        # Shutdown outlived its timeout (or the task was cancelled): the call
        # is still recorded, as unanswered.
        fields["capture"] = call.finish(499, None, CANCELLED)
        raise

    return await _relay_json(request, upstream, call, content, fields)


async def _relay_json(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    call: Call,
    content: bytes,
    fields: dict[str, Any],
) -> web.StreamResponse:
    """A whole (non-streamed) answer, recorded, then sent as it came."""
    response = web.Response(
        body=content,
        status=upstream.status,
        reason=upstream.reason,
        headers=call.response_headers(upstream.headers),
    )
    encoding = upstream.headers.get("Content-Encoding")
    parsed = (
        await asyncio.to_thread(_parse_json, content, encoding)
        if len(content) > LARGE_BODY
        else _parse_json(content, encoding)
    )
    problem = malformed(parsed) if upstream.status < 400 and isinstance(parsed, dict) else None
    gone = request.transport is None or request.transport.is_closing()
    call.size += len(content)
    if problem is not None:
        error: Any = {"type": "upstream_malformed", "message": problem, "body": parsed}
        outcome = await call.settle(upstream.status, None, error, upstream.headers)
    elif upstream.status < 400 and isinstance(parsed, dict) and "error" not in parsed:
        outcome = await call.settle(
            upstream.status, parsed, CLIENT_GONE if gone else None, upstream.headers
        )
    else:
        error = (
            parsed if parsed is not None else {"body": content[:4096].decode("utf-8", "replace")}
        )
        outcome = await call.settle(upstream.status, None, error, upstream.headers)
    fields["capture"] = outcome
    if gone:
        log.info("client went away before the response")
        return response
    try:
        await response.prepare(request)
        await response.write_eof()
    except ConnectionResetError:
        log.info("client went away before the response")
    return response


async def _read_body(request: web.Request, settings: ProxySettings) -> tuple[dict[str, Any], int]:
    """The request's JSON object and its size, or an OpenAI-shaped 4xx naming what is wrong
    with it.  A large body is parsed in a thread: the loop serves other clients meanwhile."""
    try:
        if request.content.is_eof():  # all here with the headers: nothing to wait for
            raw = await request.read()
        else:
            async with asyncio.timeout(settings.body_timeout):
                raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise APIError(
            413,
            f"Request body is larger than the proxy's limit of "
            f"{settings.max_body_mb} MB (proxy.max_body_mb).",
            code="request_too_large",
        ) from None
    except TimeoutError:
        raise APIError(
            408,
            f"The request body did not arrive within {settings.body_timeout} s "
            "(is Content-Length larger than the body?).",
            code="request_timeout",
            close=True,
        ) from None
    except (web.RequestPayloadError, aiohttp.http_exceptions.HttpProcessingError) as exc:
        raise unreadable_body(request, exc) from None
    if len(raw) > LARGE_BODY:
        return await asyncio.to_thread(json_object, raw), len(raw)
    return json_object(raw), len(raw)


async def _relay_stream(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    call: Call,
    fields: dict[str, Any],
    first: bytes = b"",
    student: Route | None = None,
) -> web.StreamResponse:
    """Relay an SSE answer as it comes.  A ``student``'s is held to its route's timeouts
    (between reads, and in all), and one that drops, stalls or breaks ends with the error
    event OpenAI sends mid-stream, counted as the student's failure."""
    response = web.StreamResponse(
        status=upstream.status,
        reason=upstream.reason,
        headers=call.response_headers(upstream.headers),
    )
    relay = StreamRelay(strip_usage=call.strip_usage, drop_unreadable=student is not None)
    error: dict[str, Any] | None = None
    client_gone = False
    try:
        try:
            await response.prepare(request)
        except ConnectionResetError:
            client_gone = True
        if not client_gone:
            async for data in _pieces(first, upstream, call, student):
                call.size += len(data)
                if call.ttft_ms is None:
                    call.ttft_ms = round((time.perf_counter() - call.started) * 1000, 3)
                out = relay.feed(data)
                if out:
                    try:
                        await response.write(out)
                    except ConnectionResetError:  # aiohttp's is a ClientError too
                        client_gone = True
                        break
                if student is not None and relay.assembler.malformed is not None:
                    break  # the student's stream broke: nothing more of it is relayed
    except (TimeoutError, aiohttp.ClientError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else f"failed: {exc!r}"
        error = {"message": f"upstream stream {reason}", "type": "upstream_error"}
    except asyncio.CancelledError:
        fields["capture"] = call.finish(upstream.status, relay.assembler.result(), CANCELLED)
        raise
    if client_gone:
        error = STREAM_CLIENT_GONE
    elif relay.assembler.error is not None:
        error = {"error": relay.assembler.error}
    elif relay.assembler.malformed is not None and error is None:
        error = {"type": "upstream_malformed", "message": relay.assembler.malformed}
    broke = None if student is None or client_gone else _broken(error, relay)
    if broke is not None and error is None:  # e.g. ended without [DONE]: stored as failed
        error = {"type": "upstream_error", "message": f"student stream {broke}"}
    fields["capture"] = await call.settle(
        upstream.status, relay.assembler.result(), error, upstream.headers
    )
    if client_gone:
        log.info("client went away mid-stream")
        return response
    try:
        if student is not None and broke is not None:
            request.app[PROXY].router.fell_back(student, broke)
            log_fields(request)["fallback"] = broke
            if broke != "stream_error":  # the student's own error event went out already
                await response.write(_error_event(broke))
            await response.write_eof()
            return response
        if error is not None and error.get("type") == "upstream_error":
            tail = relay.finish()
            if tail:
                await response.write(tail)
            abort(request)
            return response
        await response.write(relay.finish())
        await response.write_eof()
    except ConnectionResetError:
        log.info("client went away at the end of the stream")
    return response


async def _pieces(
    first: bytes, upstream: aiohttp.ClientResponse, call: Call, student: Route | None = None
) -> AsyncIterator[bytes]:
    if first:
        yield first
    if student is None:  # the teacher's: as long as upstream.timeout allows
        async for data in upstream.content.iter_any():
            yield data
        return
    settings = student.settings
    deadline = call.started + settings.total_timeout
    while True:
        left = deadline - time.perf_counter()
        if left <= 0:
            raise TimeoutError
        async with asyncio.timeout(min(settings.timeout, left)):
            data = await upstream.content.readany()
        if not data:
            return
        yield data


def _broken(error: dict[str, Any] | None, relay: StreamRelay) -> str | None:
    """How a student's stream failed after its first byte, or ``None`` when it did not."""
    if error is not None and error.get("type") == "upstream_error":
        return "stream_timeout" if "timed out" in error["message"] else "stream_dropped"
    if relay.assembler.malformed is not None:
        return "stream_malformed"
    if relay.assembler.error is not None:
        return "stream_error"  # the student's own error event, relayed as it came
    if not relay.done:
        return "stream_dropped"  # ended without [DONE]
    return None


def _error_event(reason: str) -> bytes:
    """The error event OpenAI sends in a stream that fails (the SDK raises APIError)."""
    error = {
        "message": f"The answer stopped: the model serving this route failed ({reason}).",
        "type": "server_error",
        "param": None,
        "code": reason,
    }
    return b"data: " + orjson.dumps({"error": error}) + b"\n\n"


async def _student_answers(
    request: web.Request, call: Call, route: Route, fields: dict[str, Any]
) -> web.StreamResponse | None:
    """The student's answer, relayed as the teacher's would be; ``None`` when it failed
    before anything reached the client (an error, a timeout before its first byte, an
    answer the route's validator refuses): then the teacher answers."""
    proxy = request.app[PROXY]
    body = route.student_request(call.body)
    if call.stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    must_parse = route.validates_json(call.body)
    call.answered_by("student", route.endpoint.base_url)
    stack = contextlib.AsyncExitStack()
    try:
        async with asyncio.timeout(route.settings.timeout):
            upstream = await stack.enter_async_context(
                proxy.session.post(
                    route.url,
                    data=orjson.dumps(body),
                    # As for the teacher: the proxy reads the answer, and relays it to a
                    # client that may take no compression.
                    headers={
                        "Content-Type": "application/json",
                        "Accept-Encoding": "identity",
                        **route.headers(),
                    },
                    allow_redirects=False,
                    skip_auto_headers=("User-Agent",),
                )
            )
            streaming = (
                call.stream
                and upstream.status == 200
                and upstream.content_type == "text/event-stream"
            )
            first = await upstream.content.readany() if streaming else b""
        if streaming and not must_parse:
            if not first:
                raise _Refused("empty stream")
            proxy.router.answered(route)
            async with stack:
                return await _relay_stream(request, upstream, call, fields, first, route)
        left = call.started + route.settings.total_timeout - time.perf_counter()
        async with asyncio.timeout(max(left, 0.001)):
            content = first + await upstream.read()
        problem = (
            "not_a_stream"
            if call.stream and not streaming and upstream.status < 400
            else _refusal(upstream, content, streaming, must_parse)
        )
        if problem is not None:
            raise _Refused(problem)
    except _Refused as exc:
        reason = str(exc)
    except TimeoutError:
        reason = "timeout"
    except aiohttp.ClientError:
        reason = "unreachable"
    else:
        proxy.router.answered(route)
        async with stack:
            if streaming:  # validated whole: relayed at once, parsed as it is sent
                return await _relay_stream(request, upstream, call, fields, content)
            return await _relay_json(request, upstream, call, content, fields)
    await stack.aclose()
    proxy.router.fell_back(route, reason)
    log_fields(request)["fallback"] = reason
    call.fell_back = True
    call.answered_by("teacher", proxy.upstream_url)
    return None


class _Refused(Exception):
    """The student's answer cannot go to the client (the message says why)."""


def _refusal(
    upstream: aiohttp.ClientResponse,
    content: bytes,
    streaming: bool,
    must_parse: bool,
) -> str | None:
    """Why the student's whole answer must not reach the client, or ``None``."""
    if upstream.status >= 400:
        return f"http_{upstream.status}"
    if streaming:
        relay = StreamRelay(strip_usage=False)
        relay.feed(content)
        relay.finish()
        answer = relay.assembler.result()
        if relay.assembler.error is not None or relay.assembler.malformed is not None:
            return "malformed"
    else:
        answer = _parse_json(content, upstream.headers.get("Content-Encoding"))
        if not isinstance(answer, dict) or "error" in answer or malformed(answer) is not None:
            return "malformed"
    if not _has_answer(answer):
        return "no_answer"
    if must_parse and not _parses(answer):
        return "invalid_json"
    return None


def _has_answer(answer: Any) -> bool:
    """Whether a completion carries a message to give the client (not an empty choices)."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    return (
        isinstance(choices, list)
        and bool(choices)
        and isinstance(choices[0], dict)
        and isinstance(choices[0].get("message"), dict)
    )


def _parses(answer: Any) -> bool:
    """Whether the answer's text is JSON (what a JSON response_format promises)."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return False
    content = (choices[0].get("message") or {}).get("content")
    if not isinstance(content, str):
        return False
    try:
        orjson.loads(content)
    except orjson.JSONDecodeError:
        return False
    return True


def _parse_json(content: bytes, encoding: str | None) -> Any:
    if encoding in ("gzip", "deflate"):
        try:
            content = zlib.decompress(content, zlib.MAX_WBITS | 32)
        except zlib.error:
            return None
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
