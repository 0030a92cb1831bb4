"""Routes in real `distillery proxy` processes (slow): every worker grades, the judge
process starts with the first routes, follows SIGHUP, ends with its proxy and is started
again when it dies (every call accounted for); the kill switch reaches every worker, a new
student starts over, a flaky one stays in shadow, a conversation keeps its model.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from distillery.store import open_store
from distillery.store import routes as route_store

from fake_openai import FakeOpenAI
from fake_student import ALICE, FakeStudent, config_file, served
from helpers import ServerThread, wait_for
from proxy_process import ProxyProcess


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


def every_call(url: str, prefix: str, served_by: str, what: str) -> None:
    """Until 12 calls in a row (the kernel spreads them over the workers) are all answered
    by ``served_by``."""
    wait_for(
        lambda: all(
            call(url, f"{prefix} {n}").headers.get("X-Distillery-Served-By") == served_by
            for n in range(12)
        ),
        10,
        what,
    )


def two_workers(
    upstream: FakeOpenAI, tmp_path: Path, database_url: str, config: Path
) -> tuple[ProxyProcess, str]:
    """`distillery proxy --workers 2 --config CONFIG`, and its chat completions URL."""
    proxy = proxy_command(upstream, tmp_path, database_url, config, "--workers", "2")
    return proxy, proxy.base_url + "/chat/completions"


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
    """kill -9 of the judge: another starts, and every call the route covered is accounted
    for once the proxy stops -- a graded pair, or counted as dropped (queue full, no judge)
    or lost (handed to the judge that died, or still queued at the stop)."""
    config = config_file(tmp_path, served(FakeStudent(), servers))
    database_url = f"sqlite:///{tmp_path / 'judge.db'}"
    proxy = proxy_command(upstream, tmp_path, database_url, config)
    reader = open_store(database_url)
    calls = 0

    def graded_after(n: int) -> None:
        """Ask until the route's pairs number ``n``: calls while no judge is up are
        dropped, as when the student is slow."""

        def asked() -> bool:
            nonlocal calls
            answered = ask_support(proxy.base_url)
            calls += 1
            return bool(answered) and len(route_store.recent(reader, "support", 1000)) >= n

        wait_for(asked, 30, f"{n} graded pairs")

    try:
        graded_after(1)
        first = judge_pid(proxy)
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: judge_pid(proxy) != first, 20, "another judge")
        graded = len(route_store.recent(reader, "support", 1000))
        graded_after(graded + 1)
        assert "route judge died; starting another" in proxy.log.read_text()
        proxy.signal(signal.SIGTERM)
        assert proxy.wait() == 0
        pairs = len(route_store.recent(reader, "support", 1000))
        dropped = route_store.counts(reader).get(("support", "dropped"), 0)
    finally:
        reader.close()
    assert pairs + dropped == calls, (pairs, dropped, calls)


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


def call(url: str, content: str, **extra: str) -> httpx.Response:
    return httpx.post(
        url,
        json={"model": "fake-model", "messages": [{"role": "user", "content": content}]},
        headers={"Authorization": f"Bearer {ALICE}", "X-Distillery-Tag-app": "support", **extra},
        timeout=10,
    )


def routes_command(config: Path, database_url: str, *args: str) -> str:
    from click.testing import CliRunner

    from distillery.cli import cli

    result = CliRunner().invoke(
        cli, ["routes", *args, "-c", str(config), "--database-url", database_url]
    )
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_routes_set_off_reaches_every_worker_and_a_new_student_starts_over(
    servers: ServerThread, upstream: FakeOpenAI, tmp_path: Path
) -> None:
    """`distillery proxy --workers 2`: `routes set support on` puts every worker's calls on
    the student, `routes set support off` takes every worker off within the poll interval
    (2 s); a config naming another student, reloaded with SIGHUP, starts it in shadow with
    no evidence."""
    from distillery.proxy.routes import REFRESH_S

    student = served(FakeStudent(), servers)
    config = config_file(tmp_path, student, "min_samples = 3", "holdout = 0")
    database_url = f"sqlite:///{tmp_path / 'switch.db'}"
    proxy, url = two_workers(upstream, tmp_path, database_url, config)
    try:
        assert "shadow -> on" in routes_command(config, database_url, "set", "support", "on")
        every_call(url, "q", "student", "every worker serving the student")
        assert "on -> off" in routes_command(config, database_url, "set", "support", "off")
        switched = time.monotonic()
        wait_for(
            lambda: all("X-Distillery-Route" not in call(url, f"r {n}").headers for n in range(12)),
            10,
            "every worker off",
        )
        assert time.monotonic() - switched < 2 * REFRESH_S + 2
        # Another student in the config: it starts in shadow, with none of the old evidence.
        routes_command(config, database_url, "set", "support", "on")
        config.write_text(config.read_text().replace('"tiny@student"', '"other@student"'))
        proxy.signal(signal.SIGHUP)
        every_call(url, "s", "teacher", "the new student in shadow on every worker")
        [row] = json.loads(routes_command(config, database_url, "status", "--json"))
        assert row["student"] == "other@student" and row["mode"] == "shadow"
    finally:
        proxy.signal(signal.SIGTERM)
        assert proxy.wait() == 0


@pytest.mark.slow
def test_a_flaky_student_stays_in_shadow_and_a_conversation_keeps_its_model(
    servers: ServerThread, upstream: FakeOpenAI, tmp_path: Path, sdk: Any
) -> None:
    """A student failing every other call, with `auto`, is never promoted (its failures are
    evidence against it); in canary, a 40-turn conversation is answered by one model on
    every worker; a student's stream that drops mid-way reaches the client as OpenAI's
    error event."""
    import openai

    student = served(FakeStudent(), servers)
    student.behaviour = "flaky"
    config = config_file(tmp_path, student, "min_samples = 3", "auto = true")
    database_url = f"sqlite:///{tmp_path / 'flaky.db'}"
    proxy, url = two_workers(upstream, tmp_path, database_url, config)
    reader = open_store(database_url)
    try:
        for n in range(60):
            assert call(url, f"q {n}").status_code == 200
        wait_for(lambda: len(route_store.recent(reader, "support", 100)) >= 50, 20, "50 pairs")
        [row] = json.loads(routes_command(config, database_url, "status", "--json"))
        assert row["mode"] == "shadow" and row["verdict"] == "too many errors"
        # Canary, good student: one conversation, one model, whichever worker takes a turn.
        student.behaviour = "good"
        routes_command(config, database_url, "set", "support", "canary")
        config.write_text(config.read_text().replace("auto = true", "canary = 0.5"))
        proxy.signal(signal.SIGHUP)
        for conversation in range(2):
            messages = [{"role": "user", "content": f"conversation {conversation}"}]
            served_by = set()
            for n in range(40):
                answer = httpx.post(
                    url,
                    json={"model": "fake-model", "messages": messages},
                    headers={"Authorization": f"Bearer {ALICE}", "X-Distillery-Tag-app": "support"},
                    timeout=10,
                )
                served_by.add(answer.headers["X-Distillery-Served-By"])
                messages += [
                    {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": f"turn {n}"},
                ]
            assert len(served_by) == 1, served_by
        # On, and the student's stream drops after its first text.
        routes_command(config, database_url, "set", "support", "on")
        config.write_text(config.read_text() + "holdout = 0\n")
        proxy.signal(signal.SIGHUP)
        student.breaks = "drop"
        client = sdk(proxy.base_url, ALICE, default_headers={"X-Distillery-Tag-app": "support"})

        def dropped() -> bool:
            try:
                for _ in client.chat.completions.create(
                    model="fake-model", messages=[{"role": "user", "content": "x"}], stream=True
                ):
                    pass
            except openai.APIError as exc:
                return "stream_dropped" in str(exc)
            return False

        wait_for(dropped, 10, "the error event")
    finally:
        reader.close()
        proxy.signal(signal.SIGTERM)
        assert proxy.wait() == 0
