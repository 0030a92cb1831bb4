"""The proxy end to end: the real openai SDK -> proxy -> a fake OpenAI upstream."""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import Callable
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from fake_openai import TEXT_PIECES, FakeOpenAI
from helpers import RunningProxy, wait_for

MESSAGES = [
    {"role": "system", "content": "You are a support bot for ACME. Today is 2026-11-28."},
    {"role": "user", "content": "My email is alice@example.com, where is my order?"},
]
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}},
    }
]


@pytest.fixture
def clients(
    sdk: Callable[..., Any], upstream: FakeOpenAI
) -> Callable[[RunningProxy], tuple[openai.OpenAI, openai.OpenAI]]:
    """(direct, proxied) sync clients that differ only in base_url."""

    def make(proxy: RunningProxy) -> tuple[openai.OpenAI, openai.OpenAI]:
        return sdk(upstream.url + "/v1"), sdk(proxy.base_url)

    return make


def test_non_streaming_answer_is_byte_identical_and_stored(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI, clients: Any
) -> None:
    """Only base_url changes: same bytes back, one stored row with tags and usage."""
    proxy = start_proxy({"tags": {"env": "prod"}})
    direct, proxied = clients(proxy)

    want = direct.chat.completions.with_raw_response.create(model="fake-model", messages=MESSAGES)
    got = proxied.chat.completions.with_raw_response.create(model="fake-model", messages=MESSAGES)

    assert got.http_response.content == want.http_response.content
    assert got.headers["x-request-id"] == want.headers["x-request-id"]
    assert got.parse().choices[0].message.content == "".join(TEXT_PIECES)

    [row] = proxy.wait_stored(1)
    assert row["status"] == 200
    assert row["model_requested"] == "fake-model"
    assert row["model_served"] == "fake-model-2024-08-06"
    assert row["completion_id"] == got.parse().id
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (9, 12, 21)
    assert row["finish_reason"] == "stop"
    assert row["stream"] in (0, False)
    assert row["upstream_request_id"] == got.headers["x-request-id"]
    assert row["latency_ms"] > 0
    assert row["tenant"].startswith("key-") and "sk-app-key" not in json.dumps(row, default=str)
    stored_request = json.loads(row["request"])
    assert stored_request["store"] is True
    assert stored_request["messages"][1]["content"] == (
        "My email is [REDACTED:email], where is my order?"
    )
    stored_response = json.loads(row["response"])
    assert stored_response["choices"][0]["message"]["content"] == (
        "Hello from the teacher. Mail me at [REDACTED:email]"
    )
    tags = proxy.tags(row["id"])
    assert tags["env"] == "prod"
    assert tags["prompt_fp"] == row["prompt_fingerprint"]
    assert len(tags["prompt_fp"]) == 12
    # What the upstream saw: store and the tags, and the unredacted text.
    sent = upstream.requests[-1]["body"]
    assert sent["store"] is True
    assert sent["metadata"] == tags
    assert sent["messages"] == MESSAGES


def test_streaming_is_byte_identical_and_reassembled(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI, clients: Any
) -> None:
    """SSE bytes pass unchanged (the usage the proxy asked for is stripped) and one
    chat.completion with the usage is stored."""
    proxy = start_proxy()
    direct, proxied = clients(proxy)
    kwargs = {"model": "fake-model", "messages": MESSAGES, "stream": True}
    with direct.chat.completions.with_streaming_response.create(**kwargs) as response:
        want = b"".join(response.iter_bytes())
    with proxied.chat.completions.with_streaming_response.create(**kwargs) as response:
        got = b"".join(response.iter_bytes())
    assert got == want
    assert b'"usage"' not in got and got.endswith(b"data: [DONE]\n\n")
    # The upstream was asked for usage on the client's behalf ...
    assert upstream.requests[-1]["body"]["stream_options"] == {"include_usage": True}

    [row] = proxy.wait_stored(1)
    assert row["error"] is None  # a stream that ended well is not stored as a failure
    completion = json.loads(row["response"])
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"].startswith("Hello from the teacher")
    assert completion["choices"][0]["finish_reason"] == "stop"
    # ... so the stored call knows its token usage anyway.
    assert completion["usage"] == {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}
    assert row["total_tokens"] == 21
    assert row["stream"] in (1, True)
    assert row["ttft_ms"] is not None and row["ttft_ms"] <= row["latency_ms"]
    # ... and the stored request is what the client sent, not the injected option.
    assert "stream_options" not in json.loads(row["request"])


