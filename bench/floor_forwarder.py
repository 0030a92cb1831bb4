"""The floor for this design: the least an aiohttp + uvloop forwarder does per call.

Forwards ``POST /v1/chat/completions`` to the upstream with one pooled client session
and relays the answer (an SSE stream chunk by chunk as it comes), with no capture, no
tagging, no logging and no metrics.  ``bench/proxy_bench.py`` measures the proxy against
it in the same run: what the proxy costs beyond this is what its features cost.

    python bench/floor_forwarder.py PORT UPSTREAM_BASE_URL
"""

from __future__ import annotations

import sys

import aiohttp
import uvloop
from aiohttp import web

UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)


async def forward(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    headers = {
        "Content-Type": "application/json",
        "Authorization": request.headers.get("Authorization", ""),
    }
    async with request.app[SESSION].post(
        request.app[UPSTREAM] + "/chat/completions", data=body, headers=headers
    ) as upstream:
        if upstream.content_type == "text/event-stream":
            response = web.StreamResponse(
                status=upstream.status, headers={"Content-Type": "text/event-stream"}
            )
            await response.prepare(request)
            async for data in upstream.content.iter_any():
                await response.write(data)
            await response.write_eof()
            return response
        return web.Response(
            status=upstream.status,
            body=await upstream.read(),
            content_type=upstream.content_type,
        )


async def session(app: web.Application) -> object:
    app[SESSION] = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
    )
    yield
    await app[SESSION].close()


def main() -> None:
    port, upstream = int(sys.argv[1]), sys.argv[2].rstrip("/")
    app = web.Application()
    app[UPSTREAM] = upstream
    app.cleanup_ctx.append(session)
    app.router.add_post("/v1/chat/completions", forward)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


if __name__ == "__main__":
    main()
