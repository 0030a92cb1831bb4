"""Real OpenAI traffic, recorded by other projects, and a server that replays it.

``corpus/openai_chat.json`` holds chat-completion exchanges recorded against
api.openai.com by public projects' test cassettes (sources and licences in
``corpus/README.md``).  The proxy's own fakes stream the way this project
believes OpenAI streams; these are what OpenAI sent.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai
from aiohttp import web

CORPUS = Path(__file__).parent / "corpus" / "openai_chat.json"


@dataclass(frozen=True)
class Exchange:
    name: str
    request: dict[str, Any]
    status: int
    content_type: str
    body: bytes

    @property
    def stream(self) -> bool:
        return self.content_type.startswith("text/event-stream")

    def chunks(self) -> list[dict[str, Any]]:
        """The stream's JSON events, as OpenAI sent them."""
        events = self.body.decode().split("\n\n")
        data = [e.removeprefix("data: ") for e in events if e.startswith("data: ")]
        return [json.loads(d) for d in data if d != "[DONE]"]


def exchanges() -> list[Exchange]:
    return [
        Exchange(
            name=entry["name"],
            request=entry["request"],
            status=entry["status"],
            content_type=entry["content_type"],
            body=entry["body"].encode(),
        )
        for entry in json.loads(CORPUS.read_text())
    ]


@dataclass
class Replay:
    """An upstream that answers the next call with ``answer``, byte for byte, in small writes
    (as a real stream arrives), and keeps what each call asked."""

    answer: Exchange | None = None
    piece: int = 97
    requests: list[dict[str, Any]] = field(default_factory=list)
    app: web.Application = field(
        default_factory=lambda: web.Application(client_max_size=200 * 1024 * 1024)
    )
    url: str = ""

    def __post_init__(self) -> None:
        self.app.router.add_post("/v1/chat/completions", self._answer)

    async def _answer(self, request: web.Request) -> web.StreamResponse:
        self.requests.append(await request.json())
        answer = self.answer
        assert answer is not None, "the test set no answer"
        response = web.StreamResponse(status=answer.status)
        response.content_type = answer.content_type.split(";")[0]
        if "charset=" in answer.content_type:
            response.charset = answer.content_type.split("charset=")[1]
        response.headers["x-request-id"] = f"req_replay_{len(self.requests)}"
        await response.prepare(request)
        for start in range(0, len(answer.body), self.piece):
            await response.write(answer.body[start : start + self.piece])
        await response.write_eof()
        return response


def call(client: openai.OpenAI, request: dict[str, Any]) -> tuple[int, bytes]:
    """The recorded request, sent by the SDK; the status and raw bytes the client got."""
    extra = {k: v for k, v in request.items() if k not in ("model", "messages", "stream")}
    try:
        with client.chat.completions.with_streaming_response.create(
            model=request["model"],
            messages=request["messages"],
            stream=request.get("stream", False),
            extra_body=extra,
        ) as response:
            return response.status_code, b"".join(response.iter_bytes())
    except openai.APIStatusError as exc:
        return exc.status_code, exc.response.content
