"""The dashboard's pages in a real headless Chromium (slow): the completions pages with a
tool call, Distill from a filter, and the screenshot script over every page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from distillery.core.config import key_fingerprint
from distillery.store import open_store

from fake_finetuning import FakeFineTuning
from helpers import (
    CHROMIUM,
    DRIVER,
    RunningProxy,
    capture_record,
    wait_until,
)
from ui_data import ADMIN, ALICE, XSS, eval_summary

TOOLS_CALL = capture_record(
    f"cap_{63:028d}",
    created_at=1_764_300_063.0,
    tenant=key_fingerprint(ALICE),
    model_requested="gpt-4o",
    request={
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "You look orders up."},
            {"role": "user", "content": "Where is order 5?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "lookup_order", "arguments": '{"id": 5}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped"}'},
        ],
    },
    response={
        "id": "chatcmpl-63",
        "model": "gpt-4o-2024-08-06",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Order 5 has shipped."}}
        ],
    },
    metadata={"app": "tools"},
)


@pytest.mark.slow
def test_the_dashboard_in_a_real_browser(
    dashboard: RunningProxy, chrome: Any, tmp_path: Path
) -> None:
    """Sign in, filter by a tag, page with htmx, open a call with tool calls, tag it; a
    payload in a prompt stays text; screenshots of each page are kept to look at."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.expected_conditions import staleness_of

    store = open_store(dashboard.settings.storage.resolved_database_url())
    store.insert([TOOLS_CALL])
    store.close()
    shots = tmp_path / "shots"
    shots.mkdir()
    chrome.get(dashboard.url + "/ui/completions")
    wait_until(chrome, lambda d: d.current_url.endswith("/ui/sign-in"), "the sign-in page")
    chrome.save_screenshot(str(shots / "sign-in.png"))
    chrome.find_element(By.ID, "key").send_keys(ALICE)
    chrome.find_element(By.ID, "sign-in").click()
    wait_until(chrome, lambda d: d.current_url.endswith("/ui/completions"), "the list")

    tag = chrome.find_element(By.CSS_SELECTOR, "#filters input[name=tag]")
    tag.send_keys("app=sales")
    chrome.find_element(By.ID, "apply").click()
    sales = [f"cap_{n:028d}" for n in range(60, 55, -1)]

    def shown(driver: Any) -> list[str]:
        rows = driver.find_elements(By.CSS_SELECTOR, "#rows tr.call")
        return [row.get_attribute("data-id") for row in rows]

    # Read on the new page only (the old one had rows too): the rows must become these.
    wait_until(chrome, lambda d: "tag=app%3Dsales" in d.current_url and shown(d) == sales, "sales")
    chrome.save_screenshot(str(shots / "completions.png"))

    # htmx under the strict CSP: "Older calls" appends the next page in place.
    chrome.get(dashboard.url + "/ui/completions?tag=app%3Dsupport")
    assert len(chrome.find_elements(By.CSS_SELECTOR, "#rows tr.call")) == 50
    chrome.find_element(By.CSS_SELECTOR, "#more a").click()
    wait_until(
        chrome,
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#rows tr.call")) == 56,
        "the second page",
    )
    assert chrome.find_elements(By.ID, "more") == []

    chrome.get(dashboard.url + "/ui/completions?tag=app%3Dtools")
    chrome.find_element(By.CSS_SELECTOR, "#rows tr.call a").click()
    wait_until(chrome, lambda d: d.find_elements(By.ID, "chat"), "the call")
    roles = [e.text for e in chrome.find_elements(By.CSS_SELECTOR, "#chat .msg > header")]
    assert roles == [
        "SYSTEM",
        "USER",
        "ASSISTANT",
        "TOOL · RESULT OF CALL_1",
        "ASSISTANT · OUTPUT",
    ]
    assert chrome.find_element(By.CSS_SELECTOR, ".tool-call .fn").text == "lookup_order"
    assert "Order 5 has shipped." in chrome.find_element(By.CSS_SELECTOR, ".output").text
    chrome.save_screenshot(str(shots / "call.png"))
    tags = chrome.find_element(By.ID, "tags")
    tags.clear()
    tags.send_keys("app=tools\nreviewed=yes")
    chrome.find_element(By.ID, "save-tags").click()
    wait_until(chrome, staleness_of(tags), "the page after saving")  # a new page came
    # ... though maybe not parsed yet: read the saved tags from it once it is.
    saved = wait_until(chrome, lambda d: d.find_element(By.ID, "tags"), "the saved tags")
    assert saved.get_attribute("value").splitlines() == ["app=tools", "reviewed=yes"]
    assert dashboard.tags(TOOLS_CALL["id"]) == {"app": "tools", "reviewed": "yes"}

    chrome.get(dashboard.url + f"/ui/completions/cap_{62:028d}")
    wait_until(chrome, lambda d: d.find_elements(By.ID, "chat"), "the call with a payload")
    assert chrome.execute_script("return window.__xss === undefined") is True
    assert XSS in chrome.find_element(By.CSS_SELECTOR, "#chat .role-user").text
    chrome.save_screenshot(str(shots / "payload.png"))
    print(f"screenshots in {shots}")


