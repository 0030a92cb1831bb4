"""A seeded HTTP fuzzer for the proxy: hostile requests as raw bytes, and what came back.

Used by ``tests/test_fuzz.py`` (a thousand requests, in-process) and by
``scripts/fault_campaign.py`` (ten thousand and more, against a real proxy
process).  Every request is well framed unless the case is about framing, so
an answer that never comes is a finding too.

The verdict on an answer: ``json`` (OpenAI's shape or an upstream's JSON),
``sse`` (a 200 event stream), ``empty`` (HEAD, 204, an empty success) -- or
``plain`` (any other body), ``closed`` (no response at all) and ``none`` (no
answer in time): the three that must never happen.
"""

from __future__ import annotations

import asyncio
import copy
import gzip
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

MODELS = [
    "fake-model",
    "fake-tools",
    "fake-error-400",
    "fake-error-500",
    "fake-malformed-choices",
    "fake-malformed-usage",
    "fake-malformed-delta",
    "fake-midstream-error",
    "gpt-4o-mini",
]
NASTY: list[Any] = [
    None,
    True,
    0,
    -1,
    2**63,
    1.5e300,
    "",
    "x" * 5000,
    "a\x00b",
    "ünï©ødé 🚀",
    "bob@example.com 4111 1111 1111 1111",
    {},
    [],
    {"a": {"b": [1, None, {"c": "d"}]}},
    [None, 1, "two"],
]
PATHS = [
    "/v1/chat/completions",
    "/a/app-1/v1/chat/completions",
    "/a/%C3%A9/v1/chat/completions",
    "/v1/models",
    "/v1/chat/completions?limit=5",
    "/v1/chat/completions/abc",
    "/v1/chat/completions/abc/messages",
    "/v1/../v1/models",
    "/v1/%2e%2e/secret",
    "/v1/./models",
    "//v1/models",
    "/v1/models?x=%ff%00",
    "/healthz",
    "/nowhere",
    "/a//v1/models",
]
METHODS = ["POST"] * 6 + [
    "GET",
    "GET",
    "DELETE",
    "PUT",
    "PATCH",
    "HEAD",
    "OPTIONS",
    "TRACE",
    "BREW",
]


def base_body(rng: random.Random) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": rng.choice(MODELS),
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": f"question {rng.randrange(10**6)}"},
        ],
    }
    if rng.random() < 0.4:
        body["stream"] = True
    if rng.random() < 0.3:
        body["tools"] = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    if rng.random() < 0.3:
        body["metadata"] = {"k": "v"}
    return body


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if len(prefix) > 12:
        return
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


