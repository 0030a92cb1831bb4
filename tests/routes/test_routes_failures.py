"""A student that fails after its first byte, in this process: a stream that drops, breaks
its SSE or stalls ends with the error event OpenAI sends mid-stream (the openai SDK raises
it), is counted as the student's failure and toward `down_after`; a 200 with no answer
falls back to the teacher."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from distillery.proxy.state import PROXY

from fake_student import ALICE, TEACHER_TEXT, FakeStudent, ask, routed, served
from helpers import RunningProxy, ServerThread, wait_for


def fallbacks(proxy: RunningProxy, reason: str) -> float:
    metrics = httpx.get(proxy.url + "/metrics").text
    found = re.search(
        rf'distillery_route_fallbacks_total{{reason="{reason}",route="support"}} ([0-9.]+)',
        metrics,
    ) or re.search(
        rf'distillery_route_fallbacks_total{{route="support",reason="{reason}"}} ([0-9.]+)',
        metrics,
    )
    return float(found.group(1)) if found else 0.0


@pytest.mark.parametrize(
    ("breaks", "reason"),
    [
        ("drop", "stream_dropped"),
        ("truncate", "stream_dropped"),
        ("garbage", "stream_malformed"),
        ("stall", "stream_timeout"),
    ],
)
def test_a_student_stream_that_fails_midway_ends_with_openais_error_event(
    start_proxy: Callable[..., RunningProxy],
    servers: ServerThread,
    sdk: Callable[..., Any],
    breaks: str,
    reason: str,
) -> None:
    student = served(FakeStudent(), servers)
    student.breaks = breaks
    proxy = routed(
        start_proxy, student, mode="on", holdout=0, timeout=0.5, total_timeout=5, down_after=60
    )
    client = sdk(proxy.base_url, ALICE, default_headers={"X-Distillery-Tag-app": "support"})
    messages = [{"role": "user", "content": "question 1"}]
    received: list[str] = []
    try:
        with pytest.raises(openai.APIError, match=rf"failed \({reason}\)"):
            for chunk in client.chat.completions.create(
                model="fake-model", messages=messages, stream=True
            ):
                received.extend(c.delta.content or "" for c in chunk.choices)
    finally:
        student.release.set()
    # What came before the failure reached the client, and nothing of the garbage.
    assert "".join(received) == TEACHER_TEXT[: len(TEACHER_TEXT) // 2]
    assert fallbacks(proxy, reason) == 1.0
    [route] = proxy.app[PROXY].router.routes
    assert route.failing_since is not None  # counted toward down_after
    # The stored call says it failed, never a whole answer.
    [stored] = proxy.wait_stored(1)
    assert stored["error"] is not None
    assert proxy.tags(stored["id"])["distillery_served_by"] == "student"


def test_a_student_200_without_an_answer_falls_back_to_the_teacher(
    start_proxy: Callable[..., RunningProxy], servers: ServerThread
) -> None:
    student = served(FakeStudent(), servers)
    student.behaviour = "empty"
    proxy = routed(start_proxy, student, mode="on", holdout=0)
    answer = ask(proxy, 1)
    assert answer.status_code == 200 and answer.headers["X-Distillery-Served-By"] == "teacher"
    assert answer.json()["choices"][0]["message"]["content"] == TEACHER_TEXT
    wait_for(lambda: fallbacks(proxy, "no_answer") == 1.0, 5, "the fallback counted")


def test_pairs_a_stopping_judge_never_graded_are_counted_as_lost(
    start_proxy: Callable[..., RunningProxy], servers: ServerThread
) -> None:
    """Five pairs handed to the judge, one in flight to a student that does not answer and
    four queued: the proxy stops; none was graded, and all five are counted (the route's
    dropped counter, /metrics' outcome="lost") instead of vanishing."""
    from distillery.store import routes as route_store

    student = served(FakeStudent(), servers)
    student.behaviour = "held"
    proxy = routed(start_proxy, student, concurrency=1, queue=10)
    try:
        for n in range(5):
            assert ask(proxy, n).status_code == 200  # the teacher answers at once
        wait_for(lambda: len(student.requests) == 1, 10, "the pair in flight")
        proxy.wait_stored(5)
        proxy.stop()  # the judge stops: the held pair and the queued ones are never graded
    finally:
        student.release.set()
    assert route_store.recent(proxy.reader, "support", 10) == []
    assert route_store.counts(proxy.reader)[("support", "dropped")] == 5
