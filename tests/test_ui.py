"""The dashboard over HTTP: sessions, CSRF, tenants, filters, escaping (the browser test
is test_ui_browser.py)."""

from __future__ import annotations

import html
import json
import re
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from distillery.cli import cli
from distillery.core.config import key_fingerprint, load_settings
from distillery.core.errors import ConfigError
from distillery.store import dashboard as dashboard_store
from distillery.store import open_store, query
from distillery.store.records import CaptureRecord
from distillery.ui import sessions

from fake_finetuning import FakeFineTuning
from helpers import (
    CHROMIUM,
    DRIVER,
    RunningProxy,
    ServerThread,
    capture_record,
    wait_for,
    wait_until,
)
from ui_data import ADMIN, ALICE, BOB, XSS, call, eval_summary, routed_dashboard


@pytest.fixture
def dashboard(start_proxy: Callable[..., RunningProxy]) -> Iterator[RunningProxy]:
    """A proxy with the dashboard, and a store holding alice's and bob's calls."""
    proxy = start_proxy({"auth": {"admin_keys": [key_fingerprint(ADMIN)]}}, dashboard=True)
    store = open_store(proxy.settings.storage.resolved_database_url())
    store.insert(
        [call(n, ALICE, f"support question {n}", {"app": "support"}) for n in range(1, 56)]
        + [call(n, ALICE, f"sales question {n}", {"app": "sales"}) for n in range(56, 61)]
        + [call(61, BOB, "bob's own question", {"app": "support"})]
        + [call(62, ALICE, XSS, {"app": "support", "note": XSS}, model=XSS)]
    )
    store.close()
    yield proxy


OPEN: list[httpx.Client] = []


@pytest.fixture(autouse=True)
def close_clients() -> Iterator[None]:
    yield
    while OPEN:
        OPEN.pop().close()


def browser(proxy: RunningProxy) -> httpx.Client:
    """A cookie-keeping client (closed when the test ends)."""
    client = httpx.Client(base_url=proxy.url, follow_redirects=False, timeout=10)
    OPEN.append(client)
    return client


def sign_in(proxy: RunningProxy, key: str) -> httpx.Client:
    client = browser(proxy)
    page = client.get("/ui/sign-in")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token is not None
    done = client.post("/ui/sign-in", data={"csrf": token.group(1), "key": key})
    assert done.status_code == 303 and done.headers["location"] == "/ui/completions"
    return client


def ids_on(page: str) -> list[str]:
    return re.findall(r'<tr class="call" data-id="([^"]+)"', page)


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found is not None
    return found.group(1)


def test_every_page_needs_a_session_and_carries_a_strict_policy(dashboard: RunningProxy) -> None:
    client = browser(dashboard)
    for path in ("/ui/", "/ui/completions", f"/ui/completions/cap_{1:028d}"):
        answer = client.get(path)
        assert answer.status_code == 303 and answer.headers["location"] == "/ui/sign-in"
    page = client.get("/ui/sign-in")
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert "'unsafe-inline'" not in page.headers["content-security-policy"]
    assert page.headers["x-frame-options"] == "DENY"
    assert client.post("/ui/completions/x/tags", data={"tags": "a=b"}).status_code == 401
    assert client.get("/ui/static/htmx.min.js").status_code == 200
    assert client.get("/ui").headers["location"] == "/ui/sign-in"


def test_signing_in_keeps_only_the_keys_fingerprint(dashboard: RunningProxy) -> None:
    client = sign_in(dashboard, ALICE)
    cookie = client.cookies[sessions.COOKIE]
    assert ALICE not in cookie
    store = open_store(dashboard.settings.storage.resolved_database_url())
    secret = dashboard_store.secret(store, sessions.SECRET).encode()
    store.close()
    session = sessions.decode(cookie, secret)
    assert session is not None and session.tenant == key_fingerprint(ALICE)
    assert not session.admin
    # A cookie whose payload was changed (to claim admin) is no session at all.
    payload, signature = cookie.split(".")
    forged = sessions._b64(sessions._unb64(payload).replace(b"false", b"true")) + "." + signature
    other = browser(dashboard)
    other.cookies.set(sessions.COOKIE, forged)
    assert other.get("/ui/completions").status_code == 303


