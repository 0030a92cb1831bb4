"""The dashboard's security and pages in a real headless Chromium (Debian's, through
chromium-driver): what a browser sends -- its cookies, its Origin on a form from another
site, its downloads -- not what a test client is told to send.  Screenshots of each
page are kept under the test's tmp_path to look at."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from distillery.core.config import key_fingerprint
from distillery.store import open_store, query

from helpers import RunningProxy, ServerThread, capture_record, wait_for, wait_until
from ui_data import ADMIN, ALICE, BOB, call, eval_summary, routed_dashboard

pytestmark = pytest.mark.slow
COOKIE = "distillery_session"


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = tmp_path / "shots"
    folder.mkdir()
    return folder


# When each proxy's bursts of calls were made (support, sales, the captures): which UTC days
# have calls depends on the time of day the test runs.
CALL_TIMES: dict[str, list[float]] = {}


@pytest.fixture
def proxy(start_proxy: Callable[..., RunningProxy]) -> Iterator[RunningProxy]:
    """The dashboard with alice's and bob's calls, made in the last hours; ADMIN is an admin."""
    running = start_proxy({"auth": {"admin_keys": [key_fingerprint(ADMIN)]}}, dashboard=True)
    now = time.time()
    # Half past the hour two hours ago, and nine days ago: each burst in one hour's column.
    support, sales = (3600 * ((now - ago) // 3600) + 1800 for ago in (7200, 9 * 86400))
    store = open_store(running.settings.storage.resolved_database_url())
    store.insert(
        [
            call(n, ALICE, f"support question {n}", {"app": "support"}, created_at=support + n)
            for n in range(1, 11)
        ]
        + [
            call(n, ALICE, f"sales question {n}", {"app": "sales"}, created_at=sales + n)
            for n in range(11, 14)
        ]
        + [
            capture_record(
                f"cap_{20 + n:028d}",
                created_at=now - 600 + n,
                tenant=key_fingerprint(key),
                prompt_fingerprint="fp_account",
                model_requested="gpt-4o",
                request={"messages": [{"role": "system", "content": prompt}]},
            )
            for n, (key, prompt) in enumerate(
                [(BOB, "Account 4829-1173, PIN 5521."), (ALICE, "Account 1111-2222, PIN 0000.")]
            )
        ]
    )
    store.close()
    CALL_TIMES[running.url] = [support, sales, now - 600]
    yield running


def sign_in(driver: Any, proxy: RunningProxy, key: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(proxy.url + "/ui/sign-in")
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.ID, "sign-in").click()
    wait_until(driver, lambda d: d.current_url.endswith("/ui/completions"), "signed in")


def on_sign_in_page(driver: Any) -> bool:
    return bool(driver.current_url.endswith("/ui/sign-in") and driver.find_elements("id", "key"))


def test_a_signed_out_or_revoked_sessions_cookie_is_refused(
    proxy: RunningProxy, start_proxy: Callable[..., RunningProxy], chrome: Any, shots: Path
) -> None:
    from selenium.webdriver.common.by import By

    sign_in(chrome, proxy, ADMIN)
    cookie = chrome.get_cookie(COOKIE)
    assert cookie is not None
    chrome.find_element(By.CSS_SELECTOR, "form.who button").click()
    wait_until(chrome, on_sign_in_page, "the sign-in page after signing out")
    # The old cookie put back, as an attacker who copied it would: no session.
    chrome.add_cookie({k: cookie[k] for k in ("name", "value", "path")})
    chrome.get(proxy.url + "/ui/datasets")
    wait_until(chrome, on_sign_in_page, "the replayed cookie refused")
    chrome.save_screenshot(str(shots / "signed-out.png"))

    # Signed in again, then the admin key is taken out of [auth]: a proxy on the same
    # database with that config (same host, so the browser sends it the same cookie)
    # refuses the session at once.
    sign_in(chrome, proxy, ADMIN)
    chrome.get(proxy.url + "/ui/datasets")
    assert chrome.find_element(By.TAG_NAME, "h1").text == "Datasets"
    url = proxy.settings.storage.resolved_database_url()
    revoked = start_proxy({}, database_url=url, dashboard=True)
    chrome.get(revoked.url + "/ui/datasets")
    wait_until(chrome, on_sign_in_page, "the revoked key's session refused")


def test_a_malformed_cookie_shows_the_sign_in_page(
    proxy: RunningProxy, chrome: Any, shots: Path
) -> None:
    chrome.get(proxy.url + "/ui/sign-in")
    for value in ("bm90IGpzb24.c2lnbmF0dXJl", "%%%.%%%", "a.b.c.d"):
        chrome.delete_all_cookies()
        chrome.add_cookie({"name": COOKIE, "value": value, "path": "/ui"})
        chrome.get(proxy.url + "/ui/completions")
        wait_until(chrome, on_sign_in_page, f"the sign-in page for cookie {value!r}")
    chrome.save_screenshot(str(shots / "malformed-cookie.png"))


def test_a_tenant_never_sees_another_tenants_prompts(
    proxy: RunningProxy, chrome: Any, shots: Path
) -> None:
    """Alice and Bob sent one template (their prompts differ only in digits): every page
    alice can reach shows her prompt and never Bob's account number."""
    from selenium.webdriver.common.by import By

    sign_in(chrome, proxy, ALICE)
    pages = ["/ui/", "/ui/?since=24h", "/ui/?since=90d", "/ui/completions"]
    pages += ["/ui/completions?q=Account", f"/ui/completions/cap_{21:028d}"]
    for path in pages:
        chrome.get(proxy.url + path)
        text = chrome.find_element(By.TAG_NAME, "body").text
        assert "4829" not in text and "5521" not in text, path
        assert "4829" not in chrome.page_source, path
    chrome.get(proxy.url + "/ui/?since=24h")
    assert "Account 1111-2222, PIN 0000." in chrome.find_element(By.ID, "tasks").text
    chrome.save_screenshot(str(shots / "overview-alice.png"))
    chrome.get(proxy.url + f"/ui/completions/cap_{20:028d}")  # bob's call, by its id
    assert chrome.find_element(By.TAG_NAME, "h1").text == "Not found"


