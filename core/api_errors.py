"""Errors in OpenAI's JSON shape, for every HTTP server Distillery runs (proxy, serve).

The proxy never rewrites an upstream's error: those pass through byte for byte.
These are only for what a Distillery server decides on its own (a bad body, an
unreachable upstream, an unknown route).  Each carries the request id, when the
server has one, in ``x-request-id``: the header the openai SDK reads into
``error.request_id``.
"""

from __future__ import annotations

from typing import Any

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


# orjson writes JSON nested at most this deep (it reads up to 1024 levels): deeper
# requests cannot be forwarded, so they are refused the same way whichever limit is met.
MAX_DEPTH = 254


def too_deep() -> APIError:
    return APIError(
        400,
        f"The request body nests JSON deeper than the proxy can forward ({MAX_DEPTH} levels).",
        code="invalid_json",
    )


def json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be one JSON object."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if exc.msg == "depth limit exceeded":
            raise too_deep() from None
        raise APIError(400, f"The request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    return body


def from_http_exception(exc: web.HTTPException, request: web.Request) -> APIError:
    """aiohttp's own 4xx/5xx (no such route, method not allowed) in OpenAI's shape."""
    return APIError(
        exc.status,
        f"{exc.reason}: {request.method} {request.path}",
        code="not_found" if exc.status == 404 else None,
    )


def unhandled(server: str) -> APIError:
    """A bug, never the client's fault: the client still gets OpenAI's shape."""
    return APIError(
        500,
        f"The {server} failed to handle this request; see its log for the request id.",
        type="server_error",
    )