def _set(root: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    parent = root
    for step in path[:-1]:
        parent = parent[step]
    parent[path[-1]] = value
    return root


def _deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def mutate(rng: random.Random, body: dict[str, Any]) -> Any:
    """The body with one to three values replaced by something hostile."""
    out: Any = body
    for _ in range(rng.randint(1, 3)):
        paths = list(_paths(out))
        path = rng.choice(paths)
        roll = rng.random()
        if roll < 0.08:
            value: Any = _deep(rng.choice([50, 200, 254, 300, 600, 1023]))
        elif roll < 0.15:
            value = {
                rng.choice(["k" * 70, "note", "m" * 64]) + str(i): copy.deepcopy(rng.choice(NASTY))
                for i in range(rng.randint(1, 20))
            }
        else:
            value = copy.deepcopy(rng.choice(NASTY))
        if path and rng.random() < 0.3 and isinstance(out, dict):
            out[
                rng.choice(
                    ["metadata", "tools", "stream_options", "n", "tool_choice", "response_format"]
                )
            ] = value
        else:
            out = _set(out, path, value)
    return out


def _encode(rng: random.Random, body: Any) -> bytes:
    try:
        raw = orjson.dumps(body)
    except (orjson.JSONEncodeError, TypeError):  # deeper than orjson writes
        import json

        try:
            raw = json.dumps(body).encode()
        except RecursionError:
            raw = b"[" * 5000 + b"]" * 5000
    roll = rng.random()
    if roll < 0.05:
        return raw[: rng.randrange(max(1, len(raw)))]  # truncated
    if roll < 0.08:
        cut = rng.randrange(len(raw))
        return raw[:cut] + bytes([rng.randrange(256)]) + raw[cut:]  # a stray byte
    if roll < 0.10:
        return b'{"model": "fake-model", "messages": [{"role": "user", "content": "\\ud800"}]}'
    if roll < 0.12:
        return b"\xef\xbb\xbf" + raw  # a BOM
    return raw


def _header_value(rng: random.Random) -> bytes:
    return rng.choice(
        [
            b"plain",
            b"caf\xe9",
            b"\xff\xfe\xfd",
            "ünï©ødé".encode(),
            b"x" * 600,
            b"",
            b"bob@example.com",
        ]
    )


def case(rng: random.Random) -> bytes:
    """One request, as the bytes a client would put on the wire."""
    method = rng.choice(METHODS)
    path = rng.choice(PATHS).encode()
    headers: list[bytes] = [b"Host: fuzz", b"Connection: close"]
    roll = rng.random()
    if roll < 0.6:
        headers.append(b"Authorization: Bearer sk-fuzz-" + str(rng.randrange(5)).encode())
    elif roll < 0.7:
        headers.append(
            b"Authorization: "
            + rng.choice(
                [b"Basic abc", b"Bearer", b"Bearer \xff\xfe", b"Bearer key-0123456789abcdef"]
            )
        )
    for _ in range(rng.choice([0, 0, 1, 3])):
        name = rng.choice([b"team", b"app", b"x" * 70, b"caf\xe9", b"env"])
        headers.append(b"X-Distillery-Tag-" + name + b": " + _header_value(rng))
    body = b""
    if method in ("POST", "PUT", "PATCH") or rng.random() < 0.1:
        body = _encode(rng, mutate(rng, base_body(rng)) if rng.random() < 0.85 else base_body(rng))
        headers.append(
            b"Content-Type: "
            + rng.choice([b"application/json", b"text/plain", b"application/json; charset=latin-1"])
        )
        encoding = rng.random()
        if encoding < 0.08:
            body = gzip.compress(body)
            headers.append(b"Content-Encoding: gzip")
        elif encoding < 0.12:
            headers.append(
                b"Content-Encoding: " + rng.choice([b"gzip", b"deflate", b"br", b"bogus"])
            )
    if body and rng.random() < 0.1:
        chunks = [body[i : i + 7] for i in range(0, len(body), 7)]
        framed = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
        headers.append(b"Transfer-Encoding: chunked")
        body = framed
    else:
        headers.append(b"Content-Length: %d" % len(body))
    return (
        method.encode()
        + b" "
        + path
        + b" HTTP/1.1\r\n"
        + b"\r\n".join(headers)
        + b"\r\n\r\n"
        + body
    )


def cases(seed: int, count: int) -> Iterator[bytes]:
    rng = random.Random(seed)
    for _ in range(count):
        yield case(rng)


@dataclass
class Answer:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    verdict: str = "none"


def _dechunk(data: bytes) -> bytes:
    out = b""
    while data:
        size_line, _, rest = data.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            return out + data
        if size == 0:
            return out
        out += rest[:size]
        data = rest[size + 2 :]
    return out


def judge(request: bytes, raw: bytes) -> Answer:
    answer = Answer()
    if not raw:
        answer.verdict = "closed"  # closed without a word: never acceptable
        return answer
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        answer.status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        answer.verdict = "plain"
        return answer
    answer.headers = {
        k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
    }
    if answer.headers.get("transfer-encoding", "").lower() == "chunked":
        body = _dechunk(body)
    answer.body = body
    content_type = answer.headers.get("content-type", "")
    if (
        request.startswith(b"HEAD ")
        or answer.status in (204, 304)
        or (not body and answer.status < 400)
    ):
        answer.verdict = "empty"
    elif content_type.startswith("text/event-stream") and answer.status == 200:
        answer.verdict = "sse"
    elif content_type.startswith("application/json") or answer.headers.get("content-encoding"):
        try:
            orjson.loads(body) if not answer.headers.get("content-encoding") else None
            answer.verdict = "json"
        except orjson.JSONDecodeError:
            answer.verdict = "plain"
    else:
        answer.verdict = "plain"
    return answer


async def send(host: str, port: int, request: bytes, timeout: float = 30) -> Answer:
    """Send one raw request and read until the server closes (``Connection: close``)."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(request)
                await writer.drain()
                raw = await reader.read()
            finally:
                writer.close()
    except TimeoutError:
        return Answer(verdict="none")
    except (ConnectionError, OSError):
        raw = b""
    return judge(request, raw)


async def run(
    host: str, port: int, seed: int, count: int, concurrency: int = 16
) -> list[tuple[bytes, Answer]]:
    """Send ``count`` cases, ``concurrency`` at a time; each request with its answer."""
    results: list[tuple[bytes, Answer]] = []
    pending = iter(cases(seed, count))
    lock = asyncio.Lock()

    async def worker() -> None:
        while True:
            async with lock:
                request = next(pending, None)
            if request is None:
                return
            results.append((request, await send(host, port, request)))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results
