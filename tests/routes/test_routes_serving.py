"""Routes that serve: promotion on evidence, demotion, fallback to the teacher, and what
the student answered kept out of datasets (in this process, the judge in a thread).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from click.testing import CliRunner

from distillery.cli import cli
from distillery.curation.judge import install_in_thread as install
from distillery.curation.online import status
from distillery.store import routes as route_store

from fake_openai import FakeOpenAI
from fake_student import ALICE, TEACHER_TEXT, FakeStudent, ask, config_file, routed, samples, served
from helpers import RunningProxy, ServerThread, wait_for


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
    # Promoted once the anytime-valid lower bound reached the bar: a perfect student needs
    # 38 pairs for a bar of 0.9 (a bootstrap said [1.000, 1.000] after 4).
    found = re.match(
        r"automatic: score 1\.000 \[(0\.\d+), 1\.000\] over (\d+) pairs", state["reason"]
    )
    assert found is not None, state["reason"]
    assert float(found.group(1)) >= 0.9 and int(found.group(2)) >= 38
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
        .replace("[endpoints.student]", "[endpoints.bad]")
        .replace('student = "tiny@student"', 'student = "tiny@bad"')
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
