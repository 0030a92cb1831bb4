"""``POST /v1/chat/completions``: tag, forward, relay, capture.

The order of work is chosen for latency and for the no-loss promise: the
request is parsed and tagged, forwarded, and the answer relayed as it arrives;
the capture record is spooled after the last upstream byte but *before* the
client receives the end of the response (the body of a JSON answer, the
``[DONE]`` of a stream).  Logging and metrics happen after delivery.
"""

from __future__ import annotations

import time
import zlib
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import web
from multidict import CIMultiDictProxy

from distillery.proxy.errors import APIError, upstream_timeout, upstream_unreachable
from distillery.proxy.forward import abort, request_headers, response_headers, upstream_url
from distillery.proxy.state import PROXY, REQUEST_ID, Proxy, log_fields
from distillery.proxy.stream import StreamRelay
from distillery.proxy.tagging import merge_metadata, prompt_fingerprint

log = structlog.get_logger()


class Call:
    """Everything known about one chat completion call, turned into a record at the end."""

    def __init__(self, proxy: Proxy, request: web.Request, tenant: str, body: dict[str, Any]):
        self.proxy = proxy
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

    def payload(self) -> bytes:
        if not self.strip_usage:
            return orjson.dumps(self.body)
        options = dict(self.body.get("stream_options") or {}, include_usage=True)
        return orjson.dumps({**self.body, "stream_options": options})

    def finish(
        self,
        status: int,
        response: dict[str, Any] | None,
        error: Any,
        headers: CIMultiDictProxy[str] | None = None,
    ) -> str:
        """Hand the record to capture; returns the outcome for the log line."""
        if self.capture is None:
            return "sampled_out" if self.proxy.capture else "off"
        choices = (response or {}).get("choices") or [{}]
        usage = (response or {}).get("usage") or {}
        model = self.body.get("model")
        record = {
            "id": self.id,
            "completion_id": (response or {}).get("id"),
            "created_at": self.created_at,
            "tenant": self.tenant,
            "upstream": self.proxy.upstream_url,
            "path": self.path,
            "model_requested": model if isinstance(model, str) else None,
            "model_served": (response or {}).get("model"),
            "status": status,
            "stream": self.stream,
            "finish_reason": choices[0].get("finish_reason")
            if isinstance(choices[0], dict)
            else None,
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
            "total_tokens": usage.get("total_tokens"),
            "latency_ms": round((time.perf_counter() - self.started) * 1000, 3),
            "ttft_ms": self.ttft_ms,
            "upstream_request_id": headers.get("x-request-id") if headers else None,
            "prompt_fingerprint": self.fingerprint,
            "request": self.body,
            "response": response,
            "error": error,
            "metadata": self.metadata,
        }
        outcome = self.capture.submit(record)
        self.proxy.metrics.captured.labels(outcome).inc()
        return outcome


async def chat_completions(request: web.Request) -> web.StreamResponse:
    proxy = request.app[PROXY]
    tenant, authorization = proxy.authorize(request)
    fields = log_fields(request)
    fields["tenant"] = tenant
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise APIError(
            413,
            f"Request body is larger than the proxy's limit of "
            f"{proxy.settings.proxy.max_body_mb} MB (proxy.max_body_mb).",
            code="request_too_large",
        ) from None
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise APIError(400, f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    call = Call(proxy, request, tenant, body)
    fields.update(model=body.get("model"), stream=call.stream, tags=len(call.metadata))
    headers = request_headers(request.headers, authorization, identity=True)
    headers["Content-Type"] = "application/json"
    try:
        async with proxy.session.post(
            upstream_url(proxy.upstream_url, request),
            data=call.payload(),
            headers=headers,
            allow_redirects=False,
        ) as upstream:
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

    response = web.Response(
        body=content,
        status=upstream.status,
        reason=upstream.reason,
        headers=response_headers(upstream.headers),
    )
    parsed = _parse_json(content, upstream.headers.get("Content-Encoding"))
    if upstream.status < 400 and isinstance(parsed, dict) and "error" not in parsed:
        outcome = call.finish(upstream.status, parsed, None, upstream.headers)
    else:
        error = (
            parsed if parsed is not None else {"body": content[:4096].decode("utf-8", "replace")}
        )
        outcome = call.finish(upstream.status, None, error, upstream.headers)
    fields["capture"] = outcome
    await response.prepare(request)
    await response.write_eof()
    return response


async def _relay_stream(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    call: Call,
    fields: dict[str, Any],
) -> web.StreamResponse:
    response = web.StreamResponse(
        status=upstream.status, reason=upstream.reason, headers=response_headers(upstream.headers)
    )
    await response.prepare(request)
    relay = StreamRelay(strip_usage=call.strip_usage)
    error: dict[str, Any] | None = None
    client_gone = False
    try:
        async for data in upstream.content.iter_any():
            if call.ttft_ms is None:
                call.ttft_ms = round((time.perf_counter() - call.started) * 1000, 3)
            out = relay.feed(data)
            if out:
                try:
                    await response.write(out)
                except ConnectionResetError:
                    client_gone = True
                    break
    except (TimeoutError, aiohttp.ClientError) as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else f"failed: {exc!r}"
        error = {"message": f"upstream stream {reason}", "type": "upstream_error"}
    if client_gone:
        error = {"message": "client disconnected before the stream ended", "type": "client_error"}
    elif relay.assembler.error is not None:
        error = {"error": relay.assembler.error}
    fields["capture"] = call.finish(
        upstream.status, relay.assembler.result(), error, upstream.headers
    )
    if client_gone:
        log.info("client went away mid-stream")
        return response
    if error is not None and error.get("type") == "upstream_error":
        tail = relay.finish()
        if tail:
            await response.write(tail)
        abort(request)
        return response
    await response.write(relay.finish())
    await response.write_eof()
    return response


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
