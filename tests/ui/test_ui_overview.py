"""The overview page over HTTP: counts, costs and top tasks from the aggregates."""

from __future__ import annotations

import html
import re
import time
from collections.abc import Callable

from distillery.core.config import key_fingerprint
from distillery.store import open_store
from distillery.store.records import CaptureRecord

from helpers import (
    RunningProxy,
    capture_record,
)
from ui_data import ADMIN, ALICE, BOB, XSS, sign_in

# -- the overview ---------------------------------------------------------------------


def test_the_overview_counts_costs_and_top_tasks_from_the_aggregates(
    start_proxy: Callable[..., RunningProxy],
) -> None:
    """Known calls in, exact numbers out: a priced model's cost, an unpriced one's "—",
    a tenant sees only its own, and the templates that cost the most come first."""

    proxy = start_proxy({"auth": {"admin_keys": [key_fingerprint(ADMIN)]}}, dashboard=True)
    now = time.time()

    def one(n: int, key: str, model: str, fp: str, app: str, status: int = 200) -> CaptureRecord:
        return capture_record(
            f"cap_{n:028d}",
            created_at=now - 3600 + n,
            tenant=key_fingerprint(key),
            status=status,
            latency_ms=300.0,
            model_requested=model,
            prompt_fingerprint=fp,
            prompt_tokens=1_000_000,
            completion_tokens=100_000,
            request={"messages": [{"role": "system", "content": f"You handle {fp}."}]},
            metadata={"app": app},
        )

    store = open_store(proxy.settings.storage.resolved_database_url())
    store.insert(
        [one(n, ALICE, "gpt-4o-2024-08-06", "fp_refunds", "support") for n in range(3)]
        + [one(3, ALICE, "gpt-4o-mini", "fp_triage", XSS, status=500)]
        + [one(4, BOB, "ft:gpt-4o-mini:acme::x", "fp_bob", "sales")]
    )
    store.close()
    alice = sign_in(proxy, ALICE)
    page = alice.get("/ui/").text
    totals = dict(re.findall(r"<span>([^<]+)</span><strong[^>]*>([^<]+)</strong>", page))
    # gpt-4o: 3 x (1M in x $2.50 + 100k out x $10) = $10.50; gpt-4o-mini: $0.15 + $0.06
    assert totals["Calls"] == "4" and totals["Errors"] == "1"
    assert totals["Cost"] == "$10.71"
    # A week holds few calls: its totals' percentiles are exact, said so.
    assert re.search(r'id="total-latency">300 ms / 300 ms<', page)
    assert '<small id="latency-kind">exact</small>' in page
    # The last 24 hours: counted from the calls, the same numbers, by the hour.
    hours = alice.get("/ui/?since=24h").text
    assert dict(re.findall(r"<span>([^<]+)</span><strong[^>]*>([^<]+)</strong>", hours)) == totals
    assert "by the hour" in hours and 'id="total-latency">300 ms / 300 ms<' in hours
    assert "by the hour" in alice.get("/ui/?since=3d").text  # up to three days, exactly
    assert "by the day" in alice.get("/ui/?since=4d").text
    tasks = re.findall(r"<tr><td><code>(\w+)</code></td><td class=\"prompt\">([^<]*)</td>", page)
    assert tasks == [
        ("fp_refunds", "You handle fp_refunds."),
        ("fp_triage", "You handle fp_triage."),
    ]
    assert "fp_bob" not in page and "<script>window" not in page
    assert "&lt;script&gt;window.__xss = 1&lt;/script&gt;" in page  # the app tag, as text
    admin = sign_in(proxy, ADMIN)
    whole = admin.get("/ui/").text
    totals = dict(re.findall(r"<span>([^<]+)</span><strong[^>]*>([^<]+)</strong>", whole))
    assert totals["Calls"] == "5" and totals["Cost"] == "—"  # bob's fine-tune has no price
    assert admin.get("/ui/?since=yesterday-ish").status_code == 400
    # Any tag, on demand: exact counts from the calls, scoped like everything else.
    assert 'hx-get="/ui/by-tag?tag_key=app&amp;since=7d"' in admin.get("/ui/?tag_key=app").text
    fragment = alice.get("/ui/by-tag", params={"tag_key": "app"}).text
    counted = re.findall(r"<tr><td>([^<]+)</td><td class=\"num\">(\d+)</td>", fragment)
    assert sorted((html.unescape(k), n) for k, n in counted) == sorted(
        [("support", "3"), (XSS, "1")]
    )
    assert "<script>window" not in fragment
