"""A proxy whose database is unreachable when it starts: it serves and captures (to the
spool), says so on /healthz, and its dashboard answers 503 until the database answers.
Real ``distillery proxy`` processes, a real Postgres refusing connections, a real SQLite
file held locked by another connection."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from distillery.core.errors import StoreError

from fake_openai import FakeOpenAI
from helpers import ServerThread, ask_numbered, lock_database, stored_ids, wait_for
from proxy_process import ProxyProcess

pytestmark = pytest.mark.slow


class PostgresDoor:
    """A port in front of the real Postgres: closed (connections refused, as when Postgres
    is down) until ``open()``, then relaying every connection to it."""

    def __init__(self, servers: ServerThread, port: int, target: tuple[str, int]) -> None:
        self.servers, self.port, self.target = servers, port, target
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    def open(self) -> None:
        async def start() -> asyncio.Server:
            return await asyncio.start_server(self._relay, "127.0.0.1", self.port)

        self.server = self.servers.call(start())

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def close(self) -> None:
        if self.server is not None:
            server = self.server

            async def stop() -> None:
                server.close()
                for writer in self.writers:
                    writer.close()
                await server.wait_closed()

            self.servers.call(stop())


def health(proxy: ProxyProcess) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"http://127.0.0.1:{proxy.port}/healthz").json()
    return body


def dashboard(proxy: ProxyProcess) -> httpx.Response:
    return httpx.get(f"http://127.0.0.1:{proxy.port}/ui/completions", follow_redirects=False)


def check_outage_then_recovery(
    proxy: ProxyProcess,
    sdk: Callable[..., Any],
    recover: Callable[[], None],
    stored: Callable[[], list[str]],
) -> None:
    client = sdk(proxy.base_url, api_key="sk-a")
    ids = [ask_numbered(client, i, stream=bool(i % 2)) for i in range(4)]  # answered all the same
    wait_for(lambda: health(proxy)["status"] == "degraded", what="/healthz degraded")
    assert health(proxy)["capture"]["database"] == "unavailable"
    page = dashboard(proxy)
    assert page.status_code == 503 and "unavailable until its database answers" in page.text
    assert stored() == []
    recover()
    wait_for(lambda: sorted(stored()) == sorted(ids), timeout=30, what="the spooled calls stored")
    wait_for(lambda: health(proxy)["status"] == "ok", what="/healthz ok again")
    # The dashboard answers again: a sign-in page for a browser with no session.
    assert dashboard(proxy).status_code == 303


@pytest.fixture
def door(
    servers: ServerThread, unused_tcp_port_factory: Callable[[], int], postgres_url: str
) -> Iterator[tuple[PostgresDoor, str]]:
    real = sa.make_url(postgres_url)
    door = PostgresDoor(
        servers, unused_tcp_port_factory(), (real.host or "127.0.0.1", real.port or 5432)
    )
    yield door, real.set(port=door.port).render_as_string(hide_password=False)
    door.close()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_postgres_down_at_start(
    workers: str,
    upstream: FakeOpenAI,
    tmp_path: Path,
    unused_tcp_port: int,
    door: tuple[PostgresDoor, str],
    sdk: Callable[..., Any],
) -> None:
    postgres, database_url = door
    proxy = ProxyProcess(
        unused_tcp_port, upstream.url + "/v1", tmp_path / "data", database_url, "--workers", workers
    ).start()

    def stored() -> list[str]:
        try:
            return stored_ids(database_url)
        except StoreError:  # refused: still down
            return []

    check_outage_then_recovery(proxy, sdk, postgres.open, stored)


def test_sqlite_locked_at_start(
    upstream: FakeOpenAI, tmp_path: Path, unused_tcp_port: int, sdk: Callable[..., Any]
) -> None:
    """The database exists (an earlier start made it) but another process holds its
    write lock: the proxy starts all the same, after SQLite's busy timeout."""
    path = tmp_path / "locked.db"
    database_url = f"sqlite:///{path}?timeout=0.5"
    stored_ids(database_url)  # made and migrated
    release = lock_database(f"sqlite:///{path}")

    def stored() -> list[str]:
        with sqlite3.connect(path, timeout=0.1) as lite:
            try:
                return [row[0] for row in lite.execute("SELECT completion_id FROM completions")]
            except sqlite3.OperationalError:
                return []

    proxy = ProxyProcess(
        unused_tcp_port, upstream.url + "/v1", tmp_path / "data", database_url
    ).start()
    check_outage_then_recovery(proxy, sdk, release, stored)
