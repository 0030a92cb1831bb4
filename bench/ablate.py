"""``distillery`` with pieces of the request path switched off, for ``request_cost.py``.

    ABLATE=log,metrics python bench/ablate.py proxy --port 8787 ...

Each name in ``ABLATE`` replaces one piece with a no-op (or its cheapest stand-in), so
that the bench can count what that piece costs a call.  Never for serving traffic: the
proxy it runs is missing what the names say.  A piece that was renamed or removed fails
loudly here (``setattr`` on a name that is not there), not by measuring nothing.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

PIECES: dict[str, str] = {
    "log": "the canonical log line (and the other lines the app module writes)",
    "metrics": "Prometheus: requests, latency, chat latency, tokens, capture outcomes",
    "contextvars": "structlog's per-request context (request_id bound for every line)",
    "tags": "tagging: tags from headers, rules and the prompt fingerprint",
    "headers": "header filtering both ways (only Authorization and Content-Type kept)",
    "drain": "reading what a handler left unread of the request body",
    "timeouts": "the upstream socket timeouts (a timer per read)",
    "redaction": "redaction of the captured record",
}


def _replace(owner: Any, name: str, value: Any) -> None:
    getattr(owner, name)  # AttributeError when the piece moved: the bench must follow it
    setattr(owner, name, value)


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def apply(names: set[str]) -> None:
    unknown = names - PIECES.keys()
    if unknown:
        sys.exit(
            f"ABLATE: unknown piece(s) {', '.join(sorted(unknown))}; known: {', '.join(PIECES)}"
        )
    import structlog
    from multidict import CIMultiDict

    from distillery.core.redact import Redactor
    from distillery.proxy import app, chat, metrics, tagging

    if "log" in names:

        class Silent:
            info = warning = exception = error = staticmethod(_nothing)

        _replace(app, "log", Silent())
    if "metrics" in names:
        for method in ("answered", "chat", "capture_outcome"):
            _replace(metrics.Metrics, method, _nothing)
    if "contextvars" in names:
        _replace(structlog.contextvars, "clear_contextvars", _nothing)
        _replace(structlog.contextvars, "bind_contextvars", _nothing)
    if "tags" in names:
        _replace(tagging.Tagger, "tags", lambda self, *args: {})
        _replace(chat, "prompt_fingerprint", lambda body: None)
    if "headers" in names:

        def request_headers(headers: Any, authorization: Any, *, identity: bool = False) -> Any:
            return CIMultiDict(
                {
                    "Authorization": authorization or headers.get("Authorization", ""),
                    "Accept-Encoding": "identity",
                }
            )

        _replace(chat, "request_headers", request_headers)
        _replace(
            chat.Call,
            "response_headers",
            lambda self, upstream: {"Content-Type": upstream.get("Content-Type", "")},
        )
    if "drain" in names:

        async def no_drain(request: Any, response: Any) -> None:
            return None

        _replace(app, "_drain", no_drain)
    if "timeouts" in names:
        import aiohttp

        timeout: Callable[..., Any] = aiohttp.ClientTimeout
        _replace(aiohttp, "ClientTimeout", lambda **kwargs: timeout(total=None))
    if "redaction" in names:
        _replace(Redactor, "__call__", lambda self, value: value)
        _replace(Redactor, "text", lambda self, value: value)


def main() -> None:
    apply(set(filter(None, os.environ.get("ABLATE", "").split(","))))
    from distillery.cli import main as cli

    sys.argv = ["distillery", *sys.argv[1:]]
    cli()


if __name__ == "__main__":
    main()
