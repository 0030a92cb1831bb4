"""Routes: a student in the teacher's shadow, behind the real proxy, with the openai SDK.

The teacher is the fake OpenAI upstream; the students are one small server whose
behaviour the test sets: good (answers as the teacher does), bad, broken (HTTP 500),
held (answers only when released), chatty (echoes an e-mail address).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from distillery.cli import cli
from distillery.core.config import key_fingerprint, load_settings
from distillery.curation.judge import install_in_thread as install
from distillery.curation.online import status
from distillery.store import open_store
from distillery.store import routes as route_store

from fake_openai import FakeOpenAI
from fake_student import ALICE, TEACHER_TEXT, FakeStudent, ask, samples, served
from helpers import RunningProxy, ServerThread, wait_for
from proxy_process import ProxyProcess

BOB = "sk-bob-key"


def routed(
    start_proxy: Callable[..., RunningProxy],
    student: FakeStudent,
    **route: Any,
) -> RunningProxy:
    """A proxy with one route, ``support`` (calls tagged app=support), to ``student``."""
    routes = route.pop("routes", None) or {
        "support": {
            "match": {"app": "support"},
            "student": "tiny@student",
            "graders": ["exact"],
            "bar": 0.9,
            "min_samples": 3,
            **route,
        }
    }
    config = {
        "endpoints": {"student": {"base_url": student.url + "/v1"}},
        "routes": routes,
    }
    return start_proxy(config, extensions=[install])


def config_file(directory: Path, student: FakeStudent, *more: str) -> Path:
    """A config file with the ``support`` route to ``student``, as a user writes one."""
    path = directory / "distillery.toml"
    lines = [
        "[endpoints.student]",
        f'base_url = "{student.url}/v1"',
        "[routes.support]",
        'match = { app = "support" }',
        'student = "tiny@student"',
        'graders = ["exact"]',
        "bar = 0.9",
        *more,
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def proxy_command(
    upstream: FakeOpenAI, tmp_path: Path, database_url: str, config: Path, *extra: str
) -> ProxyProcess:
    """`distillery proxy --config CONFIG`, a real process, on a free port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return ProxyProcess(
        port,
        upstream.url + "/v1",
        tmp_path / "data",
        database_url,
        "--config",
        str(config),
        *extra,
    ).start()


def two_workers(
    upstream: FakeOpenAI, tmp_path: Path, database_url: str, config: Path
) -> tuple[ProxyProcess, str]:
    """`distillery proxy --workers 2 --config CONFIG`, and its chat completions URL."""
    proxy = proxy_command(upstream, tmp_path, database_url, config, "--workers", "2")
    return proxy, proxy.base_url + "/chat/completions"


def test_in_shadow_the_client_gets_the_teachers_bytes_and_every_pair_is_graded(
    start_proxy: Callable[..., RunningProxy],
    servers: ServerThread,
    upstream: FakeOpenAI,
    sdk: Callable[..., Any],
) -> None:
    student = served(FakeStudent(), servers)
    proxy = routed(start_proxy, student)
    for n in range(4):
        through = ask(proxy, n)
        direct = httpx.post(
            upstream.url + "/v1/chat/completions",
            json={
                "model": "fake-model",
                "messages": [{"role": "user", "content": f"question {n}"}],
            },
        )
        assert through.status_code == 200 and through.content == direct.content
        assert through.headers["X-Distillery-Route"] == "support"
        assert through.headers["X-Distillery-Served-By"] == "teacher"
    # The real SDK, streaming: the stream arrives whole, and its pair is graded too.
    client = sdk(proxy.base_url, ALICE, default_headers={"X-Distillery-Tag-app": "support"})
    stream = client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": "question 4"}], stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == TEACHER_TEXT
    # A call the route does not cover is left alone.
    other = ask(proxy, 99, app="billing")
    assert other.status_code == 200 and "X-Distillery-Route" not in other.headers

    wait_for(lambda: len(samples(proxy)) == 5, 10, "five graded pairs")
    stored = {row["id"]: row for row in proxy.wait_stored(6)}
    for sample in samples(proxy):
        assert sample["status"] == "ok" and sample["scores"] == {"exact": 1.0}
        assert sample["score"] == 1.0 and sample["teacher_score"] == 1.0
        assert sample["student_model"] == "tiny" and sample["teacher_model"].startswith("fake")
        call = stored[sample["id"]]  # linked to the teacher's call as captured
        assert proxy.tags(call["id"])["distillery_route"] == "support"
        assert proxy.tags(call["id"])["distillery_served_by"] == "teacher"
    # The student got the request, as the student, without what was for OpenAI.
    assert len(student.requests) == 5
    assert all(r["model"] == "tiny" for r in student.requests)
    assert not any(
        {"store", "metadata", "stream", "stream_options"} & set(r) for r in student.requests
    )

    [row] = status(proxy.settings, proxy.reader)
    assert row["samples"] == 5 and row["score"] == 1.0
    # /metrics says the same (the proxy reads it every 10 s; here, now).
    from distillery.proxy.state import PROXY

    servers.call(proxy.app[PROXY].router.publish_standing())
    metrics = httpx.get(proxy.url + "/metrics").text
    for stat, value in (("samples", 5.0), ("score", 1.0), ("ci_low", 1.0), ("bar", 0.9)):
        assert f'distillery_route_standing{{route="support",stat="{stat}"}} {value}' in metrics
    assert (row["ci_low"], row["ci_high"], row["bar"]) == (1.0, 1.0, 0.9)
    assert row["verdict"] == "clears the bar"
    assert (row["win"], row["tie"], row["loss"]) == (0, 5, 0)
    assert row["student_errors"] == 0 and row["dropped"] == 0 and row["mode"] == "shadow"


