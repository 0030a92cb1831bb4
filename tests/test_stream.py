"""SSE relay and reassembly, byte by byte."""

from __future__ import annotations

from typing import Any, cast

import orjson
import pytest

from distillery.proxy.stream import StreamAssembler, StreamRelay


def event(payload: dict[str, Any] | str, sep: bytes = b"\n\n") -> bytes:
    data = payload.encode() if isinstance(payload, str) else orjson.dumps(payload)
    return b"data: " + data + sep


def chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    body.update(extra)
    return body


STREAM = [chunk("Hel"), chunk("lo"), chunk(finish="stop")]


@pytest.mark.parametrize("size", [1, 3, 7, 64, 10_000])
def test_relay_forwards_same_bytes_whatever_the_chunking(size: Any) -> None:
    """Events split at any byte boundary come out whole and unchanged, [DONE] last."""
    raw = b"".join(event(c) for c in STREAM) + event("[DONE]")
    relay = StreamRelay(strip_usage=False)
    out = b"".join(relay.feed(raw[i : i + size]) for i in range(0, len(raw), size))
    assert b"[DONE]" not in out  # held back until the call is captured
    assert out + relay.finish() == raw
    assert relay.done
    assert (relay.assembler.result() or {})["choices"][0]["message"]["content"] == "Hello"


def test_relay_handles_crlf_comments_and_multiline_data() -> None:
    raw = (
        b": keep-alive\r\n\r\n"
        + b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",\r\n'
        + b'data: "choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}\r\n\r\n'
        + b"data: [DONE]\r\n\r\n"
    )
    relay = StreamRelay(strip_usage=False)
    assert relay.feed(raw) + relay.finish() == raw
    assert (relay.assembler.result() or {})["choices"][0]["message"]["content"] == "x"


def test_strip_usage_removes_exactly_what_include_usage_added() -> None:
    with_usage = [
        chunk("Hel", usage=None),
        chunk("lo", usage=None),
        chunk(finish="stop", usage=None),
        {
            **chunk(),
            "choices": [],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        },
    ]
    without = b"".join(event(c) for c in STREAM) + event("[DONE]")
    relay = StreamRelay(strip_usage=True)
    out = relay.feed(b"".join(event(c) for c in with_usage) + event("[DONE]")) + relay.finish()
    assert out == without
    assert (relay.assembler.result() or {})["usage"]["total_tokens"] == 3


def test_strip_usage_falls_back_to_reserialising_odd_formatting() -> None:
    spaced = b'data: {"id": "c", "choices": [{"index": 0, "delta": {"content": "a"}}], "usage": null}\n\n'
    relay = StreamRelay(strip_usage=True)
    out = relay.feed(spaced)
    assert b"usage" not in out
    assert orjson.loads(out[6:]) == {
        "id": "c",
        "choices": [{"index": 0, "delta": {"content": "a"}}],
    }