def test_a_key_the_proxy_does_not_accept_cannot_sign_in(
    start_proxy: Callable[..., RunningProxy], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UPSTREAM_KEY", "sk-upstream")
    proxy = start_proxy(
        {"upstream": {"api_key_env": "UPSTREAM_KEY"}, "auth": {"keys": [ALICE]}}, dashboard=True
    )
    client = browser(proxy)
    token = csrf_of(client.get("/ui/sign-in").text)
    refused = client.post("/ui/sign-in", data={"csrf": token, "key": "sk-stranger"})
    assert refused.status_code == 401 and "not accepted here" in refused.text
    assert sessions.COOKIE not in client.cookies
    assert client.post("/ui/sign-in", data={"key": ALICE}).status_code == 403  # no token
    sign_in(proxy, ALICE)


def test_a_tag_filter_shows_exactly_the_matching_calls_page_by_page(
    dashboard: RunningProxy,
) -> None:
    client = sign_in(dashboard, ALICE)
    first = client.get("/ui/completions", params={"tag": "app=support"})
    assert first.status_code == 200
    shown = ids_on(first.text)
    assert len(shown) == 50
    older = re.search(r'<a href="([^"]+)" hx-get', first.text)
    assert older is not None
    second = client.get("/ui/completions" + older.group(1).replace("&amp;", "&"))
    shown += ids_on(second.text)
    assert "Older calls" not in second.text
    store = open_store(dashboard.settings.storage.resolved_database_url())
    expected = query.find(
        store,
        query.parse_filters(tags=["app=support"], tenants=[key_fingerprint(ALICE)]),
        limit=None,
    )
    store.close()
    assert shown == [r["id"] for r in expected]  # newest first, no gap, no repeat
    assert len(shown) == 56  # 55 support calls and the one with a payload; no sales, no bob
    sales = ids_on(client.get("/ui/completions", params={"tag": "app=sales"}).text)
    assert sales == [f"cap_{n:028d}" for n in range(60, 55, -1)]
    bad = client.get("/ui/completions", params={"since": "last tuesday"})
    assert bad.status_code == 200 and "Cannot read &#39;last tuesday&#39; as a time" in bad.text


def test_tenants_never_see_or_change_each_others_calls(dashboard: RunningProxy) -> None:
    bob = sign_in(dashboard, BOB)
    listed = ids_on(bob.get("/ui/completions").text)
    assert listed == [f"cap_{61:028d}"]
    alices = f"cap_{1:028d}"
    assert bob.get(f"/ui/completions/{alices}").status_code == 404
    token = csrf_of(bob.get(f"/ui/completions/cap_{61:028d}").text)
    changed = bob.post(f"/ui/completions/{alices}/tags", data={"csrf": token, "tags": "app=stolen"})
    assert changed.status_code == 404
    admin = sign_in(dashboard, ADMIN)
    assert len(ids_on(admin.get("/ui/completions", params={"tag": "app=support"}).text)) == 50
    assert "app=support" in admin.get(f"/ui/completions/{alices}").text


def test_tags_change_only_with_the_sessions_csrf_token(dashboard: RunningProxy) -> None:
    client = sign_in(dashboard, ALICE)
    target = f"/ui/completions/cap_{3:028d}"
    page = client.get(target).text
    assert client.post(target + "/tags", data={"tags": "app=nope"}).status_code == 403
    wrong = client.post(target + "/tags", data={"tags": "app=nope", "csrf": "guess"})
    assert wrong.status_code == 403
    saved = client.post(
        target + "/tags", data={"tags": "app=support\nreviewed=yes", "csrf": csrf_of(page)}
    )
    assert saved.status_code == 303
    assert ids_on(client.get("/ui/completions", params={"tag": "reviewed=yes"}).text) == [
        f"cap_{3:028d}"
    ]
    bad = client.post(target + "/tags", data={"tags": "not a tag", "csrf": csrf_of(page)})
    assert bad.status_code == 400 and "must look like key=value" in bad.text
    assert dashboard.tags(f"cap_{3:028d}") == {"app": "support", "reviewed": "yes"}


def test_captured_text_renders_as_text(dashboard: RunningProxy) -> None:
    """A prompt, a tag value and a model name that carry markup come out escaped."""
    client = sign_in(dashboard, ALICE)
    for page in (
        client.get("/ui/completions").text,
        client.get(f"/ui/completions/cap_{62:028d}").text,
    ):
        assert "<script>window" not in page and "<img src=x" not in page
        assert "&lt;script&gt;window.__xss = 1&lt;/script&gt;" in page
    page = client.get("/ui/completions").text
    scripts = re.findall(r'<script src="([^"]+)" defer></script>', page)
    assert scripts == ["/ui/static/htmx.min.js", "/ui/static/app.js"]
    assert page.count("<script") == 2  # ours only


def test_the_open_dashboard_is_refused_off_loopback() -> None:
    with pytest.raises(ConfigError, match=r"only on 127\.0\.0\.1"):
        load_settings(overrides={"ui.open": True, "proxy.host": "0.0.0.0"})
    assert load_settings(overrides={"ui.open": True}).ui.open


# -- in a real browser ---------------------------------------------------------------

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


# -- datasets, fine-tunes, evals ------------------------------------------------------


def build_dataset(proxy: RunningProxy) -> None:
    from click.testing import CliRunner

    from distillery.cli import cli

    url = proxy.settings.storage.resolved_database_url()
    args = ["support", "--tag", "app=support", "--val-fraction", "0.2", "--incremental"]
    done = CliRunner().invoke(
        cli, ["dataset", "build", *args, "--database-url", url], catch_exceptions=False
    )
    assert done.exit_code == 0, done.output


def test_datasets_jobs_and_evals_are_for_admins(dashboard: RunningProxy) -> None:
    alice = sign_in(dashboard, ALICE)
    for path in ("/ui/datasets", "/ui/jobs", "/ui/evals", "/ui/datasets/support/1"):
        refused = alice.get(path)
        assert refused.status_code == 403 and "admin key" in refused.text
    assert "/ui/datasets" not in alice.get("/ui/completions").text  # not in the menu either


def test_dataset_versions_their_counts_diff_and_files(dashboard: RunningProxy) -> None:
    build_dataset(dashboard)
    store = open_store(dashboard.settings.storage.resolved_database_url())
    store.insert(
        [
            call(
                70, ALICE, "How do I move my invoices to a new billing address?", {"app": "support"}
            ),
            call(71, ALICE, "Can two people share one seat on the team plan?", {"app": "support"}),
        ]
    )
    store.close()
    build_dataset(dashboard)
    admin = sign_in(dashboard, ADMIN)
    listing = admin.get("/ui/datasets").text
    assert 'data-name="support"' in listing and ">v2<" in listing
    page = admin.get("/ui/datasets/support/2")
    assert page.status_code == 200
    store = open_store(dashboard.settings.storage.resolved_database_url())
    from distillery.store import datasets

    v2 = datasets.get(store, "support", 2)
    store.close()
    assert v2 is not None
    counts = v2["manifest"]["counts"]
    assert f"train {counts['train']}, validation {counts['val']}" in page.text
    found = re.search(r'<p id="diff">(.*?)</p>', page.text)
    assert found is not None, page.text[page.text.index("<main>") :][:1500]
    assert found.group(1) == "Since v1: 2 examples added, 0 removed."
    train = admin.get("/ui/datasets/support/2/train.jsonl")
    assert train.status_code == 200
    assert train.content == (Path(v2["path"]) / "train.jsonl").read_bytes()
    assert 'filename="support-v2-train.jsonl"' in train.headers["content-disposition"]
    assert admin.get("/ui/datasets/support/2/manifest.json").status_code == 404
    assert admin.get("/ui/datasets/support/9").status_code == 404


def test_a_job_page_follows_its_backend_until_it_ends(dashboard: RunningProxy) -> None:
    from distillery.curation.training.backends import JobSpec, new_job_id
    from distillery.curation.training.jobs import start_job
    from distillery.curation.training.memory import InMemoryBackend
    from distillery.store import datasets

    build_dataset(dashboard)
    store = open_store(dashboard.settings.storage.resolved_database_url())
    version = datasets.latest(store, "support")
    assert version is not None
    job = start_job(store, InMemoryBackend(), JobSpec(new_job_id(), version, "tiny"))
    store.close()
    admin = sign_in(dashboard, ADMIN)
    assert f'data-id="{job["id"]}"' in admin.get("/ui/jobs").text
    page = admin.get(f"/ui/jobs/{job['id']}").text
    assert 'id="job-status">queued<' in page and "every 2s" in page
    refresh = f"/ui/jobs/{job['id']}/refresh"
    assert admin.post(refresh).status_code == 403  # no CSRF token
    headers = {"X-CSRF-Token": csrf_of(page), "HX-Request": "true"}
    seen = [admin.post(refresh, headers=headers).text for _ in range(3)]
    assert 'id="job-status">running<' in seen[0]
    assert 'id="job-status">succeeded<' in seen[1] and "every 2s" not in seen[1]
    assert "hx-trigger" not in seen[1]  # a finished job's fragment asks nothing more
    assert 'hx-trigger="load"' in admin.get(f"/ui/jobs/{job['id']}").text  # its page, once
    assert f"ft:tiny:{job['id']}" in seen[1] and "Training finished" in seen[1]
    assert "train_loss" in seen[1]  # the loss table


def test_an_eval_run_shows_every_candidates_scores(dashboard: RunningProxy) -> None:
    from distillery.store import evals

    summary = eval_summary()
    store = open_store(dashboard.settings.storage.resolved_database_url())

    def sample(item: int, label: str, text: str, score: float | None) -> Any:
        passed = score is not None and score >= 0.5
        return {
            "item": item,
            "candidate": label,
            "item_key": f"k{item}",
            "output": {"role": "assistant", "content": text},
            "error": None,
            "grades": {"exact": {"score": score, "passed": passed, "detail": ""}},
            "latency_ms": 10.0,
            "prompt_tokens": 5,
            "completion_tokens": 5,
        }

    labels = list(summary["candidates"])
    samples = [sample(0, label, "same answer", 1.0) for label in labels] + [
        sample(1, labels[0], "the teacher's answer", 1.0),
        sample(1, labels[1], "", None),
        sample(1, labels[2], XSS, 0.0),
    ]
    items: Any = [
        {
            "item": i,
            "item_key": f"k{i}",
            "messages": [{"role": "user", "content": f"question {i}?"}],
            "reference": {"role": "assistant", "content": f"reference {i}"},
        }
        for i in (0, 1)
    ]
    source = {"source": "support@1 (distill)"}
    run = evals.save_run(store, "eval_ui_test", source, summary, samples, items)
    # A later run where the base student now passes item 1: the comparison shows it.
    better = [dict(s) for s in samples]
    better[len(labels) + 1] = sample(1, labels[1], "the teacher's answer", 1.0)
    evals.save_run(store, "eval_ui_test_2", source, summary, better, items)  # type: ignore[arg-type]
    store.close()
    admin = sign_in(dashboard, ADMIN)
    assert 'data-id="eval_ui_test"' in admin.get("/ui/evals").text
    page = admin.get(f"/ui/evals/{run['id']}").text
    rows = re.findall(
        r'<tr class="score( tuned)?">\s*<td>(.*?)</td><td>exact</td>\s*<td class="num">(.*?)</td>',
        page,
    )
    assert [(label, mean) for _, label, mean in rows] == [
        ("teacher:gpt-4o", "0.950"),
        ("base student", "—"),  # no score is never a 0
        (
            "tuned:&lt;script&gt;window.__xss = 1&lt;/script&gt;&lt;img src=x onerror=&#34;window.__xss = 1&#34;&gt;",
            "0.900",
        ),
    ]
    assert [tuned for tuned, _, _ in rows] == ["", "", " tuned"]
    assert "<svg" in page and "<script>window" not in page and "<img src=x" not in page
    # Item 0: every candidate passed; item 1: they disagree, so it alone is shown first,
    # with its prompt and reference beside every candidate's answer.
    assert "(the 1 where the candidates disagree)" in page
    split = re.findall(r'<tr class="item" data-item="(\d+)">', page)
    assert split == ["1"]
    assert '<pre class="prompt">user: question 1?</pre>' in page
    assert '<pre class="reference">reference 1</pre>' in page
    assert '<pre class="answer">&lt;script&gt;window.__xss = 1' in page
    every = admin.get(f"/ui/evals/{run['id']}", params={"show": "all"}).text
    assert re.findall(r'<tr class="item" data-item="(\d+)">', every) == ["0", "1"]
    assert every.count('<pre class="answer">same answer</pre>') == len(labels)
    compared = admin.get("/ui/evals/compare", params={"a": run["id"], "b": "eval_ui_test_2"})
    changed = re.findall(
        r'<tr class="changed"><td><pre class="prompt">([^<]*)</pre></td>\s*<td>([^<]*)</td>',
        compared.text,
    )
    assert changed == [("user: question 1?", "base student")]
    assert admin.get("/ui/evals/compare", params={"a": "nope", "b": run["id"]}).status_code == 404
    assert re.search(r'class="verdict fail">exact: 0<', page)
    assert re.search(r'class="verdict none">exact: no score<', page)


# -- Distill --------------------------------------------------------------------------


@pytest.fixture
def fine_tuning_api(servers: ServerThread, monkeypatch: pytest.MonkeyPatch) -> FakeFineTuning:
    """The fake fine-tuning API, where the openai backend finds it (OPENAI_BASE_URL)."""
    fake = FakeFineTuning()
    fake.url, _ = servers.serve(fake.app)
    monkeypatch.setenv("OPENAI_BASE_URL", fake.url + "/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-fine-tuning")
    return fake


def distill_form(client: httpx.Client, query: str, **fields: str) -> httpx.Response:
    page = client.get(f"/ui/distill?{query}")
    assert page.status_code == 200, page.text
    form = {"csrf": csrf_of(page.text), "val_fraction": "0.2", "backend": "openai"} | fields
    return client.post(f"/ui/distill?{query}", data=form)


def test_distill_refuses_what_the_backend_would_before_anything_starts(
    dashboard: RunningProxy, fine_tuning_api: FakeFineTuning
) -> None:
    admin = sign_in(dashboard, ADMIN)
    page = admin.get("/ui/distill?tag=app%3Dsupport").text
    assert "57 calls match" in page  # alice's 55 and payload, bob's 1: an admin's view
    few = distill_form(admin, "tag=app%3Dsales", name="sales", base_model="gpt-4.1-mini")
    assert few.status_code == 400
    assert "selects 5 calls; OpenAI&#39;s fine-tuning API needs at least 10" in few.text
    for fields, reason in (
        ({"name": "no spaces", "base_model": "m"}, "use letters, digits"),
        ({"name": "ok", "base_model": ""}, "Name the base model"),
        ({"name": "ok", "base_model": "m", "epochs": "many"}, "epochs must be a number"),
        # The same limits as `finetune create --epochs` and `distill --epochs`.
        ({"name": "ok", "base_model": "m", "epochs": "501"}, "epochs must be from 1 to 500"),
        ({"name": "ok", "base_model": "m", "learning_rate": "0"}, "learning rate must be above 0"),
        ({"name": "ok", "base_model": "m", "backend": "nope"}, "No fine-tuning backend"),
    ):
        refused = distill_form(admin, "tag=app%3Dsupport", **fields)
        assert refused.status_code == 400 and reason in refused.text
    assert fine_tuning_api.created == []
    assert "support" not in admin.get("/ui/datasets").text
    alice = sign_in(dashboard, ALICE)
    assert alice.get("/ui/distill?tag=app%3Dsupport").status_code == 403


def test_distill_builds_the_version_and_starts_the_job(
    dashboard: RunningProxy, fine_tuning_api: FakeFineTuning
) -> None:
    admin = sign_in(dashboard, ADMIN)
    started = distill_form(
        admin, "tag=app%3Dsupport", name="support", base_model="gpt-4.1-mini", epochs="2"
    )
    assert started.status_code == 303, started.text
    task = started.headers["location"]
    job_page = ""

    def job_started() -> bool:
        nonlocal job_page
        answer = admin.get(task)
        assert "task-error" not in answer.text, answer.text
        job_page = answer.headers.get("location", "")
        return answer.status_code == 303

    wait_for(job_started, 60, "the build and the job start")
    assert job_page.startswith("/ui/jobs/ftjob_")
    [request] = fine_tuning_api.created
    assert request["model"] == "gpt-4.1-mini" and request["metadata"]["dataset"] == "support@1"
    assert request["method"]["supervised"]["hyperparameters"] == {"n_epochs": 2}
    page = admin.get(job_page).text
    headers = {"X-CSRF-Token": csrf_of(page), "HX-Request": "true"}

    def succeeded() -> bool:
        return (
            'id="job-status">succeeded<' in admin.post(job_page + "/refresh", headers=headers).text
        )

    wait_for(succeeded, 30, "the fine-tune to succeed")
    assert "ft:gpt-4.1-mini" in admin.get(job_page).text
    done = admin.post(job_page + "/refresh", headers=headers).text
    # The fake API's losses (steps 1 and 2: train 1.2 then 0.4, validation 1.3 then 0.5),
    # drawn as two lines, and its checkpoints listed.
    assert done.count("<polyline") == 2 and ">train_loss</text>" in done
    assert ">valid_loss</text>" in done and 'id="checkpoints"' in done


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


# -- bulk actions, copy as curl -------------------------------------------------------


def bulk(client: httpx.Client, query: str, confirm: bool, **fields: Any) -> httpx.Response:
    page = client.get(f"/ui/completions?{query}").text
    data = {"csrf": csrf_of(page), **fields} | ({"confirm": "yes"} if confirm else {})
    return client.post(f"/ui/completions/bulk?{query}", data=data)


def test_bulk_actions_say_how_many_calls_they_touch_first(dashboard: RunningProxy) -> None:
    alice = sign_in(dashboard, ALICE)
    chosen = {"id": [f"cap_{1:028d}", f"cap_{2:028d}"], "action": "tag", "tags": "batch=one"}
    asked = bulk(alice, "", False, **chosen)
    assert asked.status_code == 200 and "Tag 2 calls?" in asked.text
    assert dashboard.tags(f"cap_{1:028d}") == {"app": "support"}  # nothing changed yet
    done = bulk(alice, "", True, **chosen)
    assert done.status_code == 303 and "2+calls+tagged" in done.headers["location"]
    assert dashboard.tags(f"cap_{2:028d}") == {"app": "support", "batch": "one"}

    whole = {"action": "untag", "keys": "app", "scope": "filter"}
    assert "Untag 5 calls?" in bulk(alice, "tag=app%3Dsales", False, **whole).text
    bulk(alice, "tag=app%3Dsales", True, **whole)
    assert dashboard.tags(f"cap_{56:028d}") == {}

    # Bob's call among the selected ids is not alice's to delete: it is not counted.
    mixed = {"id": [f"cap_{3:028d}", f"cap_{61:028d}"], "action": "delete"}
    assert "Delete 1 call?" in bulk(alice, "", False, **mixed).text
    bulk(alice, "", True, **mixed)
    ids = [row["id"] for row in dashboard.rows()]
    assert f"cap_{3:028d}" not in ids and f"cap_{61:028d}" in ids
    assert bulk(alice, "", True, action="tag", tags="x=y").status_code == 400  # no selection


@pytest.mark.skipif(shutil.which("curl") is None, reason="no curl on this machine")
def test_copy_as_curl_replays_the_call(
    start_proxy: Callable[..., RunningProxy], sdk: Callable[..., Any]
) -> None:
    import html
    import os
    import subprocess

    proxy = start_proxy(dashboard=True)
    sdk(proxy.base_url, ALICE).chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "it's a quote: '"}]
    )
    [row] = proxy.wait_stored(1)
    page = sign_in(proxy, ALICE).get(f"/ui/completions/{row['id']}").text
    found = re.search(r'<pre class="json" id="as-curl">(.*?)</pre>', page, flags=re.DOTALL)
    assert found is not None
    command = html.unescape(found.group(1))
    env = {**os.environ, "OPENAI_BASE_URL": proxy.base_url, "OPENAI_API_KEY": ALICE}
    ran = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, env=env, timeout=30
    )
    answer = json.loads(ran.stdout)
    assert answer["object"] == "chat.completion" and answer["choices"][0]["message"]["content"]
    replayed = proxy.wait_stored(2)[-1]
    assert json.loads(replayed["request"])["messages"] == json.loads(row["request"])["messages"]


