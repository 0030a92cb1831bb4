"""Errors the proxy itself answers with, in OpenAI's error JSON shape.

Upstream errors are never rewritten: they pass through byte for byte.  These
are only for what the proxy decides on its own (bad body, unreachable upstream).
Every one of them carries the proxy's request id in ``x-request-id`` (the
header the openai SDK reads into ``error.request_id``), the id its log line has.
"""

from __future__ import annotations

import orjson
from aiohttp import web


class APIError(Exception):
    """An error response in OpenAI's shape: ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.close = close  # the connection cannot be reused (a broken body)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param

    def body(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self, request_id: str | None = None) -> web.Response:
        """The response; ``request_id`` goes in ``x-request-id``, where OpenAI puts its own."""
        headers = {"x-request-id": request_id} if request_id else None
        response = web.Response(
            status=self.status,
            body=orjson.dumps(self.body()),
            content_type="application/json",
            headers=headers,
        )
        if self.close:
            response.force_close()
        return response


def upstream_unreachable(exc: BaseException) -> APIError:
    return APIError(
        502,
        f"Distillery could not reach the upstream API: {exc or type(exc).__name__}",
        type="upstream_error",
        code="upstream_unreachable",
    )


def upstream_timeout() -> APIError:
    return APIError(
        504,
        "The upstream API did not answer in time (see upstream.timeout).",
        type="upstream_error",
        code="upstream_timeout",
    )
