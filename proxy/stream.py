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

import re
from typing import Any

import orjson

_USAGE_NULL = b',"usage":null'


class StreamAssembler:
    """Merges ``chat.completion.chunk`` objects into one ``chat.completion``.

    Text arrives in thousands of small deltas, so it is collected in lists and
    joined once in :meth:`result` (appending to a string each time would be
    quadratic).  A chunk whose shape is not OpenAI's stops the assembly: the
    stream is still relayed untouched, and ``malformed`` says what was wrong.
    """

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.choices: dict[int, dict[str, Any]] = {}
        self._parts: dict[tuple[int, str], list[str]] = {}
        self._tool_calls: dict[int, dict[int, dict[str, Any]]] = {}
        self._extra: dict[int, dict[str, Any]] = {}
        self.extra: dict[str, Any] = {}
        self.usage: dict[str, Any] | None = None
        self.error: dict[str, Any] | None = None
        self.malformed: str | None = None
        self.chunks = 0

    def add(self, chunk: dict[str, Any]) -> None:
        self.chunks += 1
        if self.malformed is not None:
            return
        try:
            self._add(chunk)
        except (TypeError, AttributeError, KeyError, ValueError) as exc:
            self.malformed = f"chunk {self.chunks} is not a chat.completion.chunk: {exc!r}"[:500]

    def unreadable(self, exc: Exception) -> None:
        """A data event that is not JSON the proxy can read (garbage, or nested too deep)."""
        self.chunks += 1
        if self.malformed is None:
            self.malformed = f"chunk {self.chunks} is not JSON the proxy can read: {exc}"[:500]

    def _add(self, chunk: dict[str, Any]) -> None:
        if "error" in chunk and "choices" not in chunk:
            self.error = chunk["error"] if isinstance(chunk["error"], dict) else {"message": chunk}
            return
        if not self.head:
            self.head = {
                key: chunk[key]
                for key in ("id", "created", "model", "system_fingerprint", "service_tier")
                if key in chunk
            }
        for key, value in chunk.items():
            if key not in _KNOWN_CHUNK and key not in _NOT_KEPT and value is not None:
                self.extra[key] = value  # e.g. "moderation": kept, the last one sent
        usage = chunk.get("usage")
        if usage:
            if not isinstance(usage, dict):
                raise TypeError("usage is not an object")
            self.usage = usage
        # OpenAI's usage-only chunk (stream_options.include_usage) carries "choices": [].
        choices = chunk.get("choices")
        if choices is None:
            return
        if not isinstance(choices, list):
            raise TypeError("choices is not a list")
        for choice in choices:
            self._add_choice(choice)

    def _add_choice(self, choice: dict[str, Any]) -> None:
        index = choice.get("index", 0)
        if not isinstance(index, int):
            raise TypeError("choice index is not an integer")
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
            text = delta.get(key)
            if text is not None:
                if not isinstance(text, str):
                    raise TypeError(f"delta.{key} is not a string")
                self._parts.setdefault((index, key), []).append(text)
        for call in delta.get("tool_calls") or ():
            self._add_tool_call(index, call)
        if delta.get("function_call"):
            function = message.setdefault("function_call", {"name": [], "arguments": []})
            for key in ("name", "arguments"):
                function[key].append(_text(delta["function_call"].get(key)))
        if delta.get("annotations"):
            message.setdefault("annotations", []).extend(delta["annotations"])
        for key, value in delta.items():
            if key not in _KNOWN_DELTA and value is not None:
                # audio, reasoning_content and whatever comes next: kept, merged as
                # openai-python merges them (text appended, objects merged key by key).
                extra = self._extra.setdefault(index, {})
                extra[key] = _merge(extra.get(key), value)
        logprobs = choice.get("logprobs")
        if logprobs:
            merged_logprobs = merged["logprobs"] or {"content": None, "refusal": None}
            for key in ("content", "refusal"):
                if logprobs.get(key):
                    if merged_logprobs[key] is None:
                        merged_logprobs[key] = []
                    merged_logprobs[key].extend(logprobs[key])
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
                "function": {"name": [], "arguments": []},
            }
        if call.get("id"):
            slot["id"] = call["id"]
        if call.get("type"):
            slot["type"] = call["type"]
        function = call.get("function") or {}
        slot["function"]["name"].append(_text(function.get("name")))
        slot["function"]["arguments"].append(_text(function.get("arguments")))

    def result(self) -> dict[str, Any] | None:
        """The reassembled completion, or ``None`` if no chunk ever arrived."""
        if not self.head and not self.choices:
            return None
        choices = []
        for index in sorted(self.choices):
            choice = self.choices[index]
            message = dict(choice["message"])
            for key in ("content", "refusal"):
                parts = self._parts.get((index, key))
                if parts is not None:
                    message[key] = "".join(parts)
            if "function_call" in message:
                message["function_call"] = _joined(message["function_call"])
            for key, value in self._extra.get(index, {}).items():
                message[key] = _settled(value)
            calls = self._tool_calls.get(index)
            if calls:
                message["tool_calls"] = [
                    {**calls[i], "function": _joined(calls[i]["function"])} for i in sorted(calls)
                ]
            choices.append({**choice, "message": message})
        completion: dict[str, Any] = {"id": self.head.get("id"), "object": "chat.completion"}
        completion.update(self.head)
        completion.update(self.extra)
        completion["choices"] = choices
        completion["usage"] = self.usage
        return completion


