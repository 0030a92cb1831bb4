"""Forwarding to the upstream: header filters, the URL mapping, and pass-through.

Every ``/v1/*`` request that is not a chat completion goes through
:func:`passthrough` untouched: bodies stream both ways, compressed responses
stay compressed (the client session never decompresses), and only hop-by-hop
headers and Distillery's own ``X-Distillery-*`` headers are removed.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import unquote

import aiohttp
import structlog
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from distillery.core.api_errors import APIError
from distillery.proxy.errors import upstream_timeout, upstream_unreachable
from distillery.proxy.state import PROXY, log_fields

log = structlog.get_logger()

# RFC 9110 section 7.6.1, plus the headers the HTTP client sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
REQUEST_DROP = HOP_BY_HOP | {"host", "authorization"}
RESPONSE_DROP = HOP_BY_HOP | {"content-length"}
OWN_PREFIX = "x-distillery-"


def skip_user_agent(headers: CIMultiDict[str]) -> tuple[str, ...] | None:
    """What aiohttp must not add to a request: its own User-Agent, where the client sent
    none.  Asked per request, since skipping costs aiohttp a copy of the headers."""
    return None if "User-Agent" in headers else ("User-Agent",)


# What OpenAI's API uses; TRACE and CONNECT (and anything else) never reach the upstream.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def upstream_url(base: str, request: web.Request) -> URL:
    """``base`` + the part of the path after ``/v1`` (and after ``/a/<app>``), and the query.

    Built from the request's relative URL, so an absolute-form request line
    (``GET http://elsewhere/v1/models``) cannot name another host, and refused
    when a segment is ``.`` or ``..`` (however encoded), so a client cannot
    climb out of the configured base path.
    """
    url = request.rel_url
    raw = url.raw_path
    if raw.startswith("/a/"):
        raw = raw[raw.index("/", 3) :]
    tail = raw[3:]
    if any(unquote(segment) in (".", "..") for segment in tail.split("/")):
        raise APIError(
            400,
            f"Invalid path {request.path!r}: '.' and '..' segments are not allowed.",
            code="invalid_path",
        )
    query = url.raw_query_string
    return URL(base + tail + ("?" + query if query else ""), encoded=True)


def _connection_tokens(headers: Mapping[str, str]) -> frozenset[str]:
    """Headers the sender named in ``Connection``: hop-by-hop too (RFC 9110 7.6.1)."""
    value = headers.get("Connection")
    if not value:
        return frozenset()
    return frozenset(token.strip().lower() for token in value.split(","))


def request_headers(
    headers: Mapping[str, str], authorization: str | None, *, identity: bool = False
) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    named = _connection_tokens(headers)
    for name, value in headers.items():
        lower = name.lower()
        if lower in REQUEST_DROP or lower in named or lower.startswith(OWN_PREFIX):
            continue
        if not value.isascii():
            _check_utf8(name, value)
        out.add(name, value)
    if "content-encoding" in out:
        # aiohttp's server has already decoded the body; forward it decoded.
        del out["content-encoding"]
        out.popall("content-length", None)
    if identity:
        # The proxy sends a body of its own and must read the answer.
        out.popall("content-length", None)
        out["Accept-Encoding"] = "identity"
    if authorization:
        if not authorization.isascii():
            _check_utf8("Authorization", authorization)
        out["Authorization"] = authorization
    return out


def _check_utf8(name: str, value: str) -> None:
    """aiohttp keeps bytes that are not UTF-8 as surrogates, which cannot be sent on."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise APIError(400, f"Header {name!r} is not valid UTF-8.", code="invalid_header") from None


def response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    named = _connection_tokens(headers)
    for name, value in headers.items():
        lower = name.lower()
        if lower not in RESPONSE_DROP and lower not in named:
            out.add(name, value)
    return out


async def passthrough(request: web.Request) -> web.StreamResponse:
    proxy = request.app[PROXY]
    if request.method not in METHODS:
        raise APIError(405, f"Method {request.method} is not allowed.", code="method_not_allowed")
    tenant, authorization = proxy.authorize(request)
    log_fields(request)["tenant"] = tenant
    target = upstream_url(proxy.upstream_url, request)
    headers = request_headers(request.headers, authorization)
    data = request.content if request.body_exists else None
    response: web.StreamResponse | None = None
    try:
        async with proxy.session.request(
            request.method,
            target,
            headers=headers,
            data=data,
            allow_redirects=False,
            skip_auto_headers=skip_user_agent(headers),
        ) as upstream:
            response = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=response_headers(upstream.headers),
            )
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response
    except web.RequestPayloadError as exc:
        if response is None or not response.prepared:
            raise unreadable_body(request, exc) from None
        abort(request)
        return response
    except ConnectionResetError:
        log.info("client went away", path=request.path)
        if response is None:
            raise APIError(400, "The client closed the connection.") from None
        return response
    except (TimeoutError, aiohttp.ClientError) as exc:
        broken_body = request.content.exception()
        if isinstance(broken_body, web.RequestPayloadError) and not (
            response and response.prepared
        ):
            # Sending failed because the client's own body cannot be decoded.
            raise unreadable_body(request, broken_body) from None
        if response is None or not response.prepared:
            proxy.metrics.upstream_errors.labels(
                "timeout" if isinstance(exc, TimeoutError) else "unreachable"
            ).inc()
            raise (
                upstream_timeout() if isinstance(exc, TimeoutError) else upstream_unreachable(exc)
            ) from None
        # Headers are already out: the only honest signal left is a cut connection.
        log.warning("upstream failed mid-response", error=repr(exc))
        abort(request)
        return response


def unreadable_body(request: web.Request, exc: BaseException) -> APIError:
    """The client's body cannot be decoded (a Content-Encoding it does not honour).

    The rest of the body is unreadable too, so the connection closes after the
    answer: marking the body ended stops aiohttp from trying to drain it
    afterwards (which would raise the same error again, as an unhandled one).
    """
    request.content.feed_eof()
    encoding = request.headers.get("Content-Encoding")
    what = f"as Content-Encoding: {encoding}" if encoding else "as sent"
    reason = str(exc).replace("\n", " ").strip()
    return APIError(
        400, f"The request body cannot be read {what}: {reason}", code="invalid_body", close=True
    )


def abort(request: web.Request) -> None:
    """Close the client connection without ending the body, as the upstream did."""
    if request.transport is not None:
        request.transport.abort()
