"""Routes in shadow, in this process (the judge in a thread): the client gets the teacher's
bytes, every pair is graded, slow and broken students are counted, tenants stay apart.

The teacher is the fake OpenAI upstream; the students are one small server whose
behaviour the test sets (fake_student.py): good, bad, broken (HTTP 500), held, chatty.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import sqlalchemy as sa
from click.testing import CliRunner

from distillery.cli import cli
from distillery.core.config import key_fingerprint, load_settings
from distillery.curation.online import status

from fake_openai import FakeOpenAI
from fake_student import ALICE, TEACHER_TEXT, FakeStudent, ask, config_file, routed, samples, served
from helpers import RunningProxy, ServerThread, wait_for

BOB = "sk-bob-key"


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
    for stat, value in (("samples", 5.0), ("score", 1.0), ("ci_low", 0.478), ("bar", 0.9)):
        assert f'distillery_route_standing{{route="support",stat="{stat}"}} {value}' in metrics
    # Five perfect answers are not yet evidence of 0.9: the anytime-valid lower bound is
    # 0.478 (a bootstrap said [1.000, 1.000]).
    assert (row["ci_low"], row["ci_high"], row["bar"]) == (0.478, 1.0, 0.9)
    assert row["verdict"] == "undecided"
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
    # The failures are evidence against the student (a score of 0 each), and too many.
    assert row["samples"] == 6 and row["score"] == 0.0 and row["ci_high"] < 0.9
    assert row["student_errors"] == 2 and row["verdict"] == "too many errors"
    assert (row["win"], row["tie"], row["loss"]) == (0, 0, 4)
    broken = [s for s in samples(proxy) if s["status"] == "error"]
    assert len(broken) == 2 and all("HTTP 500" in s["error"] for s in broken)
    assert all(s["score"] is None for s in broken)  # stored as failures, never as scores


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
