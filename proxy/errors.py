"""The errors the proxy answers with when its upstream fails it (OpenAI's shape)."""

from __future__ import annotations

from distillery.core.api_errors import APIError


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
