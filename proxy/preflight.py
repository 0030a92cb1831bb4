"""``distillery proxy --check-config``: what the proxy would meet at start, checked for real.

Parsing the configuration proves little: a key variable can be unset (and then
the clients' own keys go upstream), a port taken, a database unreachable or of
a kind Distillery does not speak, an upstream unreachable.  Each check here
does what the proxy will do -- read the variable, bind the port, connect and
read the schema revision, send one ``GET /models`` without any key -- and says
what it found.
"""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from distillery.core.config import Settings
from distillery.core.errors import DistilleryError


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def missing_upstream_key(settings: Settings) -> str | None:
    """Why the proxy must not start: a key variable named but unset, or ``None``."""
    variable = settings.upstream.api_key_env
    if variable and not settings.upstream.api_key and not os.environ.get(variable):
        return (
            f"upstream.api_key_env names ${variable}, which is not set: the proxy would "
            "forward its clients' own keys instead of holding one. Export it, or remove "
            "api_key_env."
        )
    return None


def run_checks(settings: Settings, config: Path | None) -> list[Check]:
    return [
        Check("config file", True, str(config) if config else "none (defaults and environment)"),
        _upstream_key(settings),
        _listen(settings),
        _database(settings),
        _upstream(settings),
    ]


def _upstream_key(settings: Settings) -> Check:
    problem = missing_upstream_key(settings)
    if problem:
        return Check("upstream key", False, problem)
    if settings.upstream.resolved_api_key():
        return Check("upstream key", True, "held by the proxy; clients present [auth] keys")
    return Check("upstream key", True, "none: each client's own key is forwarded")


def _listen(settings: Settings) -> Check:
    host, port = settings.proxy.host, settings.proxy.port
    if port == 0:
        return Check("listen", True, f"{host}: any free port")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            return Check("listen", False, f"cannot listen on {host}:{port}: {exc.strerror}")
    return Check("listen", True, f"{host}:{port} is free")


def _database(settings: Settings) -> Check:
    from distillery.store.db import create_engine, schema_revision
    from distillery.store.migrations import HEAD

    url = settings.storage.resolved_database_url()
    try:
        engine = create_engine(url)
    except DistilleryError as exc:
        return Check("database", False, str(exc))
    try:
        revision = schema_revision(engine)
    except Exception as exc:  # any driver error: the message is what the user needs
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        return Check("database", False, f"cannot open {engine.url!r}: {reason}")
    finally:
        engine.dispose()
    if revision == HEAD:
        state = f"schema at {HEAD} (current)"
    elif revision is None:
        state = "empty: the proxy creates the schema at start"
    else:
        state = f"schema at {revision}: the proxy migrates it to {HEAD} at start"
    return Check("database", True, f"{engine.url!r}: {state}")


def _upstream(settings: Settings) -> Check:
    url = settings.upstream.url + "/models"
    request = urllib.request.Request(url, method="GET")  # no key: reachability only
    try:
        with urllib.request.urlopen(request, timeout=settings.upstream.connect_timeout) as answer:
            status = answer.status
    except urllib.error.HTTPError as exc:
        status = exc.code  # 401 without a key still proves it answers
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return Check("upstream", False, f"cannot reach {url}: {reason}")
    return Check(
        "upstream", True, f"{settings.upstream.url} answers (HTTP {status} to GET /models)"
    )
