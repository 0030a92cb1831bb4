"""An OpenAI-compatible server playing several models with known behaviour, for eval tests.

teacher   answers every question exactly like the reference (``answer()``)
weak      right on even-numbered questions, "I don't know." on odd ones
flaky     like the teacher, but every prompt first gets a 429 (Retry-After: 0)
tools     calls lookup(id=<n>) with the arguments in a different key order
judge     score 10 when the graded answer equals the reference, else 2;
          pairwise: the slot holding the reference wins, tie when both do
mute-judge  answers every judge prompt with prose: no score, no label, no winner
broken    like the teacher on even-numbered questions, HTTP 500 on odd ones
embed     (embeddings) a 3-number vector per text, see ``vector()``
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from aiohttp import web


def answer(question: str) -> str:
    return f"The answer to '{question}' is {len(question)}."


def vector(text: str) -> list[float]:
    return [float(len(text)), float(text.count("a")), 1.0]


class FakeModels:
    url: str  # set by the test that serves it

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.seen_429: set[str] = set()
        self.app = web.Application()
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_post("/v1/embeddings", self.embeddings)
        self.app.router.add_get("/v1/models", self.models)
        # What GET /v1/models says: None lists nothing (a server that cannot say which
        # model it runs); a string is reported as the served files' content hash.
        self.listed: set[str] | None = {
            "teacher",
            "weak",
            "flaky",
            "tools",
            "judge",
            "mute-judge",
            "broken",
            "embed",
        }
        self.model_hash: str | None = None

    async def models(self, request: web.Request) -> web.Response:
        if self.listed is None:
            raise web.HTTPNotFound()
        data = [
            {"id": name, "object": "model", "created": 1, "owned_by": "fake"}
            | ({"distillery_model_hash": self.model_hash} if self.model_hash else {})
            for name in sorted(self.listed)
        ]
        return web.json_response({"object": "list", "data": data})

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.requests.append(
            {"model": body["model"], "headers": dict(request.headers), "body": body}
        )
        data = [
            {"object": "embedding", "index": i, "embedding": vector(t)}
            for i, t in enumerate(body["input"])
        ]
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": body["model"],
                "usage": {"prompt_tokens": 1, "total_tokens": 1},
            }
        )

    async def chat(self, request: web.Request) -> web.Response:
        body = await request.json()
        model = body["model"]
        self.requests.append({"model": model, "headers": dict(request.headers), "body": body})
        user = body["messages"][-1]["content"]
        if model == "flaky" and user not in self.seen_429:
            self.seen_429.add(user)
            return web.json_response(
                {
                    "error": {
                        "message": "Rate limit reached",
                        "type": "requests",
                        "param": None,
                        "code": "rate_limit_exceeded",
                    }
                },
                status=429,
                headers={"Retry-After": "0", "x-should-retry": "true"},
            )
        if model == "broken" and int(re.search(r"(\d+)", user).group(1)) % 2:  # type: ignore[union-attr]
            return web.json_response(
                {
                    "error": {
                        "message": "The server had an error",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                },
                status=500,
                headers={"x-should-retry": "false"},
            )
        message: dict[str, Any] = {"role": "assistant", "content": answer(user), "refusal": None}
        if model == "weak":
            number = int(re.search(r"(\d+)", user).group(1))  # type: ignore[union-attr]
            if number % 2:
                message["content"] = "I don't know."
        elif model == "tools":
            found = re.search(r"(\d+)", user).group(1)  # type: ignore[union-attr]
            message = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_x",
                        "type": "function",
                        "function": {
                            "name": "lookup",
                            "arguments": f'{{"verbose": false, "id": {found}}}',
                        },
                    }
                ],
            }
        elif model == "judge":
            message["content"] = orjson.dumps(self._judge(user)).decode()
        elif model == "mute-judge":
            message["content"] = "I would rather not say."
        return web.json_response(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": 1,
                "model": model,
                "choices": [
                    {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
                ],
                "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
            }
        )

    @staticmethod
    def _judge(prompt: str) -> dict[str, Any]:
        if prompt.startswith("Classify the answer"):
            graded = re.search(r"\nAnswer:\n(.*?)\n\nReply", prompt, re.S).group(1)  # type: ignore[union-attr]
            return {"label": "correct" if graded.startswith("The answer") else "wrong"}
        if "Answer A:" in prompt:
            a = re.search(r"Answer A:\n(.*?)\n\nAnswer B:", prompt, re.S).group(1)  # type: ignore[union-attr]
            b = re.search(r"Answer B:\n(.*?)\n\nReply", prompt, re.S).group(1)  # type: ignore[union-attr]
            good_a, good_b = a.startswith("The answer"), b.startswith("The answer")
            return {"winner": "tie" if good_a == good_b else ("A" if good_a else "B")}
        graded = re.search(r"Answer to grade:\n(.*?)\n\nReply", prompt, re.S).group(1)  # type: ignore[union-attr]
        reference = re.search(r"Reference answer:\n(.*?)\n\nAnswer to grade", prompt, re.S).group(1)  # type: ignore[union-attr]
        return {"score": 10 if graded == reference else 2, "reason": "compared with the reference"}
