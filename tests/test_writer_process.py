"""The capture writer runs in a process of its own: killed, stopped or slow, it costs the
proxy nothing but a growing spool, and every answered call is stored exactly once."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from distillery.store import open_store

from corpus import Exchange, Replay, call, exchanges
from fake_openai import FakeOpenAI
from helpers import ask_numbered, stored_ids, wait_for
from proxy_process import ProxyProcess

pytestmark = pytest.mark.slow
CORPUS = exchanges()


def health(proxy: ProxyProcess) -> dict[str, Any]:
    capture: dict[str, Any] = httpx.get(proxy.base_url[:-3] + "/healthz").json()["capture"]
    return capture


def writer_pid(proxy: ProxyProcess) -> int:
    """The running writer's pid, once it has said it is running."""
    wait_for(lambda: health(proxy)["writer"] == "running", 30, "the writer running")
    pid = health(proxy)["writer_pid"]
    assert isinstance(pid, int) and pid != proxy.process.pid  # type: ignore[union-attr]
    return pid


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


@pytest.fixture
def proxy(upstream: FakeOpenAI, tmp_path: Path, unused_tcp_port: int) -> Iterator[ProxyProcess]:
    database_url = f"sqlite:///{tmp_path / 'writer.db'}"
    running = ProxyProcess(unused_tcp_port, upstream.url + "/v1", tmp_path / "data", database_url)
    yield running.start()
    if running.process is not None and running.process.poll() is None:
        running.signal(signal.SIGTERM)
        running.wait(60)


def kill_writer_mid_traffic(proxy: ProxyProcess, client: Any, calls: int) -> list[str]:
    """``calls`` calls with a kill -9 of the writer halfway; once another writer runs, the
    ids the client saw."""
    ids = [ask_numbered(client, i, stream=bool(i % 2)) for i in range(calls // 2)]
    first = writer_pid(proxy)
    os.kill(first, signal.SIGKILL)
    ids += [ask_numbered(client, i, stream=bool(i % 2)) for i in range(calls // 2, calls)]
    wait_for(lambda: health(proxy)["writer_pid"] not in (None, first), 30, "a new writer")
    return ids


def test_a_killed_writer_is_started_again_and_loses_nothing(
    proxy: ProxyProcess, sdk: Callable[..., Any]
) -> None:
    """kill -9 of the writer mid-traffic: calls go on being answered, another writer is
    started, and every call is stored once (a segment read twice is keyed by record id),
    and counted once."""
    ids = kill_writer_mid_traffic(proxy, sdk(proxy.base_url, api_key="sk-w"), 60)
    wait_for(lambda: len(stored_ids(proxy.database_url)) >= 60, 30, "60 stored")
    stored = stored_ids(proxy.database_url)
    assert sorted(stored) == sorted(ids)
    assert "capture writer died; starting another" in proxy.log.read_text()
    # The new writer read what the old one had stored again: counted once all the same.
    wait_for(lambda: health(proxy)["stored"] == 60, 30, "60 counted")
    proxy.signal(signal.SIGTERM)
    assert proxy.wait(60) == 0
    assert sorted(stored_ids(proxy.database_url)) == sorted(ids)
    assert not list((proxy.data_dir / "spool").glob("*.jsonl"))


def test_a_stalled_writer_only_grows_the_spool(
    proxy: ProxyProcess, sdk: Callable[..., Any]
) -> None:
    """A writer that does not move at all (SIGSTOP: slower than any database) holds up no
    call: they are answered while the spool grows, and stored once it moves again."""
    client = sdk(proxy.base_url, api_key="sk-w")
    ids = [ask_numbered(client, 0, stream=False)]
    wait_for(lambda: len(stored_ids(proxy.database_url)) == 1, 30, "the first stored")
    pid = writer_pid(proxy)
    os.kill(pid, signal.SIGSTOP)
    try:
        before = health(proxy)["spool_bytes"]
        ids += [ask_numbered(client, i, stream=bool(i % 2)) for i in range(1, 201)]
        grown = health(proxy)
        assert grown["spool_bytes"] > before
        assert len(stored_ids(proxy.database_url)) == 1  # nothing moved while it stood
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(lambda: len(stored_ids(proxy.database_url)) >= 201, 30, "201 stored")
    assert sorted(stored_ids(proxy.database_url)) == sorted(ids)
    wait_for(lambda: health(proxy)["spool_dirty_segments"] == 0, 30, "the spool caught up")


def test_workers_share_one_writer_that_outlives_them(
    upstream: FakeOpenAI, tmp_path: Path, unused_tcp_port: int, sdk: Callable[..., Any]
) -> None:
    """With --workers 2 the supervisor runs one writer for both; killed, it is started
    again; at the stop it stores what the workers spooled last, then exits."""
    database_url = f"sqlite:///{tmp_path / 'workers.db'}"
    proxy = ProxyProcess(
        unused_tcp_port, upstream.url + "/v1", tmp_path / "data", database_url, "--workers", "2"
    ).start()
    supervisor = proxy.process.pid  # type: ignore[union-attr]
    assert parent_of(writer_pid(proxy)) == supervisor  # not a worker's: theirs is the same one
    ids = kill_writer_mid_traffic(proxy, sdk(proxy.base_url, api_key="sk-w"), 40)
    assert parent_of(writer_pid(proxy)) == supervisor
    proxy.signal(signal.SIGTERM)
    assert proxy.wait(60) == 0
    assert sorted(stored_ids(database_url)) == sorted(ids)
    assert not list((tmp_path / "data" / "spool").glob("*.jsonl"))


def test_recorded_openai_traffic_is_stored_as_sent_through_the_writer_process(
    replay: Replay, tmp_path: Path, unused_tcp_port: int, sdk: Callable[..., Any]
) -> None:
    """Every recorded OpenAI exchange (tests/corpus) through a real proxy process, its
    writer killed halfway: each is stored once, with the status it had, its error (the
    upstream's body) exactly when the upstream sent one, and the id the client saw."""
    database_url = f"sqlite:///{tmp_path / 'corpus.db'}"
    proxy = ProxyProcess(
        unused_tcp_port, replay.url + "/v1", tmp_path / "data", database_url
    ).start()
    client = sdk(proxy.base_url)
    seen: list[tuple[Exchange, bytes]] = []
    for number, exchange in enumerate(CORPUS):
        if number == len(CORPUS) // 2:
            os.kill(writer_pid(proxy), signal.SIGKILL)
        replay.answer = exchange
        status, got = call(client, exchange.request)
        assert (status, got) == (exchange.status, exchange.body), exchange.name
        seen.append((exchange, got))
    proxy.signal(signal.SIGTERM)
    assert proxy.wait(60) == 0
    store = open_store(database_url)
    try:
        with store.engine.connect() as conn:
            rows = [
                dict(r._mapping)
                for r in conn.execute(sa.text("SELECT * FROM completions ORDER BY id"))
            ]
    finally:
        store.close()
    assert len(rows) == len(CORPUS)
    for row, (exchange, got) in zip(rows, seen, strict=True):
        assert (row["status"], row["stream"]) == (exchange.status, exchange.stream), exchange.name
        if exchange.status >= 400:
            assert json.loads(row["error"]) == json.loads(got), exchange.name
            assert row["response"] is None and row["completion_id"] is None, exchange.name
        else:
            assert row["error"] is None, (exchange.name, row["error"])
            sent_id = exchange.chunks()[0]["id"] if exchange.stream else json.loads(got)["id"]
            assert row["completion_id"] == sent_id, exchange.name
