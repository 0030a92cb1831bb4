"""Conformance: OpenAI's recorded traffic through the proxy, checked against openai-python.

Every exchange in ``corpus/openai_chat.json`` (recorded by other projects against
api.openai.com) is replayed byte for byte by an upstream and called through the proxy
with the real SDK.  Each must reach the client unchanged, be stored with no error, be
listed by the stored-completions API, and be stored as openai-python's own stream
accumulator (``ChatCompletionStreamState``) assembles the same chunks: an oracle this
project did not write.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from typing import Any

import openai
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types import CompletionUsage
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from distillery.proxy.stream import StreamRelay

from corpus import Exchange, Replay, call, exchanges
from helpers import RunningProxy

CORPUS = exchanges()
STREAMS = [e for e in CORPUS if e.stream]


def test_the_corpus_is_what_the_issue_asks_for() -> None:
    """At least 30 exchanges, 15 of them streams, from at least two projects."""
    projects = {e.name.split(":")[0] for e in CORPUS}
    assert len(CORPUS) >= 30 and len(STREAMS) >= 15 and len(projects) >= 2
    assert any(e.status >= 400 for e in CORPUS)
    # What made the old assembler fail is in it: usage chunks with "choices": [].
    assert all(any(c["choices"] == [] for c in e.chunks()) for e in STREAMS)


def canonical(completion: dict[str, Any]) -> dict[str, Any]:
    """A chat.completion as openai-python reads it, with what only its accumulator adds
    (``parsed``, ``parsed_arguments``, a tool call's stream ``index``) left out: a
    non-streamed completion carries none of them."""
    dumped = ChatCompletion.model_validate(completion).model_dump(mode="json", exclude_none=True)
    for choice in dumped["choices"]:
        message = choice["message"]
        message.pop("parsed", None)
        for tool_call in message.get("tool_calls") or ():
            tool_call.pop("index", None)
            tool_call["function"].pop("parsed_arguments", None)
    return dumped


def oracle(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """The completion openai-python's stream accumulator makes of these chunks."""
    state = ChatCompletionStreamState()
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    completion = canonical(state.get_final_completion().model_dump(mode="json"))
    # One deliberate difference: openai-python takes ``usage`` from the last chunk even
    # when that is null, and OpenAI can send one more chunk after the usage chunk (the
    # moderation results of a gpt-5 stream in the corpus).  The proxy keeps the usage
    # that was sent: the tokens were billed.
    usage = [c["usage"] for c in chunks if c.get("usage")]
    if usage:
        completion["usage"] = canonical_usage(usage[-1])
    return completion


def canonical_usage(usage: dict[str, Any]) -> dict[str, Any]:
    dumped: dict[str, Any] = CompletionUsage.model_validate(usage).model_dump(
        mode="json", exclude_none=True
    )
    return dumped


def without_usage(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chunks OpenAI sends without ``include_usage``: no usage-only chunk, no ``usage``
    member (a moderation chunk with empty choices is still sent)."""
    return [
        {k: v for k, v in c.items() if k != "usage"}
        for c in chunks
        if c["choices"] or c.get("usage") is None
    ]


@pytest.mark.parametrize("exchange", STREAMS, ids=lambda e: e.name.rsplit("/", 1)[-1])
def test_our_assembler_agrees_with_openai_python(exchange: Exchange) -> None:
    relay = StreamRelay(strip_usage=False)
    relay.feed(exchange.body)
    relay.finish()
    assert relay.assembler.malformed is None and relay.assembler.error is None
    result = relay.assembler.result() or {}
    assert canonical(result) == oracle(exchange.chunks())


@pytest.fixture
def proxy(start_proxy: Callable[..., RunningProxy], replay: Replay) -> RunningProxy:
    # What OpenAI sent is compared with what was stored: nothing redacted in between.
    return start_proxy({"upstream": {"url": replay.url + "/v1"}, "redact": {"defaults": False}})


def test_every_recorded_exchange_is_relayed_stored_and_listed(
    proxy: RunningProxy, replay: Replay, sdk: Callable[..., Any]
) -> None:
    client = sdk(proxy.base_url)
    for number, exchange in enumerate(CORPUS, 1):
        replay.answer = exchange
        status, got = call(client, exchange.request)
        assert (status, got) == (exchange.status, exchange.body), exchange.name
        sent = replay.requests[-1]
        assert sent["store"] is True, exchange.name
        if "tools" in exchange.request:  # a task to name
            assert "prompt_fp" in sent["metadata"], exchange.name
        row = proxy.wait_stored(number)[-1]
        assert row["status"] == exchange.status, exchange.name
        assert row["stream"] == exchange.stream, exchange.name
        if exchange.status >= 400:
            assert json.loads(row["error"]) == json.loads(exchange.body), exchange.name
            assert row["response"] is None
            continue
        assert row["error"] is None, (exchange.name, row["error"])
        stored = json.loads(row["response"])
        expected = (
            oracle(exchange.chunks()) if exchange.stream else canonical(json.loads(exchange.body))
        )
        assert canonical(stored) == expected, exchange.name
        assert row["completion_id"] == expected["id"]
        assert row["total_tokens"] == expected["usage"]["total_tokens"], exchange.name
    listed = {c.id for c in client.chat.completions.list(limit=100).data}
    succeeded = {json.loads(e.body)["id"] for e in CORPUS if e.status < 400 and not e.stream}
    succeeded |= {e.chunks()[0]["id"] for e in STREAMS}
    assert listed == succeeded


def test_streams_whose_usage_the_proxy_asked_for(
    proxy: RunningProxy, replay: Replay, sdk: Callable[..., Any]
) -> None:
    """The default path: the client did not ask for usage, the proxy did.  The client gets
    the stream without what that option added; the store gets the usage too."""
    client = sdk(proxy.base_url)
    for number, exchange in enumerate(STREAMS, 1):
        replay.answer = exchange
        request = {k: v for k, v in exchange.request.items() if k != "stream_options"}
        status, got = call(client, request)
        assert status == 200
        assert replay.requests[-1]["stream_options"] == {"include_usage": True}
        events = [e.removeprefix(b"data: ") for e in got.split(b"\n\n") if e]
        assert events[-1] == b"[DONE]"
        received = [orjson.loads(e) for e in events[:-1]]
        assert received == without_usage(exchange.chunks()), exchange.name
        row = proxy.wait_stored(number)[-1]
        assert row["error"] is None, (exchange.name, row["error"])
        assert canonical(json.loads(row["response"])) == oracle(exchange.chunks())


# -- The property: a call is stored with an error if and only if the upstream sent one. --

ERROR = {"message": "The server had an error processing your request.", "type": "server_error"}


def broken(exchange: Exchange, how: str, where: int) -> Exchange:
    """The exchange as it would have come with an error: an error status, or (streams) an
    error event in place of the rest of the stream, as OpenAI sends one."""
    if how == "status":
        body = orjson.dumps({"error": {**ERROR, "param": None, "code": None}})
        return Exchange(exchange.name, exchange.request, 500, "application/json", body)
    events = exchange.body.split(b"\n\n")
    cut = 1 + where % (len(events) - 2)
    event = b"data: " + orjson.dumps({"error": ERROR})
    body = b"\n\n".join([*events[:cut], event, b""])
    return Exchange(exchange.name, exchange.request, 200, exchange.content_type, body)


@pytest.fixture
def shared_proxy(
    start_proxy: Callable[..., RunningProxy], replay: Replay, sdk: Callable[..., Any]
) -> Iterator[tuple[RunningProxy, Replay, openai.OpenAI]]:
    proxy = start_proxy({"upstream": {"url": replay.url + "/v1"}})
    yield proxy, replay, sdk(proxy.base_url)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    derandomize=True,
)
@given(
    index=st.integers(0, len(CORPUS) - 1),
    how=st.sampled_from(["none", "status", "event"]),
    where=st.integers(0, 1000),
    piece=st.sampled_from([1, 7, 97, 4096]),
)
def test_an_error_is_stored_iff_the_upstream_sent_one(
    shared_proxy: tuple[RunningProxy, Replay, openai.OpenAI],
    index: int,
    how: str,
    where: int,
    piece: int,
) -> None:
    proxy, replay, client = shared_proxy
    exchange = CORPUS[index]
    if how == "event" and not exchange.stream:
        how = "status"
    sent_error = how != "none" or exchange.status >= 400
    replay.answer = exchange if how == "none" else broken(exchange, how, where)
    replay.piece = piece
    before = len(proxy.rows())
    call(client, exchange.request)
    row = proxy.wait_stored(before + 1)[-1]
    assert (row["error"] is not None) == sent_error, (exchange.name, how, row["error"])


def test_the_oracle_is_not_fooled_by_a_broken_assembler() -> None:
    """The comparison would catch an assembler that drops or reorders text."""
    exchange = random.Random(3).choice([e for e in STREAMS if b'"content":"' in e.body])
    chunks = exchange.chunks()
    texts = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(texts) > 1
    dropped = [c for c in chunks if c is not texts[0]]
    assert oracle(dropped) != oracle(chunks)