def test_a_form_on_another_site_changes_nothing_open_or_signed_in(
    proxy: RunningProxy,
    start_proxy: Callable[..., RunningProxy],
    servers: ServerThread,
    chrome: Any,
    shots: Path,
) -> None:
    """The attack as a browser runs it: a page on another origin posts a form to the
    dashboard's bulk delete.  The browser sends the session cookie along (same host,
    SameSite does not stop it), so the Origin check is what refuses it."""
    url = proxy.settings.storage.resolved_database_url()
    opened = start_proxy({"ui": {"open": True}}, database_url=url, dashboard=True)
    before = len(proxy.rows())
    targets: dict[str, str] = {}

    async def evil(request: web.Request) -> web.Response:
        target = targets[request.match_info["which"]]
        return web.Response(
            content_type="text/html",
            text=f"""<form id="f" method="post" action="{target}/ui/completions/bulk">
<input name="action" value="delete"><input name="scope" value="filter">
<input name="confirm" value="yes"><input name="csrf" value=""></form>
<script>document.getElementById("f").submit()</script>""",
        )

    app = web.Application()
    app.router.add_get("/{which}", evil)
    evil_url, _ = servers.serve(app)
    targets.update(open=opened.url, signed=proxy.url)
    sign_in(chrome, proxy, ADMIN)
    for which in ("open", "signed"):
        chrome.get(f"{evil_url}/{which}")
        wait_until(chrome, lambda d: "/ui/completions/bulk" in d.current_url, "the form's post")
        body = chrome.find_element("tag name", "body").text
        assert "from another site is refused" in body, body
        chrome.save_screenshot(str(shots / f"cross-origin-{which}.png"))
    assert len(proxy.rows()) == before