def test_streaming_with_client_usage_passes_usage_chunk(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI, clients: Any
) -> None:
    """A client that asked for usage gets the usage chunk, exactly as direct."""
    proxy = start_proxy()
    direct, proxied = clients(proxy)
    kwargs = {
        "model": "fake-model",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = list(proxied.chat.completions.create(**kwargs))
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 21
    assert [c.model_dump() for c in chunks] == [
        c.model_dump() for c in direct.chat.completions.create(**kwargs)
    ]


def test_streamed_tool_calls_and_n_choices_are_merged(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI, clients: Any
) -> None:
    proxy = start_proxy()
    _, proxied = clients(proxy)
    list(
        proxied.chat.completions.create(
            model="fake-tools", messages=MESSAGES, tools=TOOLS, stream=True
        )
    )
    list(proxied.chat.completions.create(model="fake-model", messages=MESSAGES, n=3, stream=True))
    rows = proxy.wait_stored(2)
    tools = json.loads(rows[0]["response"])
    calls = tools["choices"][0]["message"]["tool_calls"]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("call_1", "get_weather", '{"city": "Paris"}'),
        ("call_2", "get_time", '{"tz": "CET"}'),
    ]
    assert rows[0]["finish_reason"] == "tool_calls"
    three = json.loads(rows[1]["response"])
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert {c["message"]["content"] for c in three["choices"]} == {
        "Hello from the teacher. Mail me at [REDACTED:email]"
    }


def test_async_client_concurrent_calls_all_stored(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI
) -> None:
    proxy = start_proxy()

    async def run() -> list[str]:
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-async")
        async with client:

            async def one(i: int) -> str:
                messages: list[ChatCompletionMessageParam] = [
                    {"role": "user", "content": f"question {i}"}
                ]
                if i % 2:
                    stream = await client.chat.completions.create(
                        model="fake-model", messages=messages, stream=True
                    )
                    return "".join([c.choices[0].delta.content or "" async for c in stream])
                result = await client.chat.completions.create(model="fake-model", messages=messages)
                return result.choices[0].message.content or ""

            return await asyncio.gather(*(one(i) for i in range(40)))

    answers = asyncio.run(run())
    assert set(answers) == {"".join(TEXT_PIECES)}
    rows = proxy.wait_stored(40)
    assert len(rows) == 40
    assert len({row["completion_id"] for row in rows}) == 40


def test_tags_from_headers_path_prefix_and_rules(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI, sdk: Callable[..., Any]
) -> None:
    """Header tags are stored and stripped; /a/<app>/ names the app; rules match text."""
    proxy = start_proxy(
        {
            "tags": {"env": "prod", "team": "static"},
            "rules": [
                {"model": "^fake-", "text": "(?i)where is my order", "set": {"task": "orders"}},
                {"text": "never matches", "set": {"task": "other"}},
            ],
        }
    )
    client = sdk(
        proxy.url + "/a/support-bot/v1",
        default_headers={"X-Distillery-Tag-Team": "payments", "X-Distillery-Tag-Ticket": "T-1"},
    )
    client.chat.completions.create(
        model="fake-model", messages=MESSAGES, metadata={"customer": "acme"}
    )
    [row] = proxy.wait_stored(1)
    tags = proxy.tags(row["id"])
    assert tags == {
        "customer": "acme",
        "env": "prod",
        "team": "payments",
        "ticket": "T-1",
        "app": "support-bot",
        "prompt_fp": row["prompt_fingerprint"],
        "task": "orders",
    }
    seen = upstream.requests[-1]
    assert not any(name.lower().startswith("x-distillery") for name in seen["headers"])
    assert seen["body"]["metadata"] == tags
    assert seen["path"] == "/v1/chat/completions"


