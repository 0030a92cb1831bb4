"""What one proxy app holds for its whole life, under a typed ``web.AppKey``."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from distillery.config import Settings, key_fingerprint
from distillery.proxy.capture import Capture
from distillery.proxy.errors import APIError
from distillery.proxy.metrics import Metrics
from distillery.proxy.tagging import Tagger

ANONYMOUS = "anonymous"


@dataclass
class Proxy:
    settings: Settings
    tagger: Tagger
    metrics: Metrics
    capture: Capture | None
    upstream_url: str = field(init=False)
    upstream_key: str | None = field(init=False)
    session: aiohttp.ClientSession = field(init=False)

    def __post_init__(self) -> None:
        self.upstream_url = self.settings.upstream.url
        self.upstream_key = self.settings.upstream.resolved_api_key()
        self._samples = [
            (rule.tag.split("=", 1)[0], rule.tag.split("=", 1)[1], rule.rate)
            for rule in self.settings.capture.sample
        ]

    def authorize(self, request: web.Request) -> tuple[str, str | None]:
        """The caller's tenant fingerprint and the Authorization to send upstream.

        With an upstream key configured the proxy is the only holder of that
        key, so callers must present one of the proxy keys; otherwise the
        caller's own key is forwarded as it is.
        """
        header = request.headers.get("Authorization", "")
        scheme, _, key = header.partition(" ")
        key = key.strip() if scheme.lower() == "bearer" else ""
        if self.upstream_key is None:
            return (key_fingerprint(key) if key else ANONYMOUS), (header or None)
        if not key or not self.settings.auth.accepts(key):
            raise APIError(
                401,
                "Incorrect API key provided. Use a key listed in the proxy's [auth] keys.",
                code="invalid_api_key",
            )
        return key_fingerprint(key), f"Bearer {self.upstream_key}"

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
REQUEST_ID = web.RequestKey("request_id", str)


def log_fields(request: web.Request) -> dict[str, Any]:
    """Fields a handler adds to the request's one canonical log line."""
    return request[LOG_FIELDS]