def test_a_bad_student_falls_below_the_bar_and_a_broken_one_is_counted(
    start_proxy: Callable[..., RunningProxy], servers: ServerThread
) -> None:
    student = served(FakeStudent(), servers)
    student.behaviour = "bad"
    proxy = routed(start_proxy, student)
    for n in range(4):
        assert ask(proxy, n).status_code == 200
    wait_for(lambda: len(samples(proxy)) == 4, 10, "four graded pairs")
    student.behaviour = "broken"
    for n in range(4, 6):
        answer = ask(proxy, n)  # the client never sees the student's failure
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"]
    wait_for(lambda: len(samples(proxy)) == 6, 10, "six pairs")
    [row] = status(proxy.settings, proxy.reader)
    assert row["samples"] == 4 and row["score"] == 0.0 and row["verdict"] == "below the bar"
    assert (row["win"], row["tie"], row["loss"]) == (0, 0, 4)
    assert row["student_errors"] == 2
    broken = [s for s in samples(proxy) if s["status"] == "error"]
    assert len(broken) == 2 and all("HTTP 500" in s["error"] for s in broken)
    assert all(s["score"] is None for s in broken)  # a failure is never a score


def test_a_slow_student_is_dropped_not_waited_for(
    start_proxy: Callable[..., RunningProxy], servers: ServerThread
) -> None:
    """One student call in flight, one waiting; the rest are dropped and counted, and every
    client gets the teacher's answer while the student still holds the first."""
    student = served(FakeStudent(), servers)
    student.behaviour = "held"
    proxy = routed(start_proxy, student, concurrency=1, queue=1)
    try:
        for n in range(6):
            assert ask(proxy, n).status_code == 200
        assert samples(proxy) == []  # the student has answered nothing yet
    finally:
        student.release.set()
    wait_for(lambda: len(samples(proxy)) == 2, 10, "the two shadow calls kept")

    def dropped() -> int:
        return int(status(proxy.settings, proxy.reader)[0]["dropped"])

    wait_for(lambda: dropped() == 4, 10, "four dropped shadow calls counted")
    # What became of each pair reaches /metrics at the router's next refresh.
    wait_for(
        lambda: all(
            line in httpx.get(proxy.url + "/metrics").text
            for line in (
                'distillery_route_shadow_total{outcome="dropped",route="support"} 4.0',
                'distillery_route_shadow_total{outcome="graded",route="support"} 2.0',
            )
        ),
        10,
        "four dropped and two graded on /metrics",
    )


def test_two_tenants_routes_do_not_leak_into_each_other(
    start_proxy: Callable[..., RunningProxy], servers: ServerThread
) -> None:
    student = served(FakeStudent(), servers)
    common = {"student": "tiny@student", "graders": ["exact"], "bar": 0.9}
    proxy = routed(
        start_proxy,
        student,
        routes={
            "alice": {"match": {"app": "support", "tenants": [key_fingerprint(ALICE)]}, **common},
            "bob": {"match": {"app": "support", "tenants": [key_fingerprint(BOB)]}, **common},
        },
    )
    assert ask(proxy, 1, key=ALICE).headers["X-Distillery-Route"] == "alice"
    assert ask(proxy, 2, key=BOB).headers["X-Distillery-Route"] == "bob"
    assert ask(proxy, 3, key=BOB).headers["X-Distillery-Route"] == "bob"
    wait_for(lambda: len(samples(proxy, "bob")) == 2, 10, "bob's pairs")
    wait_for(lambda: len(samples(proxy, "alice")) == 1, 10, "alice's pair")
    assert {s["tenant"] for s in samples(proxy, "alice")} == {key_fingerprint(ALICE)}
    assert {s["tenant"] for s in samples(proxy, "bob")} == {key_fingerprint(BOB)}