def test_app_from_key_fingerprint_map(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI, clients: Any
) -> None:
    from distillery.core.config import key_fingerprint

    proxy = start_proxy({"apps": {key_fingerprint("sk-app-key"): "checkout"}})
    _, proxied = clients(proxy)
    proxied.chat.completions.create(model="fake-model", messages=MESSAGES)
    [row] = proxy.wait_stored(1)
    assert proxy.tags(row["id"])["app"] == "checkout"


def test_metadata_never_exceeds_openai_limits(
    start_proxy: Callable[..., RunningProxy],
    upstream: FakeOpenAI,
    caplog: pytest.LogCaptureFixture,
    clients: Any,
) -> None:
    """16 pairs at most: client metadata wins, extra proxy tags are dropped and logged."""
    from structlog.testing import capture_logs

    proxy = start_proxy({"tags": {"env": "prod", "long": "x" * 600, "k" * 70: "v"}})
    _, proxied = clients(proxy)
    client_metadata = {f"c{i}": str(i) for i in range(15)}
    with capture_logs() as logs:
        proxied.chat.completions.create(
            model="fake-model", messages=MESSAGES, metadata=client_metadata
        )
    sent = upstream.requests[-1]["body"]["metadata"]
    assert len(sent) == 16
    assert sent == {**client_metadata, "env": "prod"}
    [warning] = [entry for entry in logs if entry["event"] == "metadata tags dropped"]
    reasons = {item["key"]: item["reason"] for item in warning["dropped"]}
    assert reasons["long"] == "value longer than 512 characters"
    assert reasons["k" * 70] == "key longer than 64 characters"
    assert reasons["prompt_fp"] == "metadata already holds 16 pairs"


def test_store_and_metadata_switch_off_for_strict_upstreams(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI, clients: Any
) -> None:
    proxy = start_proxy(
        {"upstream": {"store": False, "metadata": False, "stream_usage": False}, "tags": {"a": "b"}}
    )
    _, proxied = clients(proxy)
    proxied.chat.completions.create(model="fake-model", messages=MESSAGES)
    list(proxied.chat.completions.create(model="fake-model", messages=MESSAGES, stream=True))
    assert all(set(r["body"]) <= {"model", "messages", "stream"} for r in upstream.requests)
    rows = proxy.wait_stored(2)
    assert proxy.tags(rows[0]["id"])["a"] == "b"  # still tagged locally


def test_upstream_errors_pass_through_unchanged_and_are_stored(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI, clients: Any
) -> None:
    proxy = start_proxy()
    direct, proxied = clients(proxy)
    for model, status in (("fake-error-400", 400), ("fake-error-500", 500)):
        with pytest.raises(openai.APIStatusError) as want:
            direct.chat.completions.create(model=model, messages=MESSAGES)
        with pytest.raises(openai.APIStatusError) as got:
            proxied.chat.completions.create(model=model, messages=MESSAGES)
        assert got.value.status_code == want.value.status_code == status
        assert got.value.response.content == want.value.response.content
    rows = proxy.wait_stored(2)
    assert [row["status"] for row in rows] == [400, 500]
    assert json.loads(rows[0]["error"])["error"]["code"] == "invalid_value"
    assert rows[0]["response"] in (None, "null")


def test_bad_input_gets_openai_errors_and_stores_nothing(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI
) -> None:
    proxy = start_proxy({"proxy": {"max_body_mb": 0.01}})
    url = proxy.base_url + "/chat/completions"
    cases = [
        (b"{not json", 400),
        (b"[1, 2]", 400),
        (
            orjson.dumps(
                {"model": "fake-model", "messages": [{"role": "user", "content": "x" * 20_000}]}
            ),
            413,
        ),
    ]
    for body, status in cases:
        response = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == status
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
    assert upstream.requests == []
    response = httpx.get(proxy.url + "/nope")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    # The proxy is still healthy and nothing was stored.
    assert httpx.get(proxy.url + "/healthz").json()["status"] == "ok"
    assert proxy._count() == 0


