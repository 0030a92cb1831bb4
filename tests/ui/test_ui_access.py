"""Who sees what on the dashboard, over HTTP: sessions, sign-in by key fingerprint, CSRF and
Origin checks, tenants apart, captured text escaped, sessions that end (the same in a real
browser: test_ui_browser.py).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from distillery.cli import cli
from distillery.core.config import key_fingerprint, load_settings
from distillery.core.errors import ConfigError
from distillery.store import dashboard as dashboard_store
from distillery.store import open_store
from distillery.ui import sessions

from helpers import (
    RunningProxy,
    capture_record,
)
from ui_data import ADMIN, ALICE, BOB, browser, csrf_of, ids_on, sign_in


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
