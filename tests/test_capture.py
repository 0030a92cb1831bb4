"""No captured call is ever lost or stored twice: spool, replay, crashes, shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
import sqlalchemy as sa
from openai.types.chat import ChatCompletionMessageParam

from distillery.core.config import CaptureSettings
from distillery.core.redact import Redactor
from distillery.proxy.capture import Capture
from distillery.proxy.spool import new_record_id, read_segment
from distillery.store import open_store

from fake_openai import FakeOpenAI
from helpers import RunningProxy, ask_numbered, complete, lock_database, stored_ids, wait_for
from proxy_process import ProxyProcess


def test_database_down_spools_then_replays_exactly_once(
    start_proxy: Callable[..., RunningProxy],
    upstream: FakeOpenAI,
    tmp_path: Path,
    sdk: Callable[..., Any],
) -> None:
    """A locked database (another writer holding it) is 'down': calls keep succeeding,
    land in the spool, and are replayed once it is free again, with no duplicates."""
    db = tmp_path / "locked.db"
    # queue_size is no longer used (there is no queue); an older config that sets it loads.
    proxy = start_proxy({"capture": {"queue_size": 5}}, database_url=f"sqlite:///{db}?timeout=0.05")
    client = sdk(proxy.base_url, api_key="sk-a")
    ask_numbered(client, 0, stream=False)
    proxy.wait_stored(1)

    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    ids = [ask_numbered(client, i, stream=bool(i % 2)) for i in range(1, 31)]
    # One snapshot: the writer's read-only probe can see the locked database as back for a
    # moment (WAL lets readers past the lock) before the next write fails again.
    snapshots: list[dict[str, Any]] = []

    def down() -> bool:
        snapshots.append(httpx.get(proxy.url + "/healthz").json())
        latest = snapshots[-1]
        return bool(
            latest["status"] == "degraded" and latest["capture"]["database"] == "unavailable"
        )

    wait_for(down, what="degraded with the database unavailable")
    health = snapshots[-1]["capture"]
    assert health["spool_dirty_segments"] >= 1 and health["spool_bytes"] > 0
    metrics = httpx.get(proxy.url + "/metrics").text
    assert 'distillery_captured_total{outcome="spooled"}' in metrics
    blocker.execute("ROLLBACK")
    blocker.close()

    rows = proxy.wait_stored(31, timeout=20)
    stored = [row["completion_id"] for row in rows]
    assert len(stored) == 31 and set(ids) <= set(stored) and len(set(stored)) == 31
    wait_for(lambda: httpx.get(proxy.url + "/healthz").json()["status"] == "ok", what="ok")
    wait_for(
        lambda: (
            not list((tmp_path / "data" / "spool").glob("*.jsonl"))
            or httpx.get(proxy.url + "/healthz").json()["capture"]["spool_dirty_segments"] == 0
        ),
        what="spool drained",
    )


def test_torn_last_line_is_skipped_and_orphans_replayed(tmp_path: Path) -> None:
    """A crash mid-write leaves half a line: replay keeps every whole record."""
    spool = tmp_path / "spool"
    spool.mkdir()
    records = [
        complete(
            {
                "id": new_record_id(),
                "created_at": time.time(),
                "tenant": "anonymous",
                "upstream": "http://x/v1",
                "path": "/v1/chat/completions",
                "status": 200,
                "stream": False,
                "latency_ms": 1.0,
                "request": {"messages": [{"role": "user", "content": f"m{i}"}]},
                "metadata": {"env": "test"},
            }
        )
        for i in range(3)
    ]
    segment = spool / "12345-dead00-00000001.jsonl"
    segment.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records) + b'{"id": "cap_tor')
    assert [r["id"] for r in read_segment(segment)] == [r["id"] for r in records]

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store = open_store(url)
    capture = Capture(store, spool, CaptureSettings(), Redactor([]))
    capture.start()
    capture.close()
    assert sorted(stored_ids(url, "id")) == sorted(r["id"] for r in records)
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM completion_tags")).scalar_one() == 3
    assert [path.name for path in spool.iterdir()] == ["writer.json"]  # no segment, no lock
    # Replaying the same records again changes nothing.
    store.insert(records)
    assert store.count() == 3
    store.close()


# -- the real process ---------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'proc.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.mark.slow
def test_kill_9_loses_no_delivered_response(
    upstream: FakeOpenAI,
    tmp_path: Path,
    unused_tcp_port: int,
    database_url: str,
    sdk: Callable[..., Any],
) -> None:
    """Every response a client fully received survives SIGKILL: the next start replays
    the spool.  The database is held locked while the calls run, so the records can only
    have come back from the spool."""
    proxy = ProxyProcess(
        unused_tcp_port, upstream.url + "/v1", tmp_path / "data", database_url
    ).start()
    client = sdk(proxy.base_url, api_key="sk-a")
    ids = [ask_numbered(client, i, stream=bool(i % 2)) for i in range(10)]
    wait_for(lambda: len(stored_ids(database_url)) == 10, what="first 10 stored")

    blocker = lock_database(database_url)
    ids += [ask_numbered(client, i, stream=bool(i % 2)) for i in range(10, 40)]
    proxy.signal(signal.SIGKILL)
    proxy.wait()
    blocker()

    restarted = ProxyProcess(
        unused_tcp_port, upstream.url + "/v1", tmp_path / "data", database_url
    ).start()
    wait_for(lambda: len(stored_ids(database_url)) >= 40, what="replay after restart")
    restarted.signal(signal.SIGTERM)
    assert restarted.wait() == 0
    stored = stored_ids(database_url)
    assert sorted(stored) == sorted(ids)


@pytest.mark.slow
def test_sigterm_under_load_loses_nothing(
    upstream: FakeOpenAI, tmp_path: Path, unused_tcp_port: int
) -> None:
    """SIGTERM mid-load: in-flight calls finish, everything answered is stored once."""
    database_url = f"sqlite:///{tmp_path / 'term.db'}"
    upstream.slow_seconds = 0.3
    proxy = ProxyProcess(
        unused_tcp_port, upstream.url + "/v1", tmp_path / "data", database_url
    ).start()

    async def load() -> list[str]:
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="sk-a")
        answered: list[str] = []

        async def one(i: int) -> None:
            messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": f"load {i}"}]
            try:
                if i % 2:
                    stream = await client.chat.completions.create(
                        model="fake-slow", messages=messages, stream=True
                    )
                    chunks = [chunk async for chunk in stream]
                    answered.append(chunks[0].id)
                else:
                    result = await client.chat.completions.create(
                        model="fake-slow", messages=messages
                    )
                    answered.append(result.id)
            except openai.APIConnectionError:
                pass  # refused once the proxy stopped accepting: never answered, fine

        async def sigterm_mid_load() -> None:
            # Observable state, not a sleep: the upstream holds all 60 first calls
            # (fake-slow takes 0.3 s), so they are in flight when SIGTERM lands.
            await asyncio.to_thread(
                wait_for, lambda: len(upstream.requests) >= 60, 30, "60 calls in flight"
            )
            proxy.signal(signal.SIGTERM)

        tasks = [asyncio.create_task(one(i)) for i in range(60)]
        await sigterm_mid_load()
        tasks += [asyncio.create_task(one(i)) for i in range(60, 120)]
        await asyncio.gather(*tasks)
        await client.close()
        return answered

    answered = asyncio.run(load())
    assert proxy.wait() == 0
    assert len(answered) >= 60  # the first wave was in flight and had to finish
    stored = stored_ids(database_url)
    assert len(stored) == len(set(stored))
    assert set(answered) <= set(stored)
    assert not list((tmp_path / "data" / "spool").glob("*.jsonl"))


def test_spool_files_are_private(
    start_proxy: Callable[..., RunningProxy],
    upstream: FakeOpenAI,
    tmp_path: Path,
    sdk: Callable[..., Any],
) -> None:
    proxy = start_proxy()
    client = sdk(proxy.base_url, api_key="sk-a")
    ask_numbered(client, 1, stream=False)
    spool = tmp_path / "data" / "spool"
    assert oct(spool.stat().st_mode & 0o777) == "0o700"
    for path in spool.iterdir():
        assert path.stat().st_mode & 0o077 == 0, path
    assert os.environ["DISTILLERY_DATA_DIR"] == str(tmp_path / "data")


@pytest.mark.slow
def test_ready_is_logged_once_bound_and_a_taken_port_never_says_ready(
    upstream: FakeOpenAI, tmp_path: Path, unused_tcp_port: int
) -> None:
    """ "proxy ready" comes after the port is bound, with the address; a first start logs no
    alembic chatter; a second proxy on the same port fails without claiming to be ready."""
    import json
    import subprocess

    proxy = ProxyProcess(
        unused_tcp_port, upstream.url + "/v1", tmp_path / "data", f"sqlite:///{tmp_path / 'r.db'}"
    ).start()
    wait_for(lambda: '"proxy ready"' in proxy.log.read_text(), what="the ready line")
    log = proxy.log.read_text()
    [ready] = [json.loads(line) for line in log.splitlines() if '"proxy ready"' in line]
    assert ready["address"] == f"http://127.0.0.1:{unused_tcp_port}/v1"
    # Where a browser finds the dashboard, and the proxy's root sends it there.
    assert ready["dashboard"] == f"http://127.0.0.1:{unused_tcp_port}/ui/"
    root = httpx.get(f"http://127.0.0.1:{unused_tcp_port}/", follow_redirects=False)
    assert root.status_code == 302 and root.headers["location"] == "/ui/"
    assert "alembic" not in log
    second = subprocess.run(
        [
            *proxy.args[:-5],
            "--data-dir",
            str(tmp_path / "other"),
            "--database-url",
            f"sqlite:///{tmp_path / 'r2.db'}",
            "--log-json",
        ],
        capture_output=True,
        timeout=60,
    )
    assert second.returncode != 0
    assert b"Cannot listen on 127.0.0.1" in second.stderr and b"proxy ready" not in second.stderr
    proxy.signal(signal.SIGTERM)
    assert proxy.wait() == 0
