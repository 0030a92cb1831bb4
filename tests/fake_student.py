"""A fake OpenAI-compatible student whose answers a test decides, and the small
helpers the routes tests (and the dashboard's routes page tests) drive it with."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

from distillery.curation.judge import install_in_thread
from distillery.store import routes as route_store

from fake_openai import TEXT_PIECES
from helpers import RunningProxy, ServerThread

TEACHER_TEXT = "".join(TEXT_PIECES)
ALICE = "sk-alice-key"


class FakeStudent:
    """An OpenAI-compatible student whose answers the test decides."""

    url: str

    def __init__(self) -> None:
        self.behaviour = "good"
        # How a stream breaks after its first text: "drop" (the connection cut), "truncate"
        # (ended cleanly, without [DONE]), "garbage"
        # (an event that is not JSON), "stall" (nothing more until released); None: it does not.
        self.breaks: str | None = None
        self.wrong_on: str | None = None  # a prompt containing this is answered wrongly
        self.requests: list[dict[str, Any]] = []
        self.release = threading.Event()
        self.files: str | None = None  # the content hash /v1/models reports, as `serve` does
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_get("/v1/models", self.models)

    async def models(self, request: web.Request) -> web.Response:
        entry: dict[str, Any] = {"id": "tiny", "object": "model", "owned_by": "distillery"}
        if self.files is not None:
            entry["distillery_model_hash"] = self.files
        return web.json_response({"object": "list", "data": [entry]})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(body)
        if self.behaviour == "flaky" and len(self.requests) % 2:  # every other call fails
            return web.json_response(
                {"error": {"message": "the student fell over", "type": "server_error"}},
                status=500,
            )
        if self.behaviour == "broken":
            return web.json_response(
                {"error": {"message": "the student fell over", "type": "server_error"}},
                status=500,
            )
        if self.behaviour == "held":  # until the test releases it (off the server's loop)
            await asyncio.to_thread(self.release.wait)
        if self.behaviour == "empty" and not body.get("stream"):  # a 200 with no answer
            return web.json_response(
                {
                    "id": "chatcmpl-student",
                    "object": "chat.completion",
                    "created": 1,
                    "model": body["model"],
                    "choices": [],
                }
            )
        text = {
            "good": TEACHER_TEXT,
            "held": TEACHER_TEXT,
            "bad": "I don't know.",
            "chatty": "Write to carol@example.com",
            "json": '{"ok": true}',
            "empty": TEACHER_TEXT,
            "flaky": TEACHER_TEXT,
        }[self.behaviour]
        if self.wrong_on is not None and self.wrong_on in json.dumps(body.get("messages")):
            text = "I don't know."
        if body.get("stream"):
            return await self.stream(request, body["model"], text)
        answer = web.json_response(
            {
                "id": "chatcmpl-student",
                "object": "chat.completion",
                "created": 1,
                "model": body["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "stop",
                    }
                ],
                "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
            }
        )
        if "gzip" in request.headers.get("Accept-Encoding", ""):  # as OpenAI does
            answer.enable_compression(web.ContentCoding.gzip)
        return answer

    async def stream(self, request: web.Request, model: str, text: str) -> web.StreamResponse:
        """OpenAI's SSE: a role chunk, the text in two pieces, a usage chunk, [DONE]."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        half = len(text) // 2
        deltas = [{"role": "assistant", "content": ""}, {"content": text[:half]}]
        deltas.append({"content": text[half:]})
        for n, delta in enumerate(deltas):
            chunk = {
                "id": "chatcmpl-student",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}],
                "usage": None,
            }
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            if n == 1 and self.breaks == "drop":
                assert request.transport is not None
                request.transport.abort()
                return response
            if n == 1 and self.breaks == "truncate":  # a clean end, without [DONE]
                await response.write_eof()
                return response
            if n == 1 and self.breaks == "garbage":
                await response.write(b"data: {this is not json\n\n")
            if n == 1 and self.breaks == "stall":
                await asyncio.to_thread(self.release.wait)
        last = {
            "id": "chatcmpl-student",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": model,
            "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}],
            "usage": None,
        }
        usage = {
            **last,
            "choices": [],
            "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
        }
        for chunk in (last, usage):
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


def ask(proxy: RunningProxy, n: int, app: str = "support", key: str = ALICE) -> httpx.Response:
    return httpx.post(
        proxy.base_url + "/chat/completions",
        json={"model": "fake-model", "messages": [{"role": "user", "content": f"question {n}"}]},
        headers={"Authorization": f"Bearer {key}", "X-Distillery-Tag-app": app},
        timeout=10,
    )


def samples(proxy: RunningProxy, route: str = "support") -> list[dict[str, Any]]:
    return route_store.recent(proxy.reader, route, 1000)


def served(student: FakeStudent, servers: ServerThread) -> FakeStudent:
    student.url, _ = servers.serve(student.app)
    return student


def route_config(student: FakeStudent, **route: Any) -> dict[str, Any]:
    """Config with one route, ``support`` (calls tagged app=support), to ``student``;
    ``route`` overrides the route's settings (``routes=`` replaces them all)."""
    routes = route.pop("routes", None) or {
        "support": {
            "match": {"app": "support"},
            "student": "tiny@student",
            "graders": ["exact"],
            "bar": 0.9,
            "min_samples": 3,
            **route,
        }
    }
    return {"endpoints": {"student": {"base_url": student.url + "/v1"}}, "routes": routes}


def routed(
    start_proxy: Callable[..., RunningProxy], student: FakeStudent, **route: Any
) -> RunningProxy:
    """A proxy (in this process, its judge in a thread) with the ``support`` route."""
    return start_proxy(route_config(student, **route), extensions=[install_in_thread])


def config_file(directory: Path, student: FakeStudent, *more: str) -> Path:
    """A config file with the ``support`` route to ``student``, as a user writes one."""
    path = directory / "distillery.toml"
    lines = [
        "[endpoints.student]",
        f'base_url = "{student.url}/v1"',
        "[routes.support]",
        'match = { app = "support" }',
        'student = "tiny@student"',
        'graders = ["exact"]',
        "bar = 0.9",
        *more,
    ]
    path.write_text("\n".join(lines) + "\n")
    return path