# A chunk's members read by name; any other is kept but ``_NOT_KEPT``: ``obfuscation`` is
# per-chunk padding against length side channels (noise), ``error`` is the call's error.
_KNOWN_CHUNK = frozenset(
    ("id", "object", "created", "model", "system_fingerprint", "service_tier", "choices", "usage")
)
_NOT_KEPT = frozenset(("obfuscation", "error"))
# The delta members merged by name above; any other is kept by ``_merge``.
_KNOWN_DELTA = frozenset(
    ("role", "content", "refusal", "tool_calls", "function_call", "annotations")
)


class _Text(list[str]):
    """A streamed string's pieces, joined once when the completion is built."""


def _merge(merged: Any, value: Any) -> Any:
    if isinstance(value, str):
        if isinstance(merged, _Text):
            merged.append(value)
            return merged
        return _Text([value])
    if isinstance(value, dict):
        merged = merged if isinstance(merged, dict) else {}
        for key, item in value.items():
            # ``index`` and ``type`` name a slot; they are not pieces of it.
            merged[key] = item if key in ("index", "type") else _merge(merged.get(key), item)
        return merged
    if isinstance(value, list) and isinstance(merged, list) and not isinstance(merged, _Text):
        return merged + value
    return value


def _settled(value: Any) -> Any:
    if isinstance(value, _Text):
        return "".join(value)
    if isinstance(value, dict):
        return {key: _settled(item) for key, item in value.items()}
    return value


def _text(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise TypeError("a streamed function name or arguments is not a string")
    return value


def _joined(function: dict[str, list[str]]) -> dict[str, str]:
    return {key: "".join(parts) for key, parts in function.items()}


def malformed(completion: dict[str, Any]) -> str | None:
    """What makes a (non-streamed) chat.completion unreadable, or ``None`` if it is fine.

    The proxy relays whatever the upstream sent; this decides whether it can
    also be stored as a completion or only as an upstream error.
    """
    choices = completion.get("choices")
    if not isinstance(choices, list):
        return "choices is not a list"
    for choice in choices:
        if not isinstance(choice, dict):
            return "a choice is not an object"
        message = choice.get("message")
        if message is not None and not isinstance(message, dict):
            return "a choice's message is not an object"
        if isinstance(message, dict) and not isinstance(message.get("content"), str | None):
            content = message.get("content")
            if not isinstance(content, list):
                return "a message's content is neither a string nor a list"
    usage = completion.get("usage")
    if usage is not None and not isinstance(usage, dict):
        return "usage is not an object"
    return None


# The blank line that ends an event; one regex finds whichever comes first in
# a single scan (searching for each separately rescans the buffer per event).
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n")


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

    def __init__(self, *, strip_usage: bool, drop_unreadable: bool = False) -> None:
        self.strip_usage = strip_usage
        # A student's garbage is not relayed (the teacher's is: the proxy is transparent).
        self.drop_unreadable = drop_unreadable
        self.assembler = StreamAssembler()
        self.done = False
        self._buffer = bytearray()
        self._scan = 0
        self._held: list[bytes] = []

    def feed(self, data: bytes) -> bytes:
        """Linear in the bytes fed, however they are split into reads and events."""
        if self._buffer:
            self._buffer += data
            buffer: bytes | bytearray = self._buffer
        else:
            buffer = data
            self._scan = 0
        out: list[bytes] = []
        start = 0
        while (match := _EVENT_END.search(buffer, max(start, self._scan))) is not None:
            end = match.end()
            event = bytes(buffer[start:end])
            start = end
            forwarded = self._event(event, match.group())
            if forwarded:
                if self.done:
                    self._held.append(forwarded)
                else:
                    out.append(forwarded)
        if start == 0 and isinstance(buffer, bytearray):
            pass  # nothing complete yet: keep growing the same buffer
        else:
            self._buffer = bytearray(buffer[start:])
        # A separator can straddle two reads: rescan only the last 3 bytes.
        self._scan = max(0, len(self._buffer) - 3)
        return b"".join(out)

    def _event(self, event: bytes, sep: bytes) -> bytes:
        if self.drop_unreadable and self.assembler.malformed is not None:
            return b""  # a broken stream: nothing after the break is relayed
        payload = _event_data(event[: -len(sep)])
        if payload is None:
            return event
        if payload == b"[DONE]":
            self.done = True
            return event
        try:
            chunk = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            # Relayed as it came; the stored answer would lack it, so it is not a success.
            if payload.strip():
                self.assembler.unreadable(exc)
            return b"" if self.drop_unreadable else event
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
        try:
            return b"data: " + orjson.dumps(chunk) + sep
        except orjson.JSONEncodeError:  # nested deeper than orjson writes: sent as it came
            return event

    def finish(self) -> bytes:
        """Everything held back: the ``[DONE]`` event and any trailing bytes."""
        rest = b"".join(self._held) + bytes(self._buffer)
        self._held.clear()
        self._buffer = bytearray()
        return rest
