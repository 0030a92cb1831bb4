"""The completions pages over HTTP: filters page by page, bulk actions, copy as curl,
value pickers and export.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from distillery.core.config import key_fingerprint
from distillery.store import open_store, query

from helpers import (
    RunningProxy,
)
from ui_data import ALICE, XSS, browser, csrf_of, ids_on, sign_in


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