@pytest.mark.slow
def test_distill_from_a_filter_in_a_real_browser(
    dashboard: RunningProxy, fine_tuning_api: FakeFineTuning, chrome: Any, tmp_path: Path
) -> None:
    """Filter, Distill, Run: the job page follows the fake fine-tuning API to succeeded."""
    from selenium.webdriver.common.by import By

    shots = tmp_path / "shots"
    shots.mkdir()
    chrome.get(dashboard.url + "/ui/sign-in")
    chrome.find_element(By.ID, "key").send_keys(ADMIN)
    chrome.find_element(By.ID, "sign-in").click()
    wait_until(chrome, lambda d: d.current_url.endswith("/ui/completions"), "the list")
    chrome.get(dashboard.url + "/ui/?tag_key=app&since=400d")  # the by-tag panel loads itself
    wait_until(chrome, lambda d: d.find_elements(By.ID, "by-tag-table"), "the by-tag panel")
    values = [
        td.text for td in chrome.find_elements(By.CSS_SELECTOR, "#by-tag-table td:first-child")
    ]
    assert sorted(values) == ["sales", "support"]
    chrome.get(dashboard.url + "/ui/completions?tag=app%3Dsupport")
    chrome.find_element(By.ID, "distill-link").click()
    wait_until(chrome, lambda d: d.find_elements(By.ID, "distill"), "the Distill dialog")
    assert "57 calls match" in chrome.find_element(By.ID, "selection").text
    chrome.find_element(By.ID, "name").send_keys("support")
    chrome.find_element(By.ID, "base-model").send_keys("gpt-4.1-mini")
    chrome.find_element(By.ID, "estimate-button").click()  # htmx, under the CSP
    wait_until(chrome, lambda d: d.find_elements(By.ID, "price"), "the estimate")
    chrome.save_screenshot(str(shots / "distill.png"))
    chrome.find_element(By.ID, "run").click()
    wait_until(chrome, lambda d: "/ui/jobs/ftjob_" in d.current_url, "the job page")
    wait_until(
        chrome,
        lambda d: d.find_element(By.ID, "job-status").text == "succeeded",
        "the job to succeed",
    )
    assert chrome.find_element(By.ID, "tuned-model").text.startswith("ft:gpt-4.1-mini")
    # The finished job's fragment stopped polling: the page stays as it is. (CI caught the
    # old fragment asking again on every swap, which also made this read race the swap.)
    assert chrome.find_element(By.ID, "job").get_attribute("hx-trigger") is None
    chrome.save_screenshot(str(shots / "job.png"))

    from distillery.store import evals

    store = open_store(dashboard.settings.storage.resolved_database_url())
    evals.save_run(store, "eval_in_browser", {"source": "support@1 (distill)"}, eval_summary(), [])
    store.close()
    chrome.get(dashboard.url + "/ui/evals")
    chrome.find_element(By.CSS_SELECTOR, "tr.run a").click()
    wait_until(chrome, lambda d: d.find_elements(By.ID, "scores"), "the eval run")
    cells = [
        [td.text for td in row.find_elements(By.TAG_NAME, "td")[:3]]
        for row in chrome.find_elements(By.CSS_SELECTOR, "#scores tbody tr")
    ]
    assert cells == [
        ["teacher:gpt-4o", "exact", "0.950"],
        ["base student", "exact", "—"],
        [f"tuned:{XSS}", "exact", "0.900"],
    ]
    assert chrome.execute_script("return window.__xss === undefined") is True
    chrome.save_screenshot(str(shots / "eval.png"))
    print(f"screenshots in {shots}")


@pytest.mark.slow
def test_the_screenshot_script_shows_every_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """scripts/screenshots.py (the README's pictures) runs end to end on a demo store."""
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("no chromium/chromedriver: apt-get install chromium chromium-driver")
    import importlib.util

    path = Path(__file__).parents[2] / "scripts" / "screenshots.py"
    spec = importlib.util.spec_from_file_location("screenshots", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("DISTILLERY_DATA_DIR", str(tmp_path / "data"))
    module.main(tmp_path / "shots")
    written = sorted(p.name for p in (tmp_path / "shots").glob("*.png"))
    assert written == sorted(f"dashboard-{name}.png" for name, _ in module.PAGES)
    assert all(p.stat().st_size > 10_000 for p in (tmp_path / "shots").glob("*.png"))
