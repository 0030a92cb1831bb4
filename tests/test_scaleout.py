"""Many proxy processes on one database: nothing lost, nothing stored twice."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
from pathlib import Path

import httpx
import openai
import pytest
import sqlalchemy as sa
from openai.types.chat import ChatCompletionMessageParam

from distillery.store import open_store

from fake_openai import FakeOpenAI
from helpers import wait_for
from proxy_process import ProxyProcess

# Real processes (proxy workers, trainers): seconds each, so out of the fast loop.
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stored(database_url: str) -> list[str]:
    store = open_store(database_url)
    try:
        with store.engine.connect() as conn:
            return [r[0] for r in conn.execute(sa.text("SELECT completion_id FROM completions"))]
    finally:
        store.close()


async def drive(urls: list[str], start: int, count: int, answered: list[str]) -> None:
    """``count`` calls spread over the proxies, every other one streamed."""
    clients = [openai.AsyncOpenAI(base_url=url, api_key="sk-load", max_retries=0) for url in urls]

    async def one(i: int) -> None:
        client = clients[i % len(clients)]
        messages: list[ChatCompletionMessageParam] = [
            {"role": "user", "content": f"scale-out call {i}"}
        ]
        try:
            if i % 2:
                stream = await client.chat.completions.create(
                    model="fake-slow", messages=messages, stream=True
                )
                chunks = [chunk async for chunk in stream]
                answered.append(chunks[0].id)
            else:
                answered.append(
                    (await client.chat.completions.create(model="fake-slow", messages=messages)).id
                )
        except (openai.APIConnectionError, httpx.HTTPError):
            pass  # refused or cut while that proxy stopped: never answered

    try:
        await asyncio.gather(*(one(i) for i in range(start, start + count)))
    finally:
        for client in clients:
            await client.close()


def test_two_proxies_on_one_postgres_sigterm_and_restart(
    upstream: FakeOpenAI, tmp_path: Path, postgres_url: str
) -> None:
    upstream.slow_seconds = 0.3
    data = tmp_path / "data"  # shared on purpose: each process owns its own spool segments
    ports = [free_port(), free_port()]
    first, second = (
        ProxyProcess(port, upstream.url + "/v1", data, postgres_url).start() for port in ports
    )
    answered: list[str] = []

    async def scenario() -> None:
        load = asyncio.create_task(drive([first.base_url, second.base_url], 0, 80, answered))
        # Mid-load: once the upstream has seen calls through both proxies, some of
        # the first one's are in flight (fake-slow takes 0.3 s) and must still finish.
        await asyncio.to_thread(
            wait_for, lambda: len(upstream.requests) >= 20, 20, "calls in flight"
        )
        first.signal(signal.SIGTERM)
        await load
        await asyncio.to_thread(first.wait)
        first.start()  # the same port again
        await drive([first.base_url, second.base_url], 80, 40, answered)

    asyncio.run(scenario())
    for proxy in (first, second):
        proxy.signal(signal.SIGTERM)
        assert proxy.wait() == 0
    rows = stored(postgres_url)
    assert len(answered) >= 80
    assert len(rows) == len(set(rows)), "a call was stored twice"
    assert set(answered) <= set(rows), "a call that reached its client was lost"


def test_workers_share_one_port(upstream: FakeOpenAI, tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'workers.db'}"
    proxy = ProxyProcess(
        free_port(), upstream.url + "/v1", tmp_path / "data", database_url, "--workers", "2"
    ).start()
    pids = {httpx.get(f"http://127.0.0.1:{proxy.port}/healthz").json()["pid"] for _ in range(30)}
    answered: list[str] = []
    asyncio.run(drive([proxy.base_url], 0, 30, answered))
    proxy.signal(signal.SIGTERM)
    assert proxy.wait() == 0
    assert len(pids) == 2
    assert sorted(stored(database_url)) == sorted(answered) and len(answered) == 30


def worker_pids(proxy: ProxyProcess) -> list[int]:
    """The pids the supervisor logged when it started its workers."""
    for line in proxy.log.read_text().splitlines():
        if line.startswith("{") and json.loads(line).get("event") == "workers started":
            return list(json.loads(line)["pids"])
    raise AssertionError("no 'workers started' line in the log")


def group_gone(proxy: ProxyProcess) -> bool:
    """Whether every process of the proxy's group (its session) has ended."""
    assert proxy.process is not None
    try:
        os.killpg(proxy.process.pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_stop_while_a_worker_is_started_again_stops_that_worker_too(
    upstream: FakeOpenAI, tmp_path: Path
) -> None:
    """CI once caught the supervisor starting a worker again after it had been told to
    stop, then waiting forever for it."""
    database_url = f"sqlite:///{tmp_path / 'restart.db'}"
    proxy = ProxyProcess(
        free_port(), upstream.url + "/v1", tmp_path / "data", database_url, "--workers", "2"
    ).start()
    os.kill(worker_pids(proxy)[0], signal.SIGKILL)
    wait_for(
        lambda: "worker died; starting another" in proxy.log.read_text(),
        20,
        "the supervisor to see its worker die",
    )
    proxy.signal(signal.SIGTERM)  # while the supervisor waits to start the next one
    assert proxy.wait() == 0
    wait_for(lambda: group_gone(proxy), 10, "every worker to end with the supervisor")


def test_ctrl_c_stops_the_workers_gracefully(upstream: FakeOpenAI, tmp_path: Path) -> None:
    """Ctrl-C reaches every process of the group, and the supervisor then stops every
    worker (with SIGTERM): that second signal must not cut short a call in flight or the
    capture's flush.  (CI once sent the SIGINT while the second worker was still starting:
    it swallowed the KeyboardInterrupt and served on; the SIGTERM ends it.)"""
    upstream.slow_seconds = 1.5
    database_url = f"sqlite:///{tmp_path / 'interrupt.db'}"
    proxy = ProxyProcess(
        free_port(), upstream.url + "/v1", tmp_path / "data", database_url, "--workers", "2"
    ).start()
    answers: list[str] = []

    def call() -> None:
        answer = httpx.post(
            proxy.base_url + "/chat/completions",
            json={"model": "fake-slow", "messages": [{"role": "user", "content": "in flight"}]},
            timeout=30,
        )
        answers.append(answer.json()["id"])

    client = threading.Thread(target=call)
    client.start()
    try:
        wait_for(lambda: len(upstream.requests) == 1, 20, "the call to reach the upstream")
        assert proxy.process is not None
        os.killpg(proxy.process.pid, signal.SIGINT)
    finally:
        client.join(30)
    assert proxy.wait() == 0
    assert len(answers) == 1
    assert stored(database_url) == answers
    assert "already stopping" in proxy.log.read_text()


def sample(text: str, name: str) -> float:
    """The value of one sample line (``name`` with its labels) in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_are_the_sum_over_workers(upstream: FakeOpenAI, tmp_path: Path) -> None:
    """Every scrape lands on one worker; each must report all workers' counts, not its own."""
    database_url = f"sqlite:///{tmp_path / 'metrics.db'}"
    proxy = ProxyProcess(
        free_port(), upstream.url + "/v1", tmp_path / "data", database_url, "--workers", "2"
    ).start()
    answered: list[str] = []
    asyncio.run(drive([proxy.base_url], 0, 40, answered))
    assert len(answered) == 40
    metrics = f"http://127.0.0.1:{proxy.port}/metrics"
    wait_for(
        lambda: sample(httpx.get(metrics).text, "distillery_capture_stored_total") == 40,
        what="40 stored, as every worker's /metrics sees it",
    )
    pids, totals = set(), set()
    for _ in range(20):
        pids.add(httpx.get(f"http://127.0.0.1:{proxy.port}/healthz").json()["pid"])
        text = httpx.get(metrics).text
        totals.add(sample(text, 'distillery_requests_total{route="chat",status="200"}'))
        assert sample(text, "distillery_capture_stored_total") == 40
    assert len(pids) == 2 and totals == {40.0}
    tokens = sample(
        text, 'distillery_tokens_total{app="none",kind="completion",model="fake-slow-2024-08-06"}'
    )
    assert tokens == 40 * 12  # the fake upstream reports 12 completion tokens a call
    proxy.signal(signal.SIGTERM)
    assert proxy.wait() == 0
