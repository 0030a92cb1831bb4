"""What one proxy app holds for its whole life, under a typed ``web.AppKey``."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from distillery.core.api_errors import APIError
from distillery.core.config import Settings
from distillery.core.redact import Redactor
from distillery.proxy.capture import Capture
from distillery.proxy.metrics import Metrics
from distillery.proxy.routes import Router
from distillery.proxy.tagging import Tagger
from distillery.store import Store

ANONYMOUS = "anonymous"
MAX_IDENTITIES = 4096


@dataclass(frozen=True)
class Caller:
    tenant: str  # fingerprint of the presented key, or "anonymous"
    authorization: str | None  # what to send upstream
    admin: bool  # sees every tenant's stored completions

    @property
    def tenants(self) -> tuple[str, ...] | None:
        """The tenants whose stored completions this caller may see (None: all)."""
        return None if self.admin else (self.tenant,)


@dataclass
class Proxy:
    settings: Settings
    tagger: Tagger
    metrics: Metrics
    capture: Capture | None
    redactor: Redactor
    store: Store | None = None
    # Reads the config again (SIGHUP): what [routes] and [endpoints] say then takes effect.
    reload: Callable[[], Settings] | None = None
    upstream_url: str = field(init=False)
    upstream_key: str | None = field(init=False)
    session: aiohttp.ClientSession = field(init=False)
    router: Router = field(init=False)
    # Where the dashboard is mounted ("/ui/"), if it is: said when the proxy is ready.
    dashboard: str | None = None
    # The tasks serving requests now: what a shutdown cuts at proxy.shutdown_timeout.
    inflight: set[asyncio.Task[Any]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.router = Router(self.settings, self.store, self.metrics)
        self.upstream_url = self.settings.upstream.url
        self.upstream_key = self.settings.upstream.resolved_api_key()
        self._identities: dict[str, tuple[str, bool] | None] = {}
        self._samples = [
            (rule.tag.split("=", 1)[0], rule.tag.split("=", 1)[1], rule.rate)
            for rule in self.settings.capture.sample
        ]

    def authorize(self, request: web.Request) -> tuple[str, str | None]:
        """The caller's tenant fingerprint and the Authorization to send upstream."""
        caller = self.caller(request)
        return caller.tenant, caller.authorization

    def caller(self, request: web.Request) -> Caller:
        """Who is calling, and what to send upstream on their behalf.

        With an upstream key configured the proxy is the only holder of that
        key, so callers must present one of the proxy keys; otherwise the
        caller's own key is forwarded as it is.  Either way the tenant is the
        fingerprint of the key the caller presented.
        """
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        key = key.strip() if scheme.lower() == "bearer" else ""
        identity = self._identify(key)
        if self.upstream_key is None:
            tenant, admin = identity or (ANONYMOUS, False)
            return Caller(tenant, header or None, admin)
        if identity is None:
            raise APIError(
                401,
                "Incorrect API key provided. Use a key listed in the proxy's [auth] keys.",
                code="invalid_api_key",
            )
        tenant, admin = identity
        return Caller(tenant, f"Bearer {self.upstream_key}", admin)

    def _identify(self, key: str) -> tuple[str, bool] | None:
        """``Settings.identify``, remembered per key: two SHA-256s a call otherwise.  In
        memory only, bounded; [auth] is read once per process (a reload does not change it)."""
        try:
            return self._identities[key]
        except KeyError:
            if len(self._identities) >= MAX_IDENTITIES:
                self._identities.clear()
            identity = self._identities[key] = self.settings.identify(key)
            return identity

    def sample_rate(self, tags: dict[str, str]) -> float:
        for key, value, rate in self._samples:
            if tags.get(key) == value:
                return rate
        return self.settings.capture.sample_rate

    def sampled(self, tags: dict[str, str]) -> bool:
        rate = self.sample_rate(tags)
        return rate >= 1.0 or random.random() < rate


PROXY = web.AppKey("proxy", Proxy)
LOG_FIELDS = web.RequestKey("log_fields", dict[str, Any])
# Work a handler leaves for after the response is out (metrics): the middleware runs it.
AFTER_RESPONSE = web.RequestKey("after_response", list[Callable[[], None]])
REQUEST_ID = web.RequestKey("request_id", str)


def after_response(request: web.Request, work: Callable[[], None]) -> None:
    """Run ``work`` once the response has been delivered, off the request's critical path."""
    request[AFTER_RESPONSE].append(work)


def log_fields(request: web.Request) -> dict[str, Any]:
    """Fields a handler adds to the request's one canonical log line."""
    return request[LOG_FIELDS]