def test_the_students_answer_is_stored_redacted(
    start_proxy: Callable[..., RunningProxy], servers: ServerThread
) -> None:
    student = served(FakeStudent(), servers)
    student.behaviour = "chatty"
    proxy = routed(start_proxy, student)
    ask(proxy, 1)
    wait_for(lambda: len(samples(proxy)) == 1, 10, "the pair")
    [sample] = samples(proxy)
    content = sample["response"]["choices"][0]["message"]["content"]
    assert content == "Write to [REDACTED:email]"
    with proxy.reader.engine.connect() as conn:
        raw = conn.execute(sa.text("SELECT response FROM route_samples")).scalar_one()
    assert "carol@example.com" not in str(raw)


def test_routes_status_on_the_command_line(
    start_proxy: Callable[..., RunningProxy], servers: ServerThread, tmp_path: Any
) -> None:
    student = served(FakeStudent(), servers)
    proxy = routed(start_proxy, student)
    ask(proxy, 1)
    wait_for(lambda: len(samples(proxy)) == 1, 10, "the pair")
    config = config_file(tmp_path, student, "min_samples = 3")
    url = proxy.settings.storage.resolved_database_url()
    result = CliRunner().invoke(
        cli, ["routes", "status", "-c", str(config), "--database-url", url, "--json"]
    )
    assert result.exit_code == 0, result.output
    [row] = json.loads(result.output)
    assert row["route"] == "support" and row["samples"] == 1 and row["verdict"] == "needs 2 more"
    table = CliRunner().invoke(cli, ["routes", "status", "-c", str(config), "--database-url", url])
    assert "support" in table.output and "needs 2 more" in table.output
    none = tmp_path / "empty.toml"
    none.write_text("")
    empty = CliRunner().invoke(cli, ["routes", "status", "-c", str(none), "--database-url", url])
    assert empty.exit_code == 1 and "No routes in the config" in empty.output
    assert load_settings(config).routes["support"].mode == "shadow"


def test_a_route_must_name_a_configured_endpoint() -> None:
    from pydantic import ValidationError

    from distillery.core.config import Settings

    route = {"match": {"app": "x"}, "graders": ["exact"], "bar": 1}
    for student, message in (
        ("tiny", "must be MODEL@ENDPOINT"),
        ("tiny@nowhere", "no endpoint 'nowhere'"),
    ):
        try:
            Settings.model_validate({"routes": {"r": {**route, "student": student}}})
        except ValidationError as exc:
            assert message in str(exc)
        else:
            raise AssertionError(f"{student} was accepted")


@pytest.mark.slow
def test_the_proxy_command_grades_its_routes_in_every_worker(
    servers: ServerThread, upstream: FakeOpenAI, tmp_path: Path
) -> None:
    """`distillery proxy --workers 2` with a route: each worker calls the student and
    grades its pairs (the judge is installed in the spawned workers too)."""
    config = config_file(tmp_path, served(FakeStudent(), servers))
    database_url = f"sqlite:///{tmp_path / 'routes.db'}"
    proxy, url = two_workers(upstream, tmp_path, database_url, config)
    for n in range(6):
        answer = httpx.post(
            url,
            json={"model": "fake-model", "messages": [{"role": "user", "content": f"q {n}"}]},
            headers={"Authorization": f"Bearer {ALICE}", "X-Distillery-Tag-app": "support"},
            timeout=10,
        )
        assert answer.headers["X-Distillery-Route"] == "support"
    store = open_store(database_url)
    try:
        wait_for(lambda: len(route_store.recent(store, "support", 100)) == 6, 20, "six pairs")
        assert {s["score"] for s in route_store.recent(store, "support", 100)} == {1.0}
    finally:
        store.close()
    proxy.signal(signal.SIGTERM)
    assert proxy.wait() == 0


def mode(proxy: RunningProxy, route: str = "support") -> str:
    state = route_store.states(proxy.reader).get(route)
    return str(state["mode"]) if state else proxy.settings.routes[route].mode