@pytest.mark.slow
def test_the_screenshot_script_shows_every_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """scripts/screenshots.py (the README's pictures) runs end to end on a demo store."""
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("no chromium/chromedriver: apt-get install chromium chromium-driver")
    import importlib.util

    path = Path(__file__).parent.parent / "scripts" / "screenshots.py"
    spec = importlib.util.spec_from_file_location("screenshots", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setenv("DISTILLERY_DATA_DIR", str(tmp_path / "data"))
    module.main(tmp_path / "shots")
    written = sorted(p.name for p in (tmp_path / "shots").glob("*.png"))
    assert written == sorted(f"dashboard-{name}.png" for name, _ in module.PAGES)
    assert all(p.stat().st_size > 10_000 for p in (tmp_path / "shots").glob("*.png"))


# -- the overview ---------------------------------------------------------------------


def test_the_overview_counts_costs_and_top_tasks_from_the_aggregates(
    start_proxy: Callable[..., RunningProxy],
) -> None:
    """Known calls in, exact numbers out: a priced model's cost, an unpriced one's "—",
    a tenant sees only its own, and the templates that cost the most come first."""
    import time

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


def test_an_eval_started_from_the_dashboard_is_stored_and_shown(
    dashboard: RunningProxy, servers: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fake_models import FakeModels

    models = FakeModels()
    models.url, _ = servers.serve(models.app)
    monkeypatch.setenv("OPENAI_BASE_URL", models.url + "/v1")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-models")
    build_dataset(dashboard)
    admin = sign_in(dashboard, ADMIN)
    form = admin.get("/ui/evals/new").text
    assert 'value="support@1"' in form
    fields = {"csrf": csrf_of(form), "dataset": "support@1", "split": "train", "limit": "5"}
    for extra, reason in (
        ({"candidates": "", "grader": "exact"}, "at least one candidate"),
        ({"candidates": "teacher@nowhere", "grader": "exact"}, "No endpoint &#39;nowhere&#39;"),
        ({"candidates": "teacher"}, "at least one grader"),
    ):
        refused = admin.post("/ui/evals/new", data=fields | extra)
        assert refused.status_code == 400 and reason in refused.text
    started = admin.post(
        "/ui/evals/new",
        data=fields | {"candidates": "teacher\nweak", "grader": ["exact", "fuzzy_match"]},
    )
    assert started.status_code == 303
    task, run_page = started.headers["location"], ""

    def finished() -> bool:
        nonlocal run_page
        answer = admin.get(task)
        assert "task-error" not in answer.text, answer.text
        run_page = answer.headers.get("location", "")
        return answer.status_code == 303

    wait_for(finished, 60, "the eval run")
    page = admin.get(run_page).text
    rows = re.findall(r"<td>(teacher|weak)</td><td>(exact|fuzzy_match)</td>", page)
    assert sorted(rows) == [
        ("teacher", "exact"),
        ("teacher", "fuzzy_match"),
        ("weak", "exact"),
        ("weak", "fuzzy_match"),
    ]
    assert "5 items from support@1 (train)" in page


def test_the_distill_estimate_prices_the_training_tokens(
    start_proxy: Callable[..., RunningProxy],
) -> None:
    proxy = start_proxy({"auth": {"admin_keys": [key_fingerprint(ADMIN)]}}, dashboard=True)
    store = open_store(proxy.settings.storage.resolved_database_url())
    store.insert(
        [
            capture_record(f"cap_{n:028d}", total_tokens=1000, metadata={"app": "x"})
            for n in range(12)
        ]
    )
    store.close()
    admin = sign_in(proxy, ADMIN)
    headers = {"X-CSRF-Token": csrf_of(admin.get("/ui/distill?tag=app%3Dx").text)}

    def estimate(**fields: str) -> str:
        answer = admin.post("/ui/distill/estimate?tag=app%3Dx", data=fields, headers=headers)
        assert answer.status_code == 200, answer.text
        return " ".join(answer.text.split())

    priced = estimate(backend="openai", base_model="gpt-4o-mini", epochs="2")
    # 12 calls x 1,000 tokens x 2 epochs at gpt-4o-mini's $3.00 per million trained tokens.
    assert "About <strong>24,000</strong> training tokens" in priced
    assert '<strong id="price">$0.07</strong>' in priced
    unpriced = estimate(backend="openai", base_model="my-model")
    assert '<strong id="price">—</strong>' in unpriced and "36,000" in unpriced  # 3 epochs
    assert "no API price" in estimate(backend="local", base_model="./student")


def test_a_task_is_followed_from_another_host(
    dashboard: RunningProxy,
    start_proxy: Callable[..., RunningProxy],
    fine_tuning_api: FakeFineTuning,
    tmp_path: Path,
) -> None:
    """Two proxies on one database, each with its own data dir (two hosts, or two pods):
    a session signed by one is good on the other, and the task one starts, the other
    follows (a reload can land on either)."""
    other = start_proxy(
        {
            "auth": {"admin_keys": [key_fingerprint(ADMIN)]},
            "storage": {"data_dir": str(tmp_path / "other-host")},
        },
        database_url=dashboard.settings.storage.resolved_database_url(),
        dashboard=True,
    )
    assert other.settings.storage.resolved_data_dir() != (
        dashboard.settings.storage.resolved_data_dir()
    )
    admin = sign_in(dashboard, ADMIN)
    started = distill_form(admin, "tag=app%3Dsupport", name="support", base_model="gpt-4.1-mini")
    assert started.status_code == 303
    follower = browser(other)
    follower.cookies.update(admin.cookies)  # one key to sign them, in the database
    assert follower.get("/ui/").status_code == 200

    def handed_over() -> bool:
        answer = follower.get(started.headers["location"])
        assert answer.status_code in (200, 303), answer.text
        return answer.status_code == 303 and "/ui/jobs/ftjob_" in answer.headers["location"]

    wait_for(handed_over, 60, "the other worker to see the job")
    assert follower.get("/ui/tasks/0123456789abcdef").status_code == 404
    assert follower.get("/ui/tasks/..%2F..%2Fsecret").status_code == 404


def test_a_task_whose_process_went_away_says_so(dashboard: RunningProxy) -> None:
    """A task stops being written when its process dies (a restart, a crash): its page
    says so after a while, instead of following it forever."""
    from datetime import UTC, datetime, timedelta

    from distillery.ui import tasks

    store = open_store(dashboard.settings.storage.resolved_database_url())
    long_ago = datetime.now(UTC) - timedelta(seconds=tasks.STOPPED_AFTER_S + 5)
    for task_id, heartbeat in (("00000000000000aa", long_ago), ("00000000000000bb", None)):
        dashboard_store.save_task(
            store,
            {
                "id": task_id,
                "title": "Distilling support",
                "state": "building the dataset",
                "error": None,
                "done_url": None,
                "started_at": long_ago,
            },
        )
        if heartbeat is not None:  # written long ago
            with store.engine.begin() as conn:
                conn.execute(
                    dashboard_store.TASKS.update()
                    .where(dashboard_store.TASKS.c.id == task_id)
                    .values(heartbeat_at=heartbeat)
                )
    store.close()
    admin = sign_in(dashboard, ADMIN)
    gone = admin.get("/ui/tasks/00000000000000aa")
    assert "the process running it went away" in gone.text and "task-error" in gone.text
    assert 'hx-trigger="every 1s"' not in gone.text  # nothing left to follow
    alive = admin.get("/ui/tasks/00000000000000bb")
    assert "building the dataset" in alive.text and "task-error" not in alive.text
    assert 'hx-trigger="every 1s"' in alive.text
    store = open_store(dashboard.settings.storage.resolved_database_url())
    forgotten = dashboard_store.forget_tasks(store, long_ago + timedelta(seconds=1))
    store.close()
    assert forgotten == 1 and admin.get("/ui/tasks/00000000000000aa").status_code == 404
    assert admin.get("/ui/tasks/00000000000000bb").status_code == 200


def test_a_malformed_cookie_or_token_is_no_session_never_a_500(dashboard: RunningProxy) -> None:
    """Cookies and tokens are whatever a client sends: bytes that are not UTF-8, non-ASCII
    text.  They are an unknown session (the sign-in page) or a refused write."""
    for cookie in (b"distillery_session=\xff\xfe.\xfd", "distillery_session=é.é".encode()):
        answer = httpx.get(dashboard.url + "/ui/completions", headers={b"Cookie": cookie})
        assert answer.status_code == 303 and answer.headers["location"] == "/ui/sign-in"
    client = sign_in(dashboard, ALICE)
    refused = client.post("/ui/completions/bulk", data={"csrf": "é" * 8, "action": "delete"})
    assert refused.status_code == 403
    signing_in = browser(dashboard)
    signing_in.get("/ui/sign-in")
    assert signing_in.post("/ui/sign-in", data={"csrf": "é", "key": ALICE}).status_code == 403


def bulk_delete(client: httpx.Client, token: str, **headers: str) -> httpx.Response:
    data = {"csrf": token, "action": "delete", "scope": "filter", "confirm": "yes"}
    return client.post("/ui/completions/bulk", data=data, headers=headers)


def test_a_write_from_another_site_is_refused_in_open_mode_and_signed_in(
    dashboard: RunningProxy, start_proxy: Callable[..., RunningProxy]
) -> None:
    """ui.open has a CSRF token too, and every write must come from the dashboard's own
    origin: a cross-origin form (the attack that deleted every call) changes nothing."""
    url = dashboard.settings.storage.resolved_database_url()
    opened = start_proxy({"ui": {"open": True}}, database_url=url, dashboard=True)
    before = len(opened.rows())
    local = browser(opened)
    page = local.get("/ui/completions")
    assert page.status_code == 200
    token = csrf_of(page.text)
    assert token  # open mode carries a token, as a signed-in page does
    evil = {"Origin": "http://evil.example"}
    assert bulk_delete(local, "", **evil).status_code == 403  # what the attack sent
    assert bulk_delete(local, token, **evil).status_code == 403  # even with the token
    assert bulk_delete(local, "").status_code == 403  # same origin, no token
    assert bulk_delete(local, "wrong").status_code == 403
    assert len(opened.rows()) == before
    # Signed in, the same: another site is refused with the session's own token.
    admin = sign_in(dashboard, ADMIN)
    token = csrf_of(admin.get("/ui/completions").text)
    assert bulk_delete(admin, token, Referer="http://evil.example/page").status_code == 403
    assert len(dashboard.rows()) == before
    same = bulk_delete(admin, token, Origin=dashboard.url)
    assert same.status_code in (200, 303), same.text
    assert len(dashboard.rows()) < before


def test_a_template_shared_by_fingerprint_shows_each_tenant_its_own_prompt(
    start_proxy: Callable[..., RunningProxy],
) -> None:
    """Prompts that differ only in digits share a fingerprint; each tenant's overview shows
    a prompt it sent itself -- never another tenant's account number -- and with its
    digits as sent."""
    import time

    from distillery.proxy.tagging import prompt_fingerprint

    proxy = start_proxy({}, dashboard=True)
    prompts = {ALICE: "Account 1111-2222, PIN 0000.", BOB: "Account 4829-1173, PIN 5521."}
    fingerprints = {
        prompt_fingerprint({"messages": [{"role": "system", "content": p}]})
        for p in prompts.values()
    }
    [fingerprint] = fingerprints  # one template for both
    store = open_store(proxy.settings.storage.resolved_database_url())
    store.insert(
        [
            capture_record(
                f"cap_{n:028d}",
                created_at=time.time() - 60 + n,
                tenant=key_fingerprint(key),
                prompt_fingerprint=fingerprint,
                request={"messages": [{"role": "system", "content": prompts[key]}]},
            )
            for n, key in enumerate([BOB, ALICE])  # bob's first: any call would be his
        ]
    )
    store.close()
    alice = sign_in(proxy, ALICE).get("/ui/").text
    assert "Account 1111-2222, PIN 0000." in alice
    assert "4829" not in alice and "5521" not in alice
    bob = sign_in(proxy, BOB).get("/ui/").text
    assert "Account 4829-1173, PIN 5521." in bob and "1111-2222" not in bob


def test_a_first_run_finds_how_to_send_a_call_and_errors_are_dashboard_pages(
    start_proxy: Callable[..., RunningProxy],
) -> None:
    """No calls yet: the completions page says how to send the first one through this
    proxy.  A page a user may not see is the dashboard's own page, not bare text."""
    proxy = start_proxy({"auth": {"admin_keys": [key_fingerprint(ADMIN)]}}, dashboard=True)
    alice = sign_in(proxy, ALICE)
    page = alice.get("/ui/completions").text
    assert "No calls yet" in page and f"OPENAI_BASE_URL={proxy.url}/v1" in page
    assert "No calls match" in alice.get("/ui/completions", params={"status": "error"}).text
    nope = alice.get("/ui/completions", params={"model": "nope"}).text
    assert "No stored call was answered by a model named &#39;nope&#39;" in nope
    refused = alice.get("/ui/datasets")
    assert refused.status_code == 403
    assert refused.headers["content-type"].startswith("text/html")
    assert "<title>403 · Distillery</title>" in refused.text and "admin" in refused.text
    assert 'href="/ui/completions"' in refused.text  # the navigation, as on every page
    missing = alice.get("/ui/completions/cap_nope")
    assert missing.status_code == 404 and "Not found" in missing.text
    # htmx swaps a fragment in: it gets the message alone.
    fragment = alice.get("/ui/datasets", headers={"HX-Request": "true"})
    assert fragment.status_code == 403 and "<html" not in fragment.text


def test_a_session_ends_on_sign_out_key_removal_idle_or_command_on_every_proxy(
    dashboard: RunningProxy, start_proxy: Callable[..., RunningProxy]
) -> None:
    """Sessions are kept in the database: a cookie replayed after its session ended is
    no session, on this proxy or any other on the database."""
    url = dashboard.settings.storage.resolved_database_url()
    admins = {"auth": {"admin_keys": [key_fingerprint(ADMIN)]}}
    other = start_proxy(admins, database_url=url, dashboard=True)

    def on(proxy: RunningProxy, cookies: httpx.Cookies, path: str = "/ui/datasets") -> int:
        client = browser(proxy)
        client.cookies.update(cookies)
        return client.get(path).status_code

    # Signed out on one proxy: the same cookie is refused on the other.
    admin = sign_in(dashboard, ADMIN)
    cookies = httpx.Cookies(admin.cookies)
    assert on(other, cookies) == 200
    token = csrf_of(admin.get("/ui/completions").text)
    assert admin.post("/ui/sign-out", data={"csrf": token}).status_code == 303
    assert on(other, cookies) == 303 and on(dashboard, cookies) == 303

    # The admin key removed from [auth]: a proxy with that config refuses its sessions.
    cookies = httpx.Cookies(sign_in(dashboard, ADMIN).cookies)
    demoted = start_proxy({}, database_url=url, dashboard=True)
    assert on(dashboard, cookies) == 200 and on(demoted, cookies, "/ui/completions") == 303

    # `distillery db end-sessions`: everyone, everywhere.
    alice = httpx.Cookies(sign_in(dashboard, ALICE).cookies)
    ended = CliRunner().invoke(cli, ["db", "end-sessions", "--database-url", url])
    assert ended.exit_code == 0 and "Ended 2 dashboard sessions." in ended.output
    assert on(dashboard, cookies) == 303 and on(other, alice, "/ui/completions") == 303

    # Idle for longer than ui.idle_minutes (60): ended.
    alice = httpx.Cookies(sign_in(dashboard, ALICE).cookies)
    assert on(dashboard, alice, "/ui/completions") == 200
    store = open_store(url)
    with store.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE ui_sessions SET seen_at = :t"),
            {"t": datetime.now(UTC) - timedelta(minutes=61)},
        )
    store.close()
    assert on(dashboard, alice, "/ui/completions") == 303

    # A cookie signed before sessions were kept (no session id) is no session.
    store = open_store(url)
    secret = dashboard_store.secret(store, sessions.SECRET).encode()
    store.close()
    old = sessions.encode(
        sessions.Session(key_fingerprint(ADMIN), True, "t", time.time() + 3600), secret
    )
    assert on(dashboard, httpx.Cookies({sessions.COOKIE: old})) == 303


# -- value pickers and export ---------------------------------------------------------


def test_pickers_offer_what_is_stored_and_export_writes_exactly_the_filter(
    dashboard: RunningProxy,
) -> None:
    """The model picker lists the tenant's own models; a model nothing answered says so
    (not a silent empty list); an export is every call of the filter, oldest first, in
    JSON lines (whole records) or CSV, and none of another tenant's."""
    import csv
    import io

    alice = sign_in(dashboard, ALICE)
    page = alice.get("/ui/completions").text
    models = re.findall(r"<option(?: selected)?>([^<]+)</option>", page)
    assert sorted(html.unescape(m) for m in models) == sorted(["gpt-4o", XSS])
    assert '<option value="app=sales">' in page and '<option value="app=support">' in page
    refused = alice.get("/ui/completions", params={"model": "gpt-4"}).text
    assert "No stored call was answered by a model named &#39;gpt-4&#39;" in refused

    sales = [f"cap_{n:028d}" for n in range(56, 61)]
    lines = alice.get("/ui/completions/export.jsonl", params={"tag": "app=sales"})
    assert lines.status_code == 200
    assert lines.headers["content-disposition"] == 'attachment; filename="completions.jsonl"'
    records = [json.loads(line) for line in lines.text.splitlines()]
    assert [r["id"] for r in records] == sales  # oldest first, every one, nothing else
    assert records[0]["request"]["messages"][0]["content"] == "sales question 56"
    table = alice.get("/ui/completions/export.csv", params={"tag": "app=sales", "q": "59"})
    rows = list(csv.DictReader(io.StringIO(table.text)))
    assert [r["id"] for r in rows] == [f"cap_{59:028d}"] and rows[0]["tags"] == "app=sales"
    # Every call of alice's; bob's never.
    everything = alice.get("/ui/completions/export.jsonl").text.splitlines()
    assert len(everything) == 61 and f"cap_{61:028d}" not in "".join(everything)
    assert alice.get("/ui/completions/export.jsonl", params={"since": "x"}).status_code == 400
    assert browser(dashboard).get("/ui/completions/export.csv").status_code == 303


# -- routes ---------------------------------------------------------------------------


def test_the_routes_page_shows_evidence_and_pairs_and_moves_a_route(
    start_proxy: Callable[..., RunningProxy], servers: ServerThread
) -> None:
    """Each route's mode, its score with the interval, the newest pairs (teacher's and
    student's answers, graded); promote, demote and off as an admin with the CSRF token,
    a promotion the evidence does not support refused with the reason."""
    from fake_student import TEACHER_TEXT, ask, samples

    proxy = routed_dashboard(start_proxy, servers)
    admin = sign_in(proxy, ADMIN)
    page = admin.get("/ui/routes").text
    assert 'id="mode-support">shadow<' in page and "No graded pairs yet" in page
    token = csrf_of(page)
    early = admin.post("/ui/routes/support/promote", data={"csrf": token})
    assert early.status_code == 303 and "failed=" in early.headers["location"]
    assert "stays in shadow" in admin.get(early.headers["location"]).text

    for n in range(3):
        assert ask(proxy, n).status_code == 200
    wait_for(lambda: len(samples(proxy)) == 3, 20, "three graded pairs")
    proxy.wait_stored(3)  # the teacher's calls too (written apart from the pairs)
    page = admin.get("/ui/routes").text
    assert re.search(r'class="score">1\.000 <small>\[1\.000, 1\.000\]</small>', page)
    assert "clears the bar" in page
    pairs = re.findall(
        r'<pre class="teacher">([^<]*)</pre></td>\s*<td><pre class="student">([^<]*)</pre>', page
    )
    # Both answers as stored: redacted (the teacher's text carries an e-mail address).
    redacted = TEACHER_TEXT.replace("bob@example.com", "[REDACTED:email]")
    assert redacted != TEACHER_TEXT and pairs == [(redacted, redacted)] * 3
    assert page.count('class="verdict pass">exact: 1<') == 3

    def press(action: str) -> str:
        answer = admin.post(f"/ui/routes/support/{action}", data={"csrf": token})
        assert answer.status_code == 303
        return admin.get(answer.headers["location"]).text

    assert "Route support: shadow -&gt; canary." in press("promote")
    assert "Route support: canary -&gt; off." in press("off")
    page = admin.get("/ui/routes").text
    assert 'id="mode-support">off<' in page and "from the dashboard by" in page
    assert re.search(r'id="off-support" disabled', page)
    # Without the token, or not an admin: refused, and nothing moves.
    assert admin.post("/ui/routes/support/promote", data={}).status_code == 403
    alice = sign_in(proxy, ALICE)
    assert alice.get("/ui/routes").status_code == 403
    alice_token = csrf_of(alice.get("/ui/completions").text)
    assert alice.post("/ui/routes/support/promote", data={"csrf": alice_token}).status_code == 403
    assert route_states(proxy)["support"]["mode"] == "off"


def route_states(proxy: RunningProxy) -> dict[str, Any]:
    from distillery.store import routes as route_store

    return route_store.states(proxy.reader)
