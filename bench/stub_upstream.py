"""A deliberately minimal OpenAI stand-in for benchmarks: raw asyncio, keep-alive.

It answers every ``POST .../chat/completions`` with a canned chat.completion, or a
canned SSE stream when the body asks for ``"stream":true``; it costs a few
microseconds per request so that the numbers measure the proxy, not the stub.

    python bench/stub_upstream.py PORT
"""

from __future__ import annotations

import asyncio
import sys

import orjson

COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "gpt-4o-mini-2024-07-18",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "The capital of France is Paris. " * 8,
                    "refusal": None,
                    "annotations": [],
                },
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 40, "completion_tokens": 64, "total_tokens": 104},
        "service_tier": "default",
        "system_fingerprint": "fp_bench",
    }
)


def _chunk(delta: dict, finish: str | None, usage: bool) -> bytes:
    body: dict = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_bench",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage:
        body["usage"] = None
    return b"data: " + orjson.dumps(body) + b"\n\n"


def _stream(usage: bool) -> bytes:
    events = [_chunk({"role": "assistant", "content": ""}, None, usage)]
    events += [_chunk({"content": f"token{i} "}, None, usage) for i in range(20)]
    events.append(_chunk({}, "stop", usage))
    if usage:
        events.append(
            b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":1700000000,'
            b'"model":"gpt-4o-mini-2024-07-18","system_fingerprint":"fp_bench","choices":[],'
            b'"usage":{"prompt_tokens":40,"completion_tokens":20,"total_tokens":60}}\n\n'
        )
    events.append(b"data: [DONE]\n\n")
    return b"".join(b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"


JSON_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nx-request-id: req_bench\r\n"
    b"Content-Length: %d\r\n\r\n" % len(COMPLETION)
) + COMPLETION
SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    b"x-request-id: req_bench\r\nTransfer-Encoding: chunked\r\n\r\n"
)
SSE_RESPONSES = {False: SSE_HEAD + _stream(False), True: SSE_HEAD + _stream(True)}


class Stub(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buffer = bytearray()  # grows in place: a 20 MB body arrives in many reads

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end == -1:
                return
            head = self.buffer[:end].lower()
            start = head.find(b"content-length:")
            length = int(head[start + 15 : head.find(b"\r\n", start)]) if start != -1 else 0
            if len(self.buffer) < end + 4 + length:
                return
            body = self.buffer[end + 4 : end + 4 + length]
            self.buffer = self.buffer[end + 4 + length :]
            if b'"stream":true' in body:
                self.transport.write(SSE_RESPONSES[b'"include_usage":true' in body])  # type: ignore[attr-defined]
            else:
                self.transport.write(JSON_RESPONSE)  # type: ignore[attr-defined]


async def main(port: int) -> None:
    server = await asyncio.get_running_loop().create_server(Stub, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(int(sys.argv[1])))
