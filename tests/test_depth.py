"""JSON nested deeper than the proxy's parser or serialiser goes, in a request or in a
streamed chunk: answered and recorded, or refused with OpenAI's 400 -- never answered and
left unrecorded, never a hang."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from distillery.proxy.state import PROXY

from corpus import Exchange, Replay
from helpers import RunningProxy, wait_for
from proxy_process import ProxyProcess

MESSAGES = [{"role": "user", "content": "hi"}]


def nested(depth: int) -> Any:
    """A value ``depth`` levels deep as a member of an object (arrays inside)."""
    return json.loads("[" * (depth - 1) + "]" * (depth - 1)) if depth > 1 else 1


def chunk(**delta: Any) -> bytes:
    body = {
        "id": "chatcmpl-deep",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


@pytest.fixture
def proxy(start_proxy: Callable[..., RunningProxy], replay: Replay) -> RunningProxy:
    return start_proxy({"upstream": {"url": replay.url + "/v1"}})


OK = Exchange(
    "ok",
    {},
    200,
    "application/json",
    orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hi"},
                    "finish_reason": "stop",
                }
            ],
        }
    ),
)


@pytest.mark.parametrize("depth", [2, 200, 252, 253, 254, 255, 300, 1023, 1024, 1100])
def test_a_deep_request_is_answered_and_recorded_or_refused_with_openais_400(
    proxy: RunningProxy, replay: Replay, depth: int
) -> None:
    replay.answer = OK
    # The body's object is level 1, "x" holds the rest.
    body = b'{"model":"m","messages":[],"x":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
    got = httpx.post(
        proxy.base_url + "/chat/completions",
        content=body,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    if got.status_code == 200:
        [row] = proxy.wait_stored(1)
        assert row["status"] == 200
        request = json.loads(row["request"])
        if "distillery_unstorable" in request:
            assert json.loads(request["json"])["x"] == json.loads(body)["x"]
        else:
            assert request["x"] == json.loads(body)["x"]
    else:
        assert got.status_code == 400, got.text
        assert got.json()["error"]["code"] == "invalid_json"
        assert replay.requests == []  # refused before it was forwarded
        assert proxy.rows() == []


@pytest.mark.parametrize("usage", ["asked", "added"])
@pytest.mark.parametrize("depth", [253, 254, 255, 300, 1100])
def test_a_deep_streamed_chunk_is_relayed_at_once_and_recorded(
    proxy: RunningProxy, replay: Replay, depth: int, usage: str
) -> None:
    deep = (
        b'data: {"id":"chatcmpl-deep","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"x":'
        + b"[" * depth
        + b"]" * depth
        + b'},"finish_reason":null}], "usage": null}\n\n'
    )
    body = (
        chunk(role="assistant", content="Hel")
        + deep
        + chunk(content="lo")
        + b'data: {"id":"chatcmpl-deep","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
        + b"data: [DONE]\n\n"
    )
    replay.answer = Exchange("deep", {}, 200, "text/event-stream", body)
    request: dict[str, Any] = {"model": "m", "messages": MESSAGES, "stream": True}
    if usage == "asked":
        request["stream_options"] = {"include_usage": True}
    # A hang (the old relay raised mid-stream) fails the timeout.
    got = httpx.post(proxy.base_url + "/chat/completions", json=request, timeout=10)
    assert got.status_code == 200
    if usage == "asked":
        assert got.content == body
    else:  # every event arrives, whatever happened to the "usage": null the proxy added
        assert got.content.count(b"data: ") == body.count(b"data: ")
        assert got.content.endswith(b"data: [DONE]\n\n")
    [row] = proxy.wait_stored(1)
    assert row["status"] == 200
    if depth > 1024:  # past what orjson reads: relayed, and recorded as not assembled
        error = json.loads(row["error"])
        assert error["type"] == "upstream_malformed"
        assert "chunk 2 is not JSON the proxy can read" in error["message"]
        return
    assert row["error"] is None
    response = json.loads(row["response"])
    assert response["distillery_unstorable"] == "nested too deeply"
    message = json.loads(response["json"])["choices"][0]["message"]
    assert message["content"] == "Hello"
    assert message["x"] == nested(depth + 1)


def test_a_large_body_is_parsed_and_captured_off_the_event_loop(
    proxy: RunningProxy, replay: Replay, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a 3 MB request is being parsed (held here until the test says so), a small
    one is answered: the big one's parsing and capture run in threads, not on the loop."""
    from distillery.core import api_errors
    from distillery.proxy import chat

    held = threading.Event()
    parsed_on_loop: list[bool] = []
    captured_on_loop: list[bool] = []
    capture = proxy.app[PROXY].capture
    assert capture is not None
    parse, submit = api_errors.json_object, capture.submit

    def on_loop() -> bool:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return False
        return True

    def slow_parse(raw: bytes) -> dict[str, Any]:
        if len(raw) > chat.LARGE_BODY:
            parsed_on_loop.append(on_loop())
            assert held.wait(10), "the small request was never answered"
        return parse(raw)

    def watched_submit(record: Any) -> str:
        captured_on_loop.append(on_loop())
        return submit(record)

    monkeypatch.setattr(chat, "json_object", slow_parse)
    monkeypatch.setattr(capture, "submit", watched_submit)
    replay.answer = OK
    big = {"model": "m", "messages": [{"role": "user", "content": "x" * 3_000_000}]}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            httpx.post, proxy.base_url + "/chat/completions", json=big, timeout=30
        )
        wait_for(lambda: bool(parsed_on_loop), what="the big request being parsed")
        small = httpx.post(
            proxy.base_url + "/chat/completions",
            json={"model": "m", "messages": MESSAGES},
            timeout=10,
        )
        assert small.status_code == 200
        held.set()
        assert pending.result().status_code == 200
    assert parsed_on_loop == [False]
    # The small call was captured on the loop, the big one in a thread.
    assert captured_on_loop == [True, False]
    assert len(proxy.wait_stored(2)) == 2