def drive(proxy: RunningProxy, until: Callable[[], bool], what: str, limit: int = 400) -> int:
    """Send calls until ``until()`` holds; returns how many it took."""
    for n in range(limit):
        assert ask(proxy, 1000 + n).status_code == 200
        if until():
            return n + 1
    raise AssertionError(f"{what}: not after {limit} calls")


def test_a_good_student_is_promoted_on_evidence_and_a_bad_one_never_is(
    start_proxy: Callable[..., RunningProxy], servers: ServerThread
) -> None:
    good = served(FakeStudent(), servers)
    bad = served(FakeStudent(), servers)
    bad.behaviour = "bad"
    common = {"graders": ["exact"], "bar": 0.9, "min_samples": 4, "auto": True, "canary": 0.5}
    proxy = start_proxy(
        {
            "endpoints": {
                "good": {"base_url": good.url + "/v1"},
                "bad": {"base_url": bad.url + "/v1"},
            },
            "routes": {
                "support": {"match": {"app": "support"}, "student": "tiny@good", **common},
                "billing": {"match": {"app": "billing"}, "student": "tiny@bad", **common},
            },
        },
        extensions=[install],
    )
    drive(proxy, lambda: mode(proxy) == "canary", "promoted to canary")
    [state] = [s for n, s in route_store.states(proxy.reader).items() if n == "support"]
    assert state["reason"].startswith("automatic: score 1.000 [1.000, 1.000] over")
    # In canary some calls are the student's (said in the headers), the rest in its shadow.
    served_by: set[str] = set()

    def student_served() -> bool:
        served_by.add(ask(proxy, 5000 + len(served_by)).headers["X-Distillery-Served-By"])
        return "student" in served_by

    drive(proxy, student_served, "a call the student answered")
    drive(proxy, lambda: mode(proxy) == "on", "promoted to on")
    for n in range(12):
        assert ask(proxy, n, app="billing").status_code == 200
    wait_for(lambda: len(samples(proxy, "billing")) == 12, 10, "the bad student's pairs")
    assert mode(proxy, "billing") == "shadow"
    [billing] = [row for row in status(proxy.settings, proxy.reader) if row["route"] == "billing"]
    assert billing["verdict"] == "below the bar" and billing["score"] == 0.0
    # By hand, too: refused without the evidence, and saying why.
    url = proxy.settings.storage.resolved_database_url()
    config = config_file(Path(proxy.settings.storage.resolved_data_dir()), bad, "min_samples = 4")
    config.write_text(
        config.read_text()
        .replace("[routes.support]", "[routes.billing]")
        .replace('app = "support"', 'app = "billing"')
    )
    refused = CliRunner().invoke(
        cli, ["routes", "promote", "billing", "-c", str(config), "--database-url", url]
    )
    assert refused.exit_code == 1 and "stays in shadow: below the bar" in refused.output


def test_a_student_that_starts_failing_after_promotion_is_demoted(
    start_proxy: Callable[..., RunningProxy], servers: ServerThread
) -> None:
    student = served(FakeStudent(), servers)
    proxy = routed(
        start_proxy, student, auto=True, min_samples=3, window=6, canary=0.5, holdout=0.5
    )
    drive(proxy, lambda: mode(proxy) == "on", "promoted to on")
    student.behaviour = "bad"
    drive(proxy, lambda: mode(proxy) == "shadow", "demoted")
    state = route_store.states(proxy.reader)["support"]
    assert "below the bar" in state["reason"] and state["reason"].startswith("automatic")
    # Back in shadow, every call is the teacher's again (once the proxy has read the mode).
    wait_for(
        lambda: (
            ask(proxy, 1).headers["X-Distillery-Served-By"] == "teacher"
            and all(ask(proxy, n).headers["X-Distillery-Served-By"] == "teacher" for n in range(5))
        ),
        10,
        "the teacher answering",
    )


