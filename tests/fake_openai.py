"""An aiohttp server that behaves like OpenAI's chat completions API, for tests.

What it answers depends on the request's ``model``:

    fake-model        a normal completion (JSON, or SSE when stream=true)
    fake-tools        a tool call (two calls, arguments streamed in pieces)
    fake-error-400    OpenAI's 400 error JSON
    fake-error-500    a 500 error JSON
    fake-cut          a stream (or body) cut off mid-way by closing the socket
    fake-slow         takes `slow_seconds` to answer (spread over the chunks when streaming)
    fake-midstream-error  an SSE stream that ends with an error event
    fake-many         a stream of `many_deltas` small deltas, written 1,000 events at a time
    fake-deep         a completion with a member nested 300 levels deep
    fake-malformed-choices / fake-malformed-usage / fake-malformed-delta
                      answers whose shape is not OpenAI's (choices a string, usage a
                      list, a delta that is a string)

Streams follow OpenAI: compact JSON chunks, ``"usage":null`` on every chunk and a
final usage-only chunk when ``stream_options.include_usage`` is set, then
``data: [DONE]``.  Every request received is kept in ``requests``.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
from typing import Any

import orjson
from aiohttp import web

CREATED = 1_700_000_000
TEXT_PIECES = ["Hello", " from", " the", " teacher", ". Mail me at bob@example.com"]


def _usage(prompt: int = 9, completion: int = 12) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


@web.middleware
async def openai_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Unknown routes and methods answer in OpenAI's error JSON, as OpenAI does."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return web.json_response(
            {
                "error": {
                    "message": exc.reason,
                    "type": "invalid_request_error",
                    "param": None,
                    "code": None,
                }
            },
            status=exc.status,
        )


class FakeOpenAI:
    url: str  # set by the test that serves it

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.slow_seconds = 2.0
        self.many_deltas = 32_000  # fake-many: a stream of this many one-word deltas
        self.app = web.Application(client_max_size=200 * 1024 * 1024, middlewares=[openai_errors])
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/v1/chat/completions", self.stored_list)
        self.app.router.add_post("/v1/embeddings", self.embeddings)
        self.app.router.add_post("/v1/files", self.files)
        self.counter = 0

    def _record(self, request: web.Request, body: Any) -> None:
        self.requests.append(
            {
                "path": request.path_qs,
                "method": request.method,
                "headers": dict(request.headers),
                "body": body,
            }
        )

    async def models(self, request: web.Request) -> web.Response:
        self._record(request, None)
        body = orjson.dumps(
            {
                "object": "list",
                "data": [
                    {"id": "fake-model", "object": "model", "created": CREATED, "owned_by": "fake"}
                ],
            }
        )
        if "gzip" in request.headers.get("Accept-Encoding", ""):
            return web.Response(
                body=gzip.compress(body),
                headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
            )
        return web.Response(body=body, content_type="application/json")

    async def stored_list(self, request: web.Request) -> web.Response:
        self._record(request, None)
        return web.json_response(
            {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
        )

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        self._record(request, body)
        return web.json_response(
            {
                "object": "list",
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                "model": body["model"],
                "usage": {"prompt_tokens": 3, "total_tokens": 3},
            }
        )

    async def files(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self._record(request, {"bytes": len(raw)})
        return web.json_response(
            {
                "id": "file-abc",
                "object": "file",
                "bytes": len(raw),
                "created_at": CREATED,
                "filename": "train.jsonl",
                "purpose": "fine-tune",
                "status": "processed",
            }
        )

    def _error(self, status: int, message: str, code: str | None) -> web.Response:
        return web.Response(
            status=status,
            body=orjson.dumps(
                {
                    "error": {
                        "message": message,
                        "type": "invalid_request_error",
                        "param": None,
                        "code": code,
                    }
                }
            ),
            content_type="application/json",
            headers={"x-request-id": "req_error"},
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json(loads=orjson.loads)
        self._record(request, body)
        try:
            return await self._chat(request, body)
        except (TypeError, ValueError, AttributeError) as exc:
            # Like OpenAI, any request it cannot read gets a 400 in its error shape.
            return self._error(400, f"The fake upstream cannot read this request: {exc}", None)

    async def _chat(self, request: web.Request, body: Any) -> web.StreamResponse:
        self.counter += 1
        model = body.get("model", "")
        if not isinstance(model, str):
            return self._error(400, "Invalid type for 'model': expected a string.", "invalid_type")
        if model == "fake-error-400":
            return self._error(400, "Invalid value for 'temperature'.", "invalid_value")
        if model == "fake-error-500":
            return self._error(500, "The server had an error while processing your request.", None)
        if model == "fake-slow" and not body.get("stream"):
            await asyncio.sleep(self.slow_seconds)
        # Deterministic per conversation, so direct and proxied answers compare byte for byte.
        digest = hashlib.sha1(orjson.dumps(body.get("messages"))).hexdigest()[:12]
        completion_id = f"chatcmpl-{digest}"
        n = body.get("n") or 1
        if not isinstance(n, int) or not 1 <= n <= 8:
            return self._error(
                400, f"Invalid 'n': {str(n)[:20]}; expected 1 to 8.", "invalid_value"
            )
        headers = {"x-request-id": f"req_{digest}", "openai-processing-ms": "12"}
        if body.get("stream"):
            if model == "fake-many":
                return await self._many(request, completion_id)
            if model == "fake-malformed-delta":
                return await self._malformed_stream(request, completion_id)
            return await self._stream(request, body, completion_id, model, n, headers)
        if model == "fake-malformed-choices":
            return web.json_response(
                {"id": completion_id, "object": "chat.completion", "choices": "x"}
            )
        if model == "fake-deep":
            deep: Any = 1
            for _ in range(300):
                deep = [deep]
            return web.json_response(
                {"id": completion_id, "object": "chat.completion", "choices": [], "x": deep}
            )
        if model == "fake-malformed-usage":
            return web.json_response(
                {"id": completion_id, "object": "chat.completion", "choices": [], "usage": [1, 2]}
            )
        if model == "fake-cut":
            response = web.StreamResponse(
                headers={"Content-Type": "application/json", "Content-Length": "500"}
            )
            await response.prepare(request)
            await response.write(b'{"id": "chatcmpl-cut", "obj')
            request.transport.abort()  # type: ignore[union-attr]
            return response
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(TEXT_PIECES),
            "refusal": None,
            "annotations": [],
        }
        finish = "stop"
        if model == "fake-tools":
            message["content"] = None
            message["tool_calls"] = [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                },
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_time", "arguments": '{"tz": "CET"}'},
                },
            ]
            finish = "tool_calls"
        payload = {
            "id": completion_id,
            "object": "chat.completion",
            "created": CREATED,
            "model": model + "-2024-08-06",
            "choices": [
                {"index": i, "message": message, "logprobs": None, "finish_reason": finish}
                for i in range(n)
            ],
            "usage": _usage(),
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
        }
        return web.Response(
            body=orjson.dumps(payload), content_type="application/json", headers=headers
        )

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        completion_id: str,
        model: str,
        n: int,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        response = web.StreamResponse(
            headers={**headers, "Content-Type": "text/event-stream; charset=utf-8"}
        )
        await response.prepare(request)

        async def send(
            choices: list[dict[str, Any]], usage: Any = None, last: bool = False
        ) -> None:
            chunk: dict[str, Any] = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": CREATED,
                "model": model + "-2024-08-06",
                "service_tier": "default",
                "system_fingerprint": "fp_fake",
                "choices": choices,
            }
            if include_usage:
                chunk["usage"] = usage
            await response.write(b"data: " + orjson.dumps(chunk) + b"\n\n")

        for i in range(n):
            await send(
                [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": "", "refusal": None},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            )
        if model == "fake-tools":
            calls = [
                ("call_1", "get_weather", ['{"ci', 'ty": "Pa', 'ris"}']),
                ("call_2", "get_time", ['{"tz"', ': "CET"}']),
            ]
            for index, (call_id, name, pieces) in enumerate(calls):
                await send(
                    [
                        {
                            "index": 0,
                            "delta": {
                                "tool_calls": [
                                    {
                                        "index": index,
                                        "id": call_id,
                                        "type": "function",
                                        "function": {"name": name, "arguments": ""},
                                    }
                                ]
                            },
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
                for piece in pieces:
                    await send(
                        [
                            {
                                "index": 0,
                                "delta": {
                                    "tool_calls": [
                                        {"index": index, "function": {"arguments": piece}}
                                    ]
                                },
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    )
            finish = "tool_calls"
        else:
            for number, piece in enumerate(TEXT_PIECES):
                if model == "fake-slow":
                    await asyncio.sleep(self.slow_seconds / len(TEXT_PIECES))
                for i in range(n):
                    await send(
                        [
                            {
                                "index": i,
                                "delta": {"content": piece},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    )
                if model == "fake-cut" and number == 2:
                    request.transport.abort()  # type: ignore[union-attr]
                    return response
                if model == "fake-midstream-error" and number == 1:
                    await response.write(
                        b'data: {"error":{"message":"The model overloaded.",'
                        b'"type":"server_error","param":null,"code":null}}\n\n'
                    )
                    await response.write_eof()
                    return response
            finish = "stop"
        for i in range(n):
            await send([{"index": i, "delta": {}, "logprobs": None, "finish_reason": finish}])
        if include_usage:
            await send([], usage=_usage())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _many(self, request: web.Request, completion_id: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        head = (
            b'data: {"id":"' + completion_id.encode() + b'","object":"chat.completion.chunk",'
            b'"created":1700000000,"model":"fake-many","choices":[{"index":0,"delta":'
        )
        events = [
            head + b'{"content":"w' + str(i).encode() + b' "},"finish_reason":null}]}\n\n'
            for i in range(self.many_deltas)
        ]
        for start in range(0, len(events), 1000):
            await response.write(b"".join(events[start : start + 1000]))
        await response.write(head + b'{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n')
        await response.write_eof()
        return response

    async def _malformed_stream(
        self, request: web.Request, completion_id: str
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for delta in ('{"role":"assistant","content":""}', '"a string delta"', '{"content":"x"}'):
            await response.write(
                b'data: {"id":"' + completion_id.encode() + b'","object":"chat.completion.chunk",'
                b'"choices":[{"index":0,"delta":' + delta.encode() + b"}]}\n\n"
            )
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
