"""Server-sent events: relaying them untouched and rebuilding one chat.completion.

The relay forwards whole events as soon as their terminating blank line
arrives (a partial event is useless to a client, so holding it costs nothing),
and keeps the final ``data: [DONE]`` back until the call has been captured:
a client that has seen ``[DONE]`` has its answer, and by then the record must
already be in the spool (see ``capture.py``).

When the proxy asked the upstream for ``stream_options.include_usage`` on the
client's behalf, the relay removes what that option adds -- the usage-only
chunk and the ``"usage":null`` member of every other chunk -- so the client
receives exactly the bytes it would have received without the proxy.
"""

from __future__ import annotations

from typing import Any

import orjson

_USAGE_NULL = b',"usage":null'


class StreamAssembler:
    """Merges ``chat.completion.chunk`` objects into one ``chat.completion``."""

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self._tool_calls: dict[int, dict[int, dict[str, Any]]] = {}
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.chunks = 0

    def add(self, chunk: dict[str, Any]) -> None:
        self.chunks += 1
        if "error" in chunk and "choices" not in chunk:
            self.error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": chunk}
            return
        if not self.head:
            self.head = {
                key: chunk[key]
                for key in ("id", "created", "model", "system_fingerprint", "service_tier")
                if key in chunk
            }
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            self._add_choice(choice)

    def _add_choice(self, choice: dict[str, Any]) -> None:
        index = choice.get("index", 0)
        merged = self.choices.get(index)
        if merged is None:
            merged = self.choices[index] = {
                "index": index,
                "message": {"role": "assistant", "content": None, "refusal": None},
                "logprobs": None,
                "finish_reason": None,
            }
        message = merged["message"]
        delta = choice.get("delta") or {}
        if delta.get("role"):
            message["role"] = delta["role"]
        for key in ("content", "refusal"):
            if delta.get(key) is not None:
                message[key] = (message[key] or "") + delta[key]
        for call in delta.get("tool_calls") or ():
            self._add_tool_call(index, call)
        if delta.get("function_call"):
            function = message.setdefault("function_call", {"name": "", "arguments": ""})
            for key in ("name", "arguments"):
                function[key] += delta["function_call"].get(key) or ""
        if delta.get("annotations"):
            message.setdefault("annotations", []).extend(delta["annotations"])
        logprobs = choice.get("logprobs")
        if logprobs:
            merged_logprobs = merged["logprobs"] or {"content": None, "refusal": None}
            for key in ("content", "refusal"):
                if logprobs.get(key):
                    merged_logprobs[key] = (merged_logprobs[key] or []) + logprobs[key]
            merged["logprobs"] = merged_logprobs
        if choice.get("finish_reason") is not None:
            merged["finish_reason"] = choice["finish_reason"]

    def _add_tool_call(self, choice_index: int, call: dict[str, Any]) -> None:
        calls = self._tool_calls.setdefault(choice_index, {})
        slot = calls.get(call.get("index", 0))
        if slot is None:
            slot = calls[call.get("index", 0)] = {
                "id": None,
                "type": "function",
                "function": {"name": "", "arguments": ""},
            }
        if call.get("id"):
            slot["id"] = call["id"]
        if call.get("type"):
            slot["type"] = call["type"]
        function = call.get("function") or {}
        slot["function"]["name"] += function.get("name") or ""
        slot["function"]["arguments"] += function.get("arguments") or ""

    def result(self) -> dict[str, Any] | None:
        """The reassembled completion, or ``None`` if no chunk ever arrived."""
        if not self.head and not self.choices:
            return None
        choices = []
        for index in sorted(self.choices):
            choice = self.choices[index]
            calls = self._tool_calls.get(index)
            if calls:
                choice["message"]["tool_calls"] = [calls[i] for i in sorted(calls)]
            choices.append(choice)
        completion: dict[str, Any] = {"id": self.head.get("id"), "object": "chat.completion"}
        completion.update(self.head)
        completion["choices"] = choices
        completion["usage"] = self.usage
        return completion


def _find_event_end(buffer: bytes, start: int) -> tuple[int, int]:
    """Index of the blank line ending the next event and its length, or (-1, 0)."""
    lf = buffer.find(b"\n\n", start)
    crlf = buffer.find(b"\r\n\r\n", start)
    if crlf != -1 and (lf == -1 or crlf < lf):
        return crlf, 4
    return (lf, 2) if lf != -1 else (-1, 0)


def _event_data(event: bytes) -> bytes | None:
    """The ``data`` field of one SSE event (joined across lines), or ``None``."""
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]
    parts = [
        line[5:].removeprefix(b" ") for line in event.splitlines() if line.startswith(b"data:")
    ]
    return b"\n".join(parts) if parts else None


class StreamRelay:
    """Feeds upstream bytes through; returns what to forward to the client now."""

    def __init__(self, *, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self.assembler = StreamAssembler()
        self.done = False
        self._buffer = b""
        self._held: list[bytes] = []

    def feed(self, data: bytes) -> bytes:
        buffer = self._buffer + data if self._buffer else data
        out: list[bytes] = []
        start = 0
        while True:
            end, sep = _find_event_end(buffer, start)
            if end == -1:
                break
            event = buffer[start : end + sep]
            start = end + sep
            forwarded = self._event(event, buffer[start - sep : start])
            if forwarded:
                if self.done:
                    self._held.append(forwarded)
                else:
                    out.append(forwarded)
        self._buffer = buffer[start:]
        return b"".join(out)

    def _event(self, event: bytes, sep: bytes) -> bytes:
        payload = _event_data(event[: -len(sep)])
        if payload is None:
            return event
        if payload == b"[DONE]":
            self.done = True
            return event
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return event
        if not isinstance(chunk, dict):
            return event
        self.assembler.add(chunk)
        if not self.strip_usage or "usage" not in chunk:
            return event
        if not chunk.get("choices") and chunk["usage"] is not None:
            return b""
        if chunk["usage"] is None and event.count(_USAGE_NULL) == 1:
            return event.replace(_USAGE_NULL, b"", 1)
        del chunk["usage"]
        return b"data: " + orjson.dumps(chunk) + sep

    def finish(self) -> bytes:
        """Everything held back: the ``[DONE]`` event and any trailing bytes."""
        rest = b"".join(self._held) + self._buffer
        self._held.clear()
        self._buffer = b""
        return rest