def test_assembler_merges_choices_tool_calls_refusals_and_logprobs() -> None:
    assembler = StreamAssembler()
    token = {"token": "a", "logprob": -0.1, "bytes": [97], "top_logprobs": []}
    parts = [
        {
            "id": "c",
            "created": 1,
            "model": "m",
            "system_fingerprint": "fp",
            "choices": [
                {"index": 1, "delta": {"role": "assistant", "refusal": "I can"}},
                {
                    "index": 0,
                    "delta": {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "index": 0,
                                "id": "call_a",
                                "type": "function",
                                "function": {"name": "f", "arguments": ""},
                            }
                        ],
                    },
                    "logprobs": {"content": [token], "refusal": None},
                },
            ],
        },
        {
            "choices": [
                {"index": 1, "delta": {"refusal": "not help"}, "finish_reason": "stop"},
                {
                    "index": 0,
                    "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"x":'}}]},
                    "logprobs": {"content": [token], "refusal": None},
                },
            ]
        },
        {
            "choices": [
                {
                    "index": 0,
                    "delta": {
                        "tool_calls": [
                            {"index": 0, "function": {"arguments": " 1}"}},
                            {
                                "index": 1,
                                "id": "call_b",
                                "type": "function",
                                "function": {"name": "g", "arguments": "{}"},
                            },
                        ]
                    },
                    "finish_reason": "tool_calls",
                }
            ]
        },
        {"choices": [], "usage": {"total_tokens": 5}},
    ]
    for part in parts:
        assembler.add(cast(dict[str, Any], part))
    result = assembler.result()
    assert result is not None
    assert result["id"] == "c" and result["object"] == "chat.completion"
    assert result["system_fingerprint"] == "fp"
    first, second = result["choices"]
    assert first["message"]["tool_calls"] == [
        {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
        {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]
    assert first["finish_reason"] == "tool_calls"
    assert first["logprobs"]["content"] == [token, token]
    assert second["message"]["refusal"] == "I cannot help"
    assert second["message"]["content"] is None
    assert result["usage"] == {"total_tokens": 5}


def test_assembler_with_no_chunks_has_no_result() -> None:
    assert StreamAssembler().result() is None


def test_fields_the_assembler_does_not_know_are_kept_as_openai_python_keeps_them() -> None:
    """Audio, reasoning text, refusals, logprobs and two choices, merged as the SDK's own
    accumulator merges them (openai.lib.streaming.chat.ChatCompletionStreamState)."""
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    token = {"token": "a", "logprob": -0.1, "bytes": [97], "top_logprobs": []}
    chunks = [
        chunk(None, service_tier="default", usage=None),
        chunk(None, usage=None),
        chunk(None, usage=None),
        chunk(None, usage=None),
        chunk(finish="stop", usage=None),
        {
            **chunk(),
            "choices": [],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
        },
    ]
    deltas: list[list[dict[str, Any]]] = [
        [
            {"role": "assistant", "audio": {"id": "audio_1", "transcript": "Hel", "data": "AAA"}},
            {"role": "assistant", "refusal": "I can"},
        ],
        [
            {"audio": {"transcript": "lo", "data": "BBB"}, "reasoning_content": "think"},
            {"refusal": "not."},
        ],
        [{"reasoning_content": "ing", "content": "a"}, {}],
        [{"content": "b"}, {}],
    ]
    for i, pair in enumerate(deltas):
        chunks[i]["choices"] = [
            {
                "index": n,
                "delta": d,
                "logprobs": {"content": [token]} if d.get("content") else None,
                "finish_reason": None,
            }
            for n, d in enumerate(pair)
        ]
    chunks[4]["choices"].append({"index": 1, "delta": {}, "finish_reason": "stop"})
    raw = b"".join(event(c) for c in chunks) + event("[DONE]")
    relay = StreamRelay(strip_usage=False)
    relay.feed(raw)
    relay.finish()
    ours = relay.assembler.result() or {}

    state = ChatCompletionStreamState()
    for c in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(c))
    theirs = state.get_final_completion().model_dump(mode="json", exclude_none=True)
    for n in (0, 1):
        mine = {k: v for k, v in ours["choices"][n]["message"].items() if v is not None}
        sdk = {k: v for k, v in theirs["choices"][n]["message"].items() if k != "parsed"}
        assert mine == sdk
        assert ours["choices"][n]["finish_reason"] == "stop"
    assert ours["choices"][0]["message"]["audio"] == {
        "id": "audio_1",
        "transcript": "Hello",
        "data": "AAABBB",
    }
    assert ours["choices"][0]["message"]["reasoning_content"] == "thinking"
    assert ours["choices"][1]["message"]["refusal"] == "I cannot."
    assert ours["choices"][0]["logprobs"]["content"] == theirs["choices"][0]["logprobs"]["content"]
    assert ours["usage"] == theirs["usage"] and ours["service_tier"] == "default"