@pytest.mark.slow
def test_deep_json_through_a_real_proxy_process(
    replay: Replay, tmp_path: Path, unused_tcp_port: int
) -> None:
    """The same limits in a ``distillery proxy`` process: a request nested 254 levels and a
    stream with a chunk nested 300 levels (the usage the proxy added stripped) are answered
    at once and recorded; one nested 300 levels is refused with OpenAI's 400."""
    database = tmp_path / "db.sqlite"
    proxy = ProxyProcess(
        unused_tcp_port, replay.url + "/v1", tmp_path / "data", f"sqlite:///{database}"
    ).start()
    url = proxy.base_url + "/chat/completions"
    headers = {"Content-Type": "application/json"}

    def deep_request(depth: int) -> bytes:
        return b'{"model":"m","messages":[],"x":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"

    replay.answer = OK
    assert (
        httpx.post(url, content=deep_request(254), headers=headers, timeout=10).status_code == 200
    )
    refused = httpx.post(url, content=deep_request(300), headers=headers, timeout=10)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_json"
    deep = (
        b'data: {"id":"chatcmpl-deep","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"x":'
        + b"[" * 300
        + b"]" * 300
        + b'},"finish_reason":null}], "usage": null}\n\n'
    )
    body = chunk(role="assistant", content="Hi") + deep + b"data: [DONE]\n\n"
    replay.answer = Exchange("deep", {}, 200, "text/event-stream", body)
    streamed = httpx.post(
        url, json={"model": "m", "messages": MESSAGES, "stream": True}, timeout=10
    )
    assert streamed.status_code == 200 and streamed.content.endswith(b"data: [DONE]\n\n")

    def rows() -> list[tuple[Any, ...]]:
        with sqlite3.connect(database) as lite:
            try:
                return lite.execute(
                    "SELECT status, stream, error FROM completions ORDER BY id"
                ).fetchall()
            except sqlite3.OperationalError:
                return []

    wait_for(lambda: len(rows()) == 2, what="both calls recorded")
    assert rows() == [(200, 0, None), (200, 1, None)]