def test_unreachable_upstream_is_502_and_timeout_is_504(
    start_proxy: Callable[..., RunningProxy],
    upstream: FakeOpenAI,
    unused_tcp_port: int,
    sdk: Callable[..., Any],
) -> None:
    dead = start_proxy({"upstream": {"url": f"http://127.0.0.1:{unused_tcp_port}/v1"}})
    client = sdk(dead.base_url, api_key="sk-x")
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="fake-model", messages=MESSAGES)
    assert err.value.status_code == 502
    assert isinstance(err.value.body, dict)
    assert err.value.body["code"] == "upstream_unreachable"

    upstream.slow_seconds = 2.0
    slow = start_proxy({"upstream": {"timeout": 0.3}})
    client = sdk(slow.base_url, api_key="sk-x")
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(model="fake-slow", messages=MESSAGES)
    assert err.value.status_code == 504
    assert isinstance(err.value.body, dict) and err.value.body["type"] == "upstream_error"
    # Both calls were valid requests, so both are stored (the two proxies share a file).
    rows = slow.wait_stored(2)
    assert [row["status"] for row in rows] == [502, 504]


def test_stream_cut_off_midway_reaches_client_as_error_and_is_stored(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI, clients: Any
) -> None:
    proxy = start_proxy()
    _, proxied = clients(proxy)
    received = []
    with pytest.raises((openai.APIConnectionError, httpx.HTTPError)):
        for chunk in proxied.chat.completions.create(
            model="fake-cut", messages=MESSAGES, stream=True
        ):
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "Hello from the"
    [row] = proxy.wait_stored(1)
    assert json.loads(row["error"])["type"] == "upstream_error"
    assert json.loads(row["response"])["choices"][0]["message"]["content"] == "Hello from the"


def test_midstream_error_event_is_relayed_and_stored(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI, clients: Any
) -> None:
    proxy = start_proxy()
    _, proxied = clients(proxy)
    with pytest.raises(openai.APIError, match="overloaded"):
        list(
            proxied.chat.completions.create(
                model="fake-midstream-error", messages=MESSAGES, stream=True
            )
        )
    [row] = proxy.wait_stored(1)
    assert json.loads(row["error"])["error"]["message"] == "The model overloaded."


def test_passthrough_routes_are_untouched(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI, clients: Any
) -> None:
    """Models (gzip stays gzip), embeddings and multipart uploads pass unchanged."""
    proxy = start_proxy()
    raw = httpx.get(
        proxy.base_url + "/models?limit=5",
        headers={"Accept-Encoding": "gzip", "Authorization": "Bearer sk-app-key"},
    )
    assert raw.headers["content-encoding"] == "gzip"
    assert raw.json()["data"][0]["id"] == "fake-model"
    assert upstream.requests[-1]["path"] == "/v1/models?limit=5"
    assert upstream.requests[-1]["headers"]["Authorization"] == "Bearer sk-app-key"

    _, proxied = clients(proxy)
    embedding = proxied.embeddings.create(model="fake-embed", input="hello")
    assert embedding.data[0].embedding == [0.1, 0.2, 0.3]
    uploaded = proxied.files.create(file=("train.jsonl", b"x" * 300_000), purpose="fine-tune")
    assert uploaded.bytes > 300_000
    # Only chat completions are captured.
    assert proxy._count() == 0


def test_gzip_request_body_is_accepted(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI
) -> None:
    proxy = start_proxy()
    body = gzip.compress(orjson.dumps({"model": "fake-model", "messages": MESSAGES}))
    response = httpx.post(
        proxy.base_url + "/chat/completions",
        content=body,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
    )
    assert response.status_code == 200
    assert proxy.wait_stored(1)[0]["status"] == 200


def test_upstream_key_requires_proxy_keys(
    start_proxy: Callable[..., RunningProxy],
    upstream: FakeOpenAI,
    monkeypatch: pytest.MonkeyPatch,
    sdk: Callable[..., Any],
) -> None:
    """With the key held by the proxy, callers need a proxy key; the upstream sees only
    the real key, and each proxy key is its own tenant."""
    from distillery.core.config import key_fingerprint

    monkeypatch.setenv("TEAM_OPENAI_KEY", "sk-real-upstream")
    proxy = start_proxy(
        {
            "upstream": {"api_key_env": "TEAM_OPENAI_KEY"},
            "auth": {"keys": ["dk-alice", key_fingerprint("dk-bob")]},
        }
    )
    for key in ("dk-alice", "dk-bob"):
        client = sdk(proxy.base_url, api_key=key)
        client.chat.completions.create(model="fake-model", messages=MESSAGES)
        assert upstream.requests[-1]["headers"]["Authorization"] == "Bearer sk-real-upstream"
    intruder = sdk(proxy.base_url, api_key="sk-guess")
    with pytest.raises(openai.AuthenticationError):
        intruder.chat.completions.create(model="fake-model", messages=MESSAGES)
    with pytest.raises(openai.AuthenticationError):
        intruder.models.list()
    rows = proxy.wait_stored(2)
    assert {row["tenant"] for row in rows} == {
        key_fingerprint("dk-alice"),
        key_fingerprint("dk-bob"),
    }


