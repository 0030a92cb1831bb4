"""A thousand hostile requests: every answer is JSON or a stream, nothing is a traceback.

The same fuzzer drives ``scripts/fault_campaign.py`` at 10,000+ requests against a
real proxy process; this is the seeded, fast slice of it that CI runs.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable

import httpx
import orjson
import pytest
from structlog.testing import capture_logs

from fuzzing import run
from helpers import RunningProxy, wait_for


def test_a_thousand_fuzzed_requests_get_no_plain_text_and_no_traceback(
    start_proxy: Callable[..., RunningProxy], caplog: pytest.LogCaptureFixture
) -> None:
    proxy = start_proxy({"proxy": {"body_timeout": 5}})
    host, port = proxy.url.removeprefix("http://").split(":")
    with capture_logs() as logs:
        results = asyncio.run(run(host, int(port), seed=20261128, count=1000))
    verdicts = Counter(answer.verdict for _, answer in results)
    bad = [
        (request[:200], answer.status, answer.body[:200])
        for request, answer in results
        if answer.verdict in ("plain", "none", "closed")
    ]
    assert not bad, bad[:5]
    assert len(results) == 1000 and verdicts["json"] > 500 and verdicts["sse"] > 10
    # Every error the proxy produced itself is OpenAI-shaped with a request id.
    own = [
        a
        for request, a in results
        if a.headers.get("x-request-id", "").startswith("cap_") and not request.startswith(b"HEAD")
    ]
    assert own and all(
        set(orjson.loads(a.body)["error"]) == {"message", "type", "param", "code"} for a in own
    )
    assert [e for e in logs if e.get("exc_info") or e["event"] == "unhandled error"] == []
    assert [r.getMessage() for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")] == []
    # Capture kept up: nothing dropped or dead-lettered, the writer catches up.
    wait_for(
        lambda: httpx.get(proxy.url + "/healthz").json()["capture"]["spool_dirty_segments"] == 0
    )
    capture = httpx.get(proxy.url + "/healthz").json()["capture"]
    assert capture["database"] == "ok" and capture["dropped"] == 0 and capture["dead_lettered"] == 0