def test_a_failing_student_falls_back_to_the_teacher_streaming_or_not(
    start_proxy: Callable[..., RunningProxy],
    servers: ServerThread,
    upstream: FakeOpenAI,
    sdk: Callable[..., Any],
) -> None:
    """In `on` with no holdout every call goes to the student first; when it errors, times
    out before its first byte or answers what the validator refuses, the client gets the
    teacher's answer with a 200, and never sees the student's failure."""
    student = served(FakeStudent(), servers)
    proxy = routed(start_proxy, student, mode="on", holdout=0, timeout=0.5)
    client = sdk(proxy.base_url, ALICE, default_headers={"X-Distillery-Tag-app": "support"})
    messages = [{"role": "user", "content": "question 1"}]
    direct = httpx.post(
        upstream.url + "/v1/chat/completions", json={"model": "fake-model", "messages": messages}
    )
    for behaviour in ("broken", "held"):
        student.behaviour = behaviour
        answer = ask(proxy, 1)
        assert answer.status_code == 200 and answer.content == direct.content
        assert answer.headers["X-Distillery-Served-By"] == "teacher"
        stream = client.chat.completions.create(model="fake-model", messages=messages, stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == TEACHER_TEXT
    student.release.set()
    # JSON asked for, prose answered: the validator refuses it; JSON answered: it serves.
    student.behaviour = "good"
    fmt = {"response_format": {"type": "json_object"}}
    refused = client.chat.completions.with_raw_response.create(
        model="fake-model", messages=messages, **fmt
    )
    assert refused.headers["X-Distillery-Served-By"] == "teacher"
    student.behaviour = "json"
    accepted = client.chat.completions.with_raw_response.create(
        model="fake-model", messages=messages, **fmt
    )
    assert accepted.headers["X-Distillery-Served-By"] == "student"
    assert accepted.parse().choices[0].message.content == '{"ok": true}'
    # Streamed too: the student's usage chunk ("choices": []) is OpenAI's, not a fault.
    streamed = client.chat.completions.with_raw_response.create(
        model="fake-model", messages=messages, stream=True, **fmt
    )
    assert streamed.headers["X-Distillery-Served-By"] == "student"
    text = "".join(c.choices[0].delta.content or "" for c in streamed.parse() if c.choices)
    assert text == '{"ok": true}'
    metrics = httpx.get(proxy.url + "/metrics").text
    for reason, count in (("http_500", 2), ("timeout", 2), ("invalid_json", 1)):
        line = f'distillery_route_fallbacks_total{{reason="{reason}",route="support"}} {count}.0'
        assert line in metrics, reason
    # ... and in the routes' status, summed over every proxy on the database.
    wait_for(lambda: status(proxy.settings, proxy.reader)[0]["fallbacks"] == 5, 10, "5 fallbacks")


def test_what_the_student_answered_is_said_and_stays_out_of_datasets(
    start_proxy: Callable[..., RunningProxy],
    servers: ServerThread,
    sdk: Callable[..., Any],
    tmp_path: Path,
) -> None:
    student = served(FakeStudent(), servers)
    proxy = routed(start_proxy, student, mode="on", holdout=0)
    answer = ask(proxy, 1)
    assert answer.headers["X-Distillery-Served-By"] == "student"
    assert answer.json()["model"] == "tiny"
    client = sdk(proxy.base_url, ALICE, default_headers={"X-Distillery-Tag-app": "support"})
    stream = client.chat.completions.with_raw_response.create(
        model="fake-model", messages=[{"role": "user", "content": "question 2"}], stream=True
    )
    assert stream.headers["X-Distillery-Served-By"] == "student"
    text = "".join(c.choices[0].delta.content or "" for c in stream.parse() if c.choices)
    assert text == TEACHER_TEXT  # the good student says what the teacher says
    teacher = ask(proxy, 3, app="billing")  # no route: the teacher's
    rows = proxy.wait_stored(3)
    by_student = [r for r in rows if proxy.tags(r["id"]).get("distillery_served_by") == "student"]
    assert len(by_student) == 2
    assert {r["model_served"] for r in by_student} == {"tiny"}
    assert {r["upstream"] for r in by_student} == {student.url + "/v1"}
    assert teacher.status_code == 200
    url = proxy.settings.storage.resolved_database_url()

    def build(*extra: str) -> int:
        result = CliRunner().invoke(
            cli,
            [
                "dataset",
                "build",
                f"d{len(extra)}",
                "--val-fraction",
                "0",
                "--json",
                "--database-url",
                url,
                *extra,
            ],
        )
        assert result.exit_code == 0, result.output
        return int(json.loads(result.output)["counts"]["considered"])

    assert build() == 1  # the teacher's call alone
    assert build("--include-student-answers") == 3


def test_the_students_answer_reaches_a_client_in_the_encoding_it_asked_for(
    start_proxy: Callable[..., RunningProxy], servers: ServerThread
) -> None:
    """The student, like OpenAI, gzips an answer when asked: the proxy asks it for none,
    as it asks the teacher, so a client that takes no gzip gets plain JSON."""
    student = served(FakeStudent(), servers)
    proxy = routed(start_proxy, student, mode="on", holdout=0)
    answer = httpx.post(
        proxy.base_url + "/chat/completions",
        json={"model": "fake-model", "messages": [{"role": "user", "content": "question"}]},
        headers={
            "Authorization": f"Bearer {ALICE}",
            "X-Distillery-Tag-app": "support",
            "Accept-Encoding": "identity",
        },
        timeout=10,
    )
    assert answer.headers["X-Distillery-Served-By"] == "student"
    assert "Content-Encoding" not in answer.headers
    assert json.loads(answer.content)["choices"][0]["message"]["content"] == TEACHER_TEXT
    [row] = proxy.wait_stored(1)
    assert row["model_served"] == "tiny"


def test_a_student_down_for_long_leaves_every_call_to_the_teacher_until_it_is_back(
    start_proxy: Callable[..., RunningProxy], servers: ServerThread
) -> None:
    """Past `down_after` seconds of failures the proxy stops trying the student in front of
    the teacher (no fallback each time); the shadow keeps asking it, and the first answer
    puts it back to work."""
    student = served(FakeStudent(), servers)
    student.behaviour = "broken"
    proxy = routed(start_proxy, student, mode="on", holdout=0, down_after=0.2)

    def fallbacks() -> float:
        text = httpx.get(proxy.url + "/metrics").text
        line = 'distillery_route_fallbacks_total{reason="http_500",route="support"} '
        found = [row for row in text.splitlines() if row.startswith(line)]
        return float(found[0].rsplit(" ", 1)[1]) if found else 0.0

    wait_for(
        lambda: ask(proxy, 1).status_code == 200 and fallbacks() >= 2 and _down(proxy),
        10,
        "the route to give up on its student",
    )
    before = fallbacks()
    for n in range(5):
        answer = ask(proxy, n)
        assert answer.headers["X-Distillery-Served-By"] == "teacher"
    assert fallbacks() == before  # not tried in front of the teacher any more
    student.behaviour = "good"  # back: the next shadow call finds out
    wait_for(
        lambda: ask(proxy, 7).headers["X-Distillery-Served-By"] == "student",
        10,
        "the student answering again",
    )


def _down(proxy: RunningProxy) -> bool:
    from distillery.proxy.state import PROXY

    return bool(proxy.app[PROXY].router.routes[0].down)


def test_a_reloaded_config_changes_routes_without_dropping_a_request(
    start_proxy: Callable[..., RunningProxy], servers: ServerThread, tmp_path: Path
) -> None:
    """What SIGHUP does: the config is read again; its routes take effect for new calls,
    calls in flight finish on the route they had, a config that does not load changes
    nothing."""
    from distillery.core.config import Settings
    from distillery.proxy.app import reload_routes

    student = served(FakeStudent(), servers)
    route = {"student": "tiny@student", "graders": ["exact"], "bar": 0.9}
    config: dict[str, Any] = {
        "endpoints": {"student": {"base_url": student.url + "/v1"}},
        "routes": {"support": {"match": {"app": "support"}, **route}},
    }
    current = {"config": config}

    def reload() -> Settings:
        return Settings.model_validate(current["config"])

    proxy = start_proxy(config, extensions=[install], reload=reload)
    errors: list[str] = []
    stop = threading.Event()

    def traffic() -> None:  # a client that keeps calling through the reloads
        n = 0
        while not stop.is_set():
            n += 1
            answer = ask(proxy, n, app="billing" if n % 2 else "support")
            if answer.status_code != 200:
                errors.append(answer.text)

    client = threading.Thread(target=traffic)
    client.start()
    try:
        assert ask(proxy, 1).headers["X-Distillery-Route"] == "support"
        assert "X-Distillery-Route" not in ask(proxy, 2, app="billing").headers
        current["config"] = {
            **config,
            "routes": {
                "billing": {"match": {"app": "billing"}, **route, "mode": "on", "holdout": 0}
            },
        }
        assert servers.call(reload_routes(proxy.app)) is True
        assert "X-Distillery-Route" not in ask(proxy, 3).headers
        moved = ask(proxy, 4, app="billing").headers
        assert moved["X-Distillery-Route"] == "billing"
        assert moved["X-Distillery-Served-By"] == "student"  # mode on, from the new config
        # An edit that does not load (a grader that does not exist): nothing changes.
        current["config"] = {
            **config,
            "routes": {"billing": {"match": {"app": "billing"}, **route, "graders": ["nope"]}},
        }
        assert servers.call(reload_routes(proxy.app)) is False
        assert ask(proxy, 5, app="billing").headers["X-Distillery-Route"] == "billing"
    finally:
        stop.set()
        client.join(30)
    assert errors == []
    wait_for(lambda: len(samples(proxy, "support")) >= 1, 10, "the first route's pairs")


def test_routes_reloaded_into_a_proxy_started_without_them_shadow_too(
    start_proxy: Callable[..., RunningProxy], servers: ServerThread
) -> None:
    """The judge starts with the first routes, here at a reload: their calls are routed
    and their pairs graded, with no restart."""
    from distillery.core.config import Settings
    from distillery.proxy.app import reload_routes

    student = served(FakeStudent(), servers)
    later = Settings.model_validate(
        {
            "endpoints": {"student": {"base_url": student.url + "/v1"}},
            "routes": {
                "support": {
                    "match": {"app": "support"},
                    "student": "tiny@student",
                    "graders": ["exact"],
                    "bar": 0.9,
                }
            },
        }
    )
    proxy = start_proxy({}, extensions=[install], reload=lambda: later)
    assert "X-Distillery-Route" not in ask(proxy, 1).headers
    assert servers.call(reload_routes(proxy.app)) is True
    assert ask(proxy, 2).headers["X-Distillery-Route"] == "support"
    wait_for(lambda: len(samples(proxy, "support")) == 1, 10, "the pair graded")
    assert [s["score"] for s in samples(proxy, "support")] == [1.0]
    assert len(student.requests) == 1


@pytest.mark.slow
def test_the_proxy_command_starts_its_judge_with_the_first_routes(
    servers: ServerThread, upstream: FakeOpenAI, tmp_path: Path
) -> None:
    """`distillery proxy` started without routes runs no judge; a SIGHUP that brings
    routes starts one, and their pairs are graded."""
    routed = config_file(tmp_path, served(FakeStudent(), servers))
    config = tmp_path / "empty.toml"
    config.write_text("")
    database_url = f"sqlite:///{tmp_path / 'later.db'}"
    proxy = proxy_command(upstream, tmp_path, database_url, config)
    reader = open_store(database_url)
    try:
        assert ask_support(proxy.base_url) is False
        assert "route judge started" not in proxy.log.read_text()
        config.write_text(routed.read_text())
        proxy.signal(signal.SIGHUP)
        wait_for(lambda: ask_support(proxy.base_url), 20, "the route")
        wait_for(lambda: len(route_store.recent(reader, "support", 10)) >= 1, 20, "a pair")
        assert running(judge_pid(proxy))
    finally:
        reader.close()
    proxy.signal(signal.SIGTERM)
    assert proxy.wait() == 0


@pytest.mark.slow
def test_sighup_reloads_the_routes_of_every_worker(
    servers: ServerThread, upstream: FakeOpenAI, tmp_path: Path
) -> None:
    config = config_file(tmp_path, served(FakeStudent(), servers))
    database_url = f"sqlite:///{tmp_path / 'reload.db'}"
    proxy, url = two_workers(upstream, tmp_path, database_url, config)

    def route_of(app: str) -> str | None:
        answer = httpx.post(
            url,
            json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {ALICE}", "X-Distillery-Tag-app": app},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        route: str | None = answer.headers.get("X-Distillery-Route")
        return route

    assert route_of("support") == "support"
    config.write_text(
        config.read_text()
        .replace('app = "support"', 'app = "billing"')
        .replace('graders = ["exact"]', 'graders = ["exact", "json"]')
    )
    proxy.signal(signal.SIGHUP)
    # Both workers (the kernel picks one per connection): 20 calls in a row see the change.
    wait_for(
        lambda: all(route_of("billing") == "support" for _ in range(20)),
        20,
        "every worker to route app=billing",
    )
    assert route_of("support") is None
    # The judges (a process beside each worker) were told too: pairs graded with both.
    reader = open_store(database_url)
    try:
        wait_for(
            lambda: any(
                set(s["scores"]) == {"exact", "json"}
                for s in route_store.recent(reader, "support", 100)
            ),
            20,
            "a pair graded with the reloaded graders",
        )
    finally:
        reader.close()
    proxy.signal(signal.SIGTERM)
    assert proxy.wait() == 0


@pytest.mark.slow
def test_a_judge_process_ends_with_its_proxy(
    servers: ServerThread, upstream: FakeOpenAI, tmp_path: Path
) -> None:
    """The route's judge, a process of its own, ends when its proxy stops, and when the
    proxy is killed outright (nothing left behind grading for a proxy that is gone)."""
    config = config_file(tmp_path, served(FakeStudent(), servers))

    def judge_ends_after(stop: signal.Signals, group: bool = False) -> None:
        database_url = f"sqlite:///{tmp_path / f'judge-{stop.name}-{group}.db'}"
        proxy = proxy_command(upstream, tmp_path, database_url, config)
        assert ask_support(proxy.base_url)
        reader = open_store(database_url)
        try:
            wait_for(lambda: len(route_store.recent(reader, "support", 10)) == 1, 20, "a pair")
        finally:
            reader.close()
        judge = judge_pid(proxy)
        assert proxy.process is not None
        if group:  # as systemd stops a unit: every process of it at once
            os.killpg(proxy.process.pid, stop)
        else:
            proxy.signal(stop)
        code = proxy.wait()
        assert stop == signal.SIGKILL or code == 0, proxy.log.read_text()
        wait_for(lambda: not running(judge), 20, f"the judge to end after {stop.name}")

    judge_ends_after(signal.SIGTERM)
    judge_ends_after(signal.SIGTERM, group=True)
    judge_ends_after(signal.SIGKILL)


@pytest.mark.slow
def test_a_judge_process_that_dies_is_started_again(
    servers: ServerThread, upstream: FakeOpenAI, tmp_path: Path
) -> None:
    config = config_file(tmp_path, served(FakeStudent(), servers))
    database_url = f"sqlite:///{tmp_path / 'judge.db'}"
    proxy = proxy_command(upstream, tmp_path, database_url, config)
    reader = open_store(database_url)

    def graded_after(n: int) -> None:
        """Ask until the route's pairs number ``n``: calls while no judge is up are
        dropped, as when the student is slow."""
        wait_for(
            lambda: (
                bool(ask_support(proxy.base_url))
                and len(route_store.recent(reader, "support", 100)) >= n
            ),
            30,
            f"{n} graded pairs",
        )

    try:
        graded_after(1)
        first = judge_pid(proxy)
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: judge_pid(proxy) != first, 20, "another judge")
        graded = len(route_store.recent(reader, "support", 100))
        graded_after(graded + 1)
    finally:
        reader.close()
    assert "route judge died; starting another" in proxy.log.read_text()
    proxy.signal(signal.SIGTERM)
    assert proxy.wait() == 0


def ask_support(base_url: str) -> bool:
    answer = httpx.post(
        base_url + "/chat/completions",
        json={"model": "fake-model", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {ALICE}", "X-Distillery-Tag-app": "support"},
        timeout=10,
    )
    return bool(answer.headers.get("X-Distillery-Route") == "support")


def judge_pid(proxy: ProxyProcess) -> int:
    """The pid of the newest route judge the proxy's log says it started."""
    pids = [
        int(json.loads(line)["pid"])
        for line in proxy.log.read_text().splitlines()
        if line.startswith("{") and json.loads(line).get("event") == "route judge started"
    ]
    assert pids, "no 'route judge started' line in the log"
    return pids[-1]


def running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody has reaped yet has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def test_a_reload_keeps_a_routes_queue_unless_its_student_or_sizes_change(
    tmp_path: Path,
) -> None:
    """The judge's lanes across reloads: a new timeout or bar keeps the queue (and the pairs
    waiting in it); a new concurrency, or a route that went, does not."""
    from distillery.core.config import Settings
    from distillery.curation.judging import Runtime

    def settings(billing: bool = True, **change: Any) -> Settings:
        route = {
            "match": {"app": "support"},
            "student": "tiny@student",
            "graders": ["exact"],
            "bar": 0.9,
        }
        routes = {"support": {**route, **change}, **({"billing": route} if billing else {})}
        return Settings.model_validate(
            {"endpoints": {"student": {"base_url": "http://127.0.0.1:9/v1"}}, "routes": routes}
        )

    store = open_store(f"sqlite:///{tmp_path / 'lanes.db'}")
    runtime = Runtime(settings(), store, lambda route, outcome: None)
    await runtime.start()
    try:
        first = runtime.lanes["support"].queue
        runtime.reconfigure(settings(timeout=3, bar=0.5))
        assert runtime.lanes["support"].queue is first
        assert runtime.lanes["support"].timeout == 3
        runtime.reconfigure(settings(timeout=3, concurrency=2))
        assert runtime.lanes["support"].queue is not first
        assert len(runtime.lanes["support"].workers) == 2
        billing = runtime.lanes["billing"].workers
        runtime.reconfigure(settings(billing=False, timeout=3, concurrency=2))
        assert "billing" not in runtime.lanes
        # The removed route's workers end, cancelled (waited on, not given a moment).
        done, pending = await asyncio.wait(billing, timeout=10)
        assert not pending and all(task.cancelled() for task in done)
    finally:
        await runtime.stop()
        store.close()