def test_sampling_forwards_everything_but_stores_a_share(
    start_proxy: Callable[..., RunningProxy],
    upstream: FakeOpenAI,
    clients: Any,
    sdk: Callable[..., Any],
) -> None:
    proxy = start_proxy(
        {"capture": {"sample_rate": 0.0, "sample": [{"tag": "app=keep", "rate": 1.0}]}}
    )
    _, proxied = clients(proxy)
    for _ in range(5):
        proxied.chat.completions.create(model="fake-model", messages=MESSAGES)
    keep = sdk(proxy.url + "/a/keep/v1", api_key="sk-app-key")
    keep.chat.completions.create(model="fake-model", messages=MESSAGES)
    assert all(r["body"]["store"] is True for r in upstream.requests)
    assert all("prompt_fp" in r["body"]["metadata"] for r in upstream.requests)
    [row] = proxy.wait_stored(1)
    assert proxy.tags(row["id"])["app"] == "keep"


def test_explicit_store_false_is_respected(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI, clients: Any
) -> None:
    proxy = start_proxy()
    _, proxied = clients(proxy)
    proxied.chat.completions.create(model="fake-model", messages=MESSAGES, store=False)
    assert upstream.requests[-1]["body"]["store"] is False
    assert proxy.wait_stored(1)


def test_healthz_and_metrics(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI, clients: Any
) -> None:
    proxy = start_proxy()
    _, proxied = clients(proxy)
    proxied.chat.completions.create(model="fake-model", messages=MESSAGES)
    proxy.wait_stored(1)
    # The writer says what it stored right after the insert: wait for its word.
    wait_for(
        lambda: httpx.get(proxy.url + "/healthz").json()["capture"]["stored"] == 1,
        what="the writer's count",
    )
    health = httpx.get(proxy.url + "/healthz").json()
    assert health["status"] == "ok"
    assert health["capture"]["database"] == "ok" and health["capture"]["writer"] == "running"
    # Counted after the response is delivered, so give it a moment.
    wait_for(
        lambda: (
            'distillery_requests_total{route="chat",status="200"} 1.0'
            in httpx.get(proxy.url + "/metrics").text
        ),
        what="the request to be counted",
    )
    text = httpx.get(proxy.url + "/metrics").text
    assert 'distillery_captured_total{outcome="spooled"} 1.0' in text
    assert "distillery_spool_bytes " in text
    assert "distillery_request_duration_seconds_bucket" in text
    # Counters end in _total; latency and tokens by model and app; this process's own metrics.
    wait_for(
        lambda: "distillery_capture_stored_total 1.0" in httpx.get(proxy.url + "/metrics").text,
        what="the stored counter",
    )
    assert (
        'distillery_chat_duration_seconds_count{app="none",model="fake-model-2024-08-06"} 1.0'
        in text
    )
    assert (
        'distillery_tokens_total{app="none",kind="prompt",model="fake-model-2024-08-06"} 9.0'
        in text
    )
    assert "process_cpu_seconds_total" in text