def test_the_date_range_changes_the_series(proxy: RunningProxy, chrome: Any, shots: Path) -> None:
    from selenium.webdriver.common.by import By

    sign_in(chrome, proxy, ADMIN)
    chrome.get(proxy.url + "/ui/")

    def buckets() -> int:
        return int(chrome.find_element(By.ID, "chart-calls").get_attribute("data-buckets"))

    def columns() -> list[str]:
        titles = chrome.find_elements(By.CSS_SELECTOR, "#chart-calls rect.total title")
        return [t.get_attribute("textContent") for t in titles]

    assert buckets() == 8 and "by the day" in chrome.find_element(By.ID, "window").text
    week = columns()
    chrome.find_element(By.LINK_TEXT, "24h").click()
    wait_until(chrome, lambda d: "by the hour" in d.find_element(By.ID, "window").text, "24h")
    assert buckets() == 25
    hours = columns()
    # The 10 support calls of two hours ago in one column; the older sales calls are out.
    assert sum("10 calls" in c for c in hours) == 1 and sum(": 0 calls" in c for c in hours) >= 22
    chrome.save_screenshot(str(shots / "overview-24h.png"))
    chrome.find_element(By.LINK_TEXT, "30d").click()
    wait_until(chrome, lambda d: buckets() == 31, "30 days")
    # The days with calls (support two hours ago, the captures ten minutes ago: one day,
    # or two in the first two hours of a UTC day; sales nine days ago), the rest drawn empty.
    busy = {int(moment // 86400) for moment in CALL_TIMES[proxy.url]}
    assert sum(": 0 calls" in c for c in columns()) == 31 - len(busy)
    assert columns() != week
    # A custom range: the two days of the sales calls nine days ago, by the hour.
    since = chrome.find_element(By.ID, "since")
    since.clear()
    since.send_keys("10d")
    until = chrome.find_element(By.ID, "until")
    until.clear()
    until.send_keys("8d")
    until.submit()
    wait_until(chrome, lambda d: "until=8d" in d.current_url, "the custom range")
    assert buckets() == 49 and sum("3 calls" in c for c in columns()) == 1
    totals = chrome.find_element(By.ID, "totals").text
    assert "Calls\n3" in totals
    chrome.save_screenshot(str(shots / "overview-custom.png"))


def test_an_export_downloads_exactly_the_filtered_calls(
    proxy: RunningProxy, chrome: Any, tmp_path: Path, shots: Path
) -> None:
    from selenium.webdriver.common.by import By

    sign_in(chrome, proxy, ALICE)
    chrome.get(proxy.url + "/ui/completions")
    chrome.find_element(By.ID, "tag").send_keys("app=support")
    chrome.find_element(By.ID, "q").send_keys("question")
    chrome.find_element(By.ID, "apply").click()
    wait_until(chrome, lambda d: "tag=app%3Dsupport" in d.current_url, "the filter")
    chrome.save_screenshot(str(shots / "completions-filtered.png"))
    chrome.find_element(By.ID, "export-jsonl").click()
    target = tmp_path / "downloads" / "completions.jsonl"
    wait_for(target.exists, 20, "the download")
    exported = [json.loads(line)["id"] for line in target.read_text().splitlines()]
    store = open_store(proxy.settings.storage.resolved_database_url())
    filters = query.parse_filters(
        tags=["app=support"], text="question", tenants=(key_fingerprint(ALICE),)
    )
    expected = [r["id"] for r in query.find(store, filters, order="asc", limit=None)]
    store.close()
    assert exported == expected and len(expected) == 10


def test_the_eval_page_shows_prompts_and_outputs(
    proxy: RunningProxy, chrome: Any, shots: Path
) -> None:
    from selenium.webdriver.common.by import By

    from distillery.store import evals

    summary = eval_summary()
    labels = list(summary["candidates"])
    samples: Any = [
        {
            "item": 0,
            "candidate": label,
            "item_key": "k0",
            "output": {"role": "assistant", "content": f"{label} says refund"},
            "error": None,
            "grades": {"exact": {"score": float(i == 0), "passed": i == 0, "detail": ""}},
            "latency_ms": 10.0,
            "prompt_tokens": 5,
            "completion_tokens": 5,
        }
        for i, label in enumerate(labels)
    ]
    items: Any = [
        {
            "item": 0,
            "item_key": "k0",
            "messages": [{"role": "user", "content": "Can I get a refund?"}],
            "reference": {"role": "assistant", "content": "Yes, within 30 days."},
        }
    ]
    store = open_store(proxy.settings.storage.resolved_database_url())
    evals.save_run(store, "eval_browser", {"source": "support@1"}, summary, samples, items)
    store.close()
    sign_in(chrome, proxy, ADMIN)
    chrome.get(proxy.url + "/ui/evals/eval_browser")
    row = chrome.find_element(By.CSS_SELECTOR, "#items tr.item")
    assert row.find_element(By.CSS_SELECTOR, "pre.prompt").text == "user: Can I get a refund?"
    assert row.find_element(By.CSS_SELECTOR, "pre.reference").text == "Yes, within 30 days."
    answers = [e.text for e in row.find_elements(By.CSS_SELECTOR, "pre.answer")]
    assert answers == [f"{label} says refund" for label in labels]
    verdicts = [e.text for e in row.find_elements(By.CSS_SELECTOR, ".verdict")]
    assert verdicts == ["exact: 1"] + ["exact: 0"] * (len(labels) - 1)
    chrome.save_screenshot(str(shots / "eval.png"))


def test_the_routes_page_shows_a_route_and_its_evidence(
    start_proxy: Callable[..., RunningProxy], servers: ServerThread, chrome: Any, shots: Path
) -> None:
    from selenium.webdriver.common.by import By

    from fake_student import ask, samples

    routed = routed_dashboard(start_proxy, servers)
    for n in range(40):  # enough perfect pairs for the lower bound to reach the bar of 0.9
        assert ask(routed, n).status_code == 200
    wait_for(lambda: len(samples(routed)) == 40, 20, "forty graded pairs")
    routed.wait_stored(40)
    sign_in(chrome, routed, ADMIN)
    chrome.find_element(By.LINK_TEXT, "Routes").click()
    wait_until(chrome, lambda d: d.find_elements(By.ID, "route-support"), "the routes page")
    assert chrome.find_element(By.ID, "mode-support").text == "shadow"
    section = chrome.find_element(By.ID, "route-support")
    assert "1.000 [0.907, 1.000]" in section.find_element(By.CSS_SELECTOR, ".score").text
    assert section.find_element(By.CSS_SELECTOR, ".verdict-text").text == "clears the bar"
    assert len(section.find_elements(By.CSS_SELECTOR, "tr.pair")) >= 3
    chrome.save_screenshot(str(shots / "routes.png"))
    chrome.find_element(By.ID, "off-support").click()
    wait_until(chrome, lambda d: d.find_elements(By.ID, "notice"), "the notice")
    assert chrome.find_element(By.ID, "mode-support").text == "off"
    assert "shadow -> off" in chrome.find_element(By.ID, "notice").text
