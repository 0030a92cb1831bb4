"""``distillery serve MODEL_DIR``: an OpenAI-compatible endpoint for a fine-tuned student.

vLLM's own OpenAI server when vLLM is installed; otherwise this plain
transformers server: ``POST /v1/chat/completions`` (streaming too) and
``GET /v1/models``, one generation at a time (a student is small; run more
processes for more throughput), greedy at temperature 0.  Evals and the proxy
then call the student like any other model.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, cast

import orjson
import structlog
from aiohttp import web

from distillery.core.api_errors import APIError, from_http_exception, json_object, unhandled

log = structlog.get_logger()

STUDENT = web.AppKey("student", object)
NAME = web.AppKey("name", str)
HASH = web.AppKey("model_hash", str)


def model_hash(path: Path) -> str:
    """SHA-256 over a model directory's files (names and bytes): the model's identity.

    Evals cache a served model's answers under it, so the same files served on
    any port hit the cache and different files under the same name never do.
    """
    digest = hashlib.sha256()
    if not path.exists():  # a hub name: that is all that is known of it
        digest.update(b"name\0" + str(path).encode())
        return digest.hexdigest()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        digest.update(b"\0")
        with file.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


class Student:
    def __init__(self, path: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = (
            torch.bfloat16
            if self.device == "cuda" and torch.cuda.is_bf16_supported()
            else torch.float32
        )
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = cast(Any, AutoModelForCausalLM.from_pretrained(path, dtype=dtype)).to(
            self.device
        )
        self.model.eval()
        self.lock = threading.Lock()

    def _inputs(self, messages: list[dict[str, Any]], tools: Any) -> Any:
        prompt = self.tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False
        )
        return self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False).to(self.device)

    def generate(
        self, messages: list[dict[str, Any]], params: dict[str, Any], streamer: Any = None
    ) -> tuple[str, int, int, str]:
        inputs = self._inputs(messages, params.get("tools"))
        temperature = float(params.get("temperature") or 0)
        limit = int(params.get("max_completion_tokens") or params.get("max_tokens") or 256)
        options: dict[str, Any] = {
            "max_new_tokens": limit,
            "do_sample": temperature > 0,
            "pad_token_id": self.tokenizer.pad_token_id or self.tokenizer.eos_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
        }
        if temperature > 0:
            options.update(temperature=temperature, top_p=float(params.get("top_p") or 1.0))
        with self.lock, self.torch.no_grad():
            output = self.model.generate(**inputs, **options, streamer=streamer)
        new = output[0][inputs["input_ids"].shape[1] :]
        text = str(self.tokenizer.decode(new, skip_special_tokens=True))
        finish = (
            "length" if len(new) >= limit and new[-1] != self.tokenizer.eos_token_id else "stop"
        )
        return text, int(inputs["input_ids"].shape[1]), len(new), finish


def _body(request_bytes: bytes) -> dict[str, Any]:
    body = json_object(request_bytes)
    if not isinstance(body.get("messages"), list) or not body["messages"]:
        raise APIError(400, "'messages' must be a non-empty list.", param="messages")
    return body


async def chat(request: web.Request) -> web.StreamResponse:
    student: Student = request.app[STUDENT]  # type: ignore[assignment]
    name = request.app[NAME]
    body = _body(await request.read())
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if body.get("stream") is True:
        return await _stream(request, student, body, completion_id, created, name)
    text, prompt_tokens, completion_tokens, finish = await asyncio.to_thread(
        student.generate, body["messages"], body
    )
    return web.json_response(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }
    )


async def _stream(
    request: web.Request,
    student: Student,
    body: dict[str, Any],
    completion_id: str,
    created: int,
    name: str,
) -> web.StreamResponse:
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(student.tokenizer, skip_prompt=True, skip_special_tokens=True)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
    await response.prepare(request)

    def chunk(delta: dict[str, Any], finish: str | None = None, usage: Any = None) -> bytes:
        payload: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": name,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if usage is not None:
            payload = {**payload, "choices": [], "usage": usage}
        return b"data: " + orjson.dumps(payload) + b"\n\n"

    await response.write(chunk({"role": "assistant", "content": ""}))
    job = asyncio.ensure_future(
        asyncio.to_thread(student.generate, body["messages"], body, streamer)
    )
    loop = asyncio.get_running_loop()
    pieces = iter(streamer)
    while True:
        piece = await loop.run_in_executor(None, next, pieces, None)
        if piece is None:
            break
        if piece:
            await response.write(chunk({"content": piece}))
    _, prompt_tokens, completion_tokens, finish = await job
    await response.write(chunk({}, finish))
    if (body.get("stream_options") or {}).get("include_usage"):
        await response.write(
            chunk(
                {},
                usage={
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            )
        )
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def models(request: web.Request) -> web.Response:
    return web.json_response(
        {
            "object": "list",
            "data": [
                {
                    "id": request.app[NAME],
                    "object": "model",
                    "created": 0,
                    "owned_by": "distillery",
                    "distillery_model_hash": request.app[HASH],
                }
            ],
        }
    )


@web.middleware
async def openai_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except APIError as error:
        return error.response()
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return from_http_exception(exc, request).response()
    except Exception:
        log.exception("unhandled error", path=request.path)
        return unhandled("student server").response()


def make_app(path: Path, name: str) -> web.Application:
    app = web.Application(middlewares=[openai_errors])
    app[STUDENT] = Student(path)
    app[NAME] = name
    app[HASH] = model_hash(path)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    return app


def serve(path: Path, host: str, port: int, name: str) -> None:
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        os.execvp(
            sys.executable,
            [
                sys.executable,
                "-m",
                "vllm.entrypoints.openai.api_server",
                "--model",
                str(path),
                "--served-model-name",
                name,
                "--host",
                host,
                "--port",
                str(port),
            ],
        )
    web.run_app(make_app(path, name), host=host, port=port, print=None, access_log=None)