def test_client_leaving_mid_stream_is_logged_and_stored(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI
) -> None:
    """A client that hangs up mid-stream costs nothing but a stored partial call."""
    import socket

    upstream.slow_seconds = 1.0
    proxy = start_proxy()
    body = orjson.dumps({"model": "fake-slow", "messages": MESSAGES, "stream": True})
    port = int(proxy.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    [row] = proxy.wait_stored(1)
    assert json.loads(row["error"]) == {
        "message": "client disconnected before the stream ended",
        "type": "client_error",
    }
    assert httpx.get(proxy.url + "/healthz").json()["status"] == "ok"


def test_the_clients_user_agent_goes_upstream_and_the_proxy_adds_none(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI
) -> None:
    """A client's User-Agent reaches the upstream as sent, on chat and pass-through; a
    client that sends none is not given aiohttp's."""
    import socket

    proxy = start_proxy()
    body = orjson.dumps({"model": "fake-model", "messages": MESSAGES})
    port = int(proxy.url.rsplit(":", 1)[1])
    for path, method, payload in (
        ("/v1/chat/completions", "POST", body),
        ("/v1/models", "GET", b""),
    ):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(
                b"%s %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                % (method.encode(), path.encode(), len(payload), payload)
            )
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        seen = {name.lower() for name in upstream.requests[-1]["headers"]}
        assert "user-agent" not in seen, path
        httpx.request(
            method, proxy.url + path, content=payload, headers={"User-Agent": "my-app/1.0"}
        )
        sent = {k.lower(): v for k, v in upstream.requests[-1]["headers"].items()}
        assert sent["user-agent"] == "my-app/1.0", path


def test_hop_by_hop_headers_are_not_forwarded(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI
) -> None:
    proxy = start_proxy()
    httpx.get(
        proxy.base_url + "/models",
        headers={"Connection": "keep-alive, X-Secret-Hop", "X-Secret-Hop": "1", "X-Kept": "2"},
    )
    seen = {name.lower() for name in upstream.requests[-1]["headers"]}
    assert "x-kept" in seen and "x-secret-hop" not in seen


def test_one_canonical_log_line_per_request(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI, clients: Any
) -> None:
    from structlog.testing import capture_logs

    proxy = start_proxy({"tags": {"env": "prod"}})
    _, proxied = clients(proxy)
    with capture_logs() as logs:
        proxied.chat.completions.create(model="fake-model", messages=MESSAGES)
        proxied.models.list()
        # The line is written after the response is delivered: wait for it.
        wait_for(lambda: len([e for e in logs if e["event"] == "request"]) >= 2, what="log lines")
    [row] = proxy.wait_stored(1)
    lines = [entry for entry in logs if entry["event"] == "request"]
    assert len(lines) == 2
    chat, models = lines
    assert chat["request_id"] == row["id"]
    assert chat["tenant"] == row["tenant"]
    assert (chat["model"], chat["status"], chat["tags"], chat["capture"]) == (
        "fake-model",
        200,
        2,
        "spooled",
    )
    assert chat["latency_ms"] > 0 and chat["log_level"] == "info"
    assert models["path"] == "/v1/models" and models["status"] == 200
    assert models["request_id"] != chat["request_id"]


@pytest.mark.parametrize(
    "body",
    [
        {"model": 5, "messages": "not a list", "metadata": "bad", "stream_options": 3},
        {"messages": [None, 1, {"role": "system", "content": [None, {"type": "text"}]}]},
        {"model": "fake-model", "messages": [], "stream": "yes", "tools": [1, {"function": None}]},
        {},
    ],
)
def test_odd_json_objects_are_forwarded_not_crashed_on(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI, body: Any
) -> None:
    """Validation is the upstream's job: whatever it answers reaches the client."""
    proxy = start_proxy({"rules": [{"text": "x", "set": {"a": "b"}}]})
    response = httpx.post(proxy.base_url + "/chat/completions", json=body)
    assert response.status_code in (200, 400, 500)
    if response.status_code != 200:
        assert "Traceback" not in response.text
    assert upstream.requests, "the request reached the upstream"
    assert httpx.get(proxy.url + "/healthz").status_code == 200


def test_upstream_stalling_mid_stream_times_out_and_is_stored(
    start_proxy: Callable[..., RunningProxy], upstream: FakeOpenAI, sdk: Callable[..., Any]
) -> None:
    upstream.slow_seconds = 5.0  # one second between chunks
    proxy = start_proxy({"upstream": {"timeout": 0.3}})
    client = sdk(proxy.base_url)
    with pytest.raises((openai.APIConnectionError, httpx.HTTPError)):
        list(client.chat.completions.create(model="fake-slow", messages=MESSAGES, stream=True))
    [row] = proxy.wait_stored(1)
    assert json.loads(row["error"]) == {
        "message": "upstream stream timed out",
        "type": "upstream_error",
    }
