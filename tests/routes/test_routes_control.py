"""Taking a route in hand: the kill switch (`routes set`), a mode pinned in the config, a
new student starting over, and the config mistakes refused before they cost anything."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from distillery.cli import cli
from distillery.core.config import Settings, load_settings
from distillery.core.errors import ConfigError, DistilleryError
from distillery.curation import judging, online, route_policy
from distillery.curation.judge import install_in_thread
from distillery.store import routes as route_store

from fake_student import ALICE, FakeStudent, ask, config_file, route_config, routed, samples, served
from helpers import RunningProxy, ServerThread, wait_for


def routes_cli(proxy: RunningProxy, config: Path, *args: str) -> Any:
    url = proxy.settings.storage.resolved_database_url()
    return CliRunner().invoke(cli, ["routes", *args, "-c", str(config), "--database-url", url])


def status_row(proxy: RunningProxy, config: Path) -> dict[str, Any]:
    """`routes status --json`'s one row (the judge's thread may log beside it)."""
    lines = routes_cli(proxy, config, "status", "--json").output.splitlines()
    start = lines.index("[")
    [row] = json.loads("\n".join(lines[start : lines.index("]", start) + 1]))
    return dict(row)


def served_by(proxy: RunningProxy, n: int) -> str:
    return str(ask(proxy, n).headers.get("X-Distillery-Served-By", "none"))


def test_routes_set_is_a_kill_switch_the_proxy_follows_within_seconds(
    start_proxy: Callable[..., RunningProxy], servers: ServerThread, tmp_path: Path
) -> None:
    student = served(FakeStudent(), servers)
    proxy = routed(start_proxy, student, min_samples=3)
    config = config_file(tmp_path, student, "min_samples = 3")
    # Any mode in one command, evidence or not: here straight to on...
    moved = routes_cli(proxy, config, "set", "support", "on", "--reason", "trying it")
    assert moved.exit_code == 0 and "Route support: shadow -> on." in moved.output
    wait_for(lambda: served_by(proxy, 1) == "student", 10, "the student answering")
    # ...and off, from on, at once: the teacher answers everything, nothing is shadowed.
    killed = routes_cli(proxy, config, "set", "support", "off", "--reason", "answers look off")
    assert killed.exit_code == 0 and "on -> off" in killed.output
    wait_for(lambda: served_by(proxy, 2) == "none", 10, "the route off")
    before = len(samples(proxy))
    assert all(served_by(proxy, n) == "none" for n in range(3, 8))
    assert len(samples(proxy)) == before
    row = status_row(proxy, config)
    assert row["mode"] == "off" and row["reason"] == "answers look off" and row["changed_at"]
    wrong = routes_cli(proxy, config, "set", "support", "sideways")
    assert wrong.exit_code == 2 and "'sideways' is not one of" in wrong.output


def test_a_pinned_mode_wins_over_the_database_and_commands_leave_it_alone(
    start_proxy: Callable[..., RunningProxy], servers: ServerThread, tmp_path: Path
) -> None:
    """`mode = "off"` with `pin = true` in the config, reloaded, takes the route off
    whatever the database says (unpinned, the database's mode would win); commands and the
    automatic policy leave a pinned route alone, and `routes status` says why."""
    from distillery.proxy.app import reload_routes

    student = served(FakeStudent(), servers)
    current = {"config": route_config(student, min_samples=3)}
    proxy = start_proxy(
        current["config"],
        extensions=[install_in_thread],
        reload=lambda: Settings.model_validate(current["config"]),
    )
    config = config_file(tmp_path, student, "min_samples = 3")
    assert routes_cli(proxy, config, "set", "support", "on").exit_code == 0
    wait_for(lambda: served_by(proxy, 1) == "student", 10, "the student answering")
    current["config"] = route_config(student, min_samples=3, mode="off", pin=True)
    assert servers.call(reload_routes(proxy.app)) is True
    assert served_by(proxy, 2) == "none"  # at once: the reload applies it
    wait_for(
        lambda: route_store.states(proxy.reader)["support"]["reason"] == "pinned in the config",
        10,
        "the pin written where `routes status` reads it",
    )
    pinned_config = config_file(tmp_path, student, 'mode = "off"', "pin = true")
    refused = routes_cli(proxy, pinned_config, "set", "support", "on")
    assert refused.exit_code == 1 and "pinned to off in the config" in refused.output
    with pytest.raises(DistilleryError, match="pinned to off in the config"):
        online.promote(load_settings(pinned_config), proxy.reader, "support", "by hand")
    row = status_row(proxy, pinned_config)
    assert row["mode"] == "off" and row["pinned"] is True


def test_a_new_student_starts_in_shadow_with_no_evidence(
    start_proxy: Callable[..., RunningProxy],
    servers: ServerThread,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """New files served under the same model name are a new student (the content hash its
    endpoint reports): the route goes back to shadow and counts its evidence anew."""
    monkeypatch.setattr(judging, "IDENTIFY_S", 0.0)  # asked at every pair, not every 30 s
    student = served(FakeStudent(), servers)
    student.files = "a" * 64
    proxy = routed(start_proxy, student, min_samples=3)
    config = config_file(tmp_path, student, "min_samples = 3")
    for n in range(3):
        ask(proxy, n)
    wait_for(lambda: len(samples(proxy)) == 3, 10, "three pairs")
    assert {s["student"] for s in samples(proxy)} == {"tiny@student#files:aaaaaaaaaaaaaaaa"}
    assert routes_cli(proxy, config, "set", "support", "on").exit_code == 0
    wait_for(lambda: served_by(proxy, 10) == "student", 10, "the student answering")
    student.files = "b" * 64
    wait_for(
        lambda: (
            served_by(proxy, 11) != "student"
            and route_store.states(proxy.reader)["support"]["mode"] == "shadow"
        ),
        20,
        "the new student in shadow",
    )
    state = route_store.states(proxy.reader)["support"]
    assert state["student"] == "tiny@student#files:bbbbbbbbbbbbbbbb"
    assert state["reason"].startswith("new student tiny@student#files:bbbb")
    row = status_row(proxy, config)
    assert row["student"] == state["student"] and row["mode"] == "shadow"
    assert row["samples"] <= 2  # the old student's pairs are not this one's evidence


@pytest.mark.parametrize(
    ("lines", "says"),
    [
        (["bar = 95"], "a bar is a score from 0 to 1 (bar = 0.95 for 95%)"),
        (["match = {}", "bar = 0.9"], "match is empty, which covers every call"),
        (["bar = 0.9", "auto = true", "holdout = 0"], "auto = true needs holdout >= 0.05"),
    ],
)
def test_config_mistakes_are_refused_saying_the_fix(
    lines: list[str], says: str, tmp_path: Path
) -> None:
    match = [] if any(line.startswith("match") for line in lines) else ["match = { app = 'a' }"]
    config = tmp_path / "distillery.toml"
    config.write_text(
        "[endpoints.student]\nbase_url = 'http://127.0.0.1:9/v1'\n[routes.support]\n"
        + "\n".join(["student = 'tiny@student'", "graders = ['exact']", *match, *lines])
        + "\n"
    )
    with pytest.raises(ConfigError) as refused:
        load_settings(config)
    assert says in str(refused.value)
    checked = CliRunner().invoke(cli, ["proxy", "--check-config", "-c", str(config)])
    assert checked.exit_code == 1 and says in checked.output
    config.write_text(config.read_text().replace("match = {}", "match = { all = true }"))
    if "match" in says:
        assert load_settings(config).routes["support"].match.all


def test_check_config_fails_on_a_grader_that_would_stop_the_proxy(tmp_path: Path) -> None:
    config = tmp_path / "distillery.toml"
    config.write_text(
        "[endpoints.student]\nbase_url = 'http://127.0.0.1:9/v1'\n"
        "[routes.support]\nmatch = { app = 'support' }\nstudent = 'tiny@student'\n"
        "graders = ['no_such_grader']\nbar = 0.9\n"
    )
    checked = CliRunner().invoke(cli, ["proxy", "--check-config", "-c", str(config)])
    assert checked.exit_code == 1 and "FAIL  routes:" in checked.output
    assert "no_such_grader" in checked.output


def test_one_conversation_is_served_by_one_model(
    start_proxy: Callable[..., RunningProxy], servers: ServerThread
) -> None:
    """In canary (half the calls the student's), each of 40 turns of a conversation is
    answered by the same model, decided by its first user message; different conversations
    are split between the two. With sticky = "user", OpenAI's `user` decides instead."""
    student = served(FakeStudent(), servers)
    proxy = routed(start_proxy, student, mode="canary", canary=0.5)

    def turn(messages: list[dict[str, str]], **extra: str) -> str:
        answer = httpx.post(
            proxy.base_url + "/chat/completions",
            json={"model": "fake-model", "messages": messages, **extra},
            headers={"Authorization": f"Bearer {ALICE}", "X-Distillery-Tag-app": "support"},
            timeout=10,
        )
        assert answer.status_code == 200
        return str(answer.headers["X-Distillery-Served-By"])

    firsts = {}
    for conversation in range(12):
        messages = [{"role": "user", "content": f"conversation {conversation} begins"}]
        served_by = set()
        for n in range(40 if conversation < 2 else 3):
            served_by.add(turn(messages))
            messages += [
                {"role": "assistant", "content": f"answer {n}"},
                {"role": "user", "content": f"turn {n}"},
            ]
        assert len(served_by) == 1, (conversation, served_by)
        firsts[conversation] = served_by.pop()
    assert set(firsts.values()) == {"student", "teacher"}  # split between conversations

    by_user = routed(start_proxy, student, mode="canary", canary=0.5, sticky="user")
    proxy = by_user
    for user in ("u-1", "u-2", "u-3", "u-4"):
        seen = {turn([{"role": "user", "content": f"question {n}"}], user=user) for n in range(6)}
        assert len(seen) == 1, (user, seen)


def test_each_slice_must_clear_the_bar_on_its_own(
    start_proxy: Callable[..., RunningProxy], servers: ServerThread, tmp_path: Path
) -> None:
    """With by = "tag:topic", a student right on 100 order questions and wrong on every one
    of 8 refund questions (7% of the traffic) clears the bar of 0.8 overall, but the route
    says which slice does not, and is not promoted."""
    student = served(FakeStudent(), servers)
    student.wrong_on = "refund"
    proxy = routed(start_proxy, student, bar=0.8, min_samples=3, by="tag:topic")

    def asked(n: int, topic: str) -> None:
        answer = httpx.post(
            proxy.base_url + "/chat/completions",
            json={"model": "fake-model", "messages": [{"role": "user", "content": f"{topic} {n}"}]},
            headers={
                "Authorization": f"Bearer {ALICE}",
                "X-Distillery-Tag-app": "support",
                "X-Distillery-Tag-topic": topic,
            },
            timeout=10,
        )
        assert answer.status_code == 200

    for n in range(108):
        asked(n, "refund" if n % 13 == 5 else "order")
    wait_for(lambda: len(samples(proxy)) == 108, 20, "108 pairs")
    proxy.wait_stored(108)  # the teacher's calls, whose tags name the slices
    [row] = online.status(proxy.settings, proxy.reader)
    overall = route_policy.bounds([0.0 if n % 13 == 5 else 1.0 for n in range(108)], 0.05)
    assert row["ci_low"] == overall.low and (overall.low or 0) >= 0.8  # overall: it would clear
    assert row["verdict"] == "below the bar in topic=refund"
    assert row["slices"]["order"]["verdict"] == "clears the bar"
    assert row["slices"]["refund"]["samples"] == 8 and row["slices"]["refund"]["score"] == 0.0
    config = config_file(tmp_path, student, "bar = 0.8", "min_samples = 3", 'by = "tag:topic"')
    config.write_text(config.read_text().replace("bar = 0.9\n", ""))
    refused = routes_cli(proxy, config, "promote", "support")
    assert refused.exit_code == 1 and "below the bar in topic=refund" in refused.output
