from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp import web

from distillery.config import Settings, load_settings
from distillery.proxy.app import make_app
from distillery.proxy.http import ProxyRunner
from distillery.store import Store
from distillery.store.db import create_engine

from fake_openai import FakeOpenAI

POSTGRES_ENV = "DISTILLERY_TEST_POSTGRES_URL"
# The example's modules (the task, the tiny student) serve the tests too.
sys.path.insert(0, str(Path(__file__).parent.parent / "examples" / "ticket_extraction"))


@pytest.fixture(autouse=True)
def isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No test reads or writes the user's config or data."""
    data = tmp_path / "data"
    monkeypatch.setenv("DISTILLERY_DATA_DIR", str(data))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    # tiktoken's cache decides how builds count tokens: empty unless a test fills it.
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken-cache"))
    for name in list(os.environ):
        if name.startswith("DISTILLERY_") and name not in ("DISTILLERY_DATA_DIR", POSTGRES_ENV):
            monkeypatch.delenv(name)
    return data


class ServerThread:
    """aiohttp apps served from a private event loop, so sync clients can call them."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runners: list[web.AppRunner] = []

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def serve(
        self, app: web.Application, runner_class: type[web.AppRunner] = web.AppRunner
    ) -> tuple[str, web.AppRunner]:
        async def start() -> tuple[str, web.AppRunner]:
            runner = runner_class(app, access_log=None, shutdown_timeout=5)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            return f"http://127.0.0.1:{port}", runner

        url, runner = self.call(start())
        self.runners.append(runner)
        return url, runner

    def stop(self, runner: web.AppRunner) -> None:
        if runner in self.runners:
            self.runners.remove(runner)
            self.call(runner.cleanup())

    def close(self) -> None:
        for runner in list(self.runners):
            self.stop(runner)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(autouse=True)
def reap_proxies() -> Iterator[None]:
    """No ``distillery proxy`` process outlives its test, whether it passed or failed."""
    yield
    from proxy_process import ProxyProcess

    ProxyProcess.reap()


@pytest.fixture
def servers() -> Iterator[ServerThread]:
    thread = ServerThread()
    yield thread
    thread.close()


@pytest.fixture
def upstream(servers: ServerThread) -> FakeOpenAI:
    fake = FakeOpenAI()
    fake.url, _ = servers.serve(fake.app)  # type: ignore[attr-defined]
    return fake


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class RunningProxy:
    def __init__(self, servers: ServerThread, settings: Settings, store: Store | None) -> None:
        self.servers = servers
        self.settings = settings
        self.app = make_app(settings, store)
        self.url, self.runner = servers.serve(self.app, ProxyRunner)
        self.base_url = self.url + "/v1"
        self.reader = Store(create_engine(settings.storage.resolved_database_url()))

    def rows(self, where: str = "", **params: Any) -> list[dict[str, Any]]:
        sql = "SELECT * FROM completions " + where + " ORDER BY id"
        with self.reader.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(sa.text(sql), params)]

    def tags(self, record_id: str) -> dict[str, str]:
        with self.reader.engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT key, value FROM completion_tags WHERE completion_id = :id"),
                {"id": record_id},
            )
            return {key: value for key, value in rows}

    def wait_stored(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        wait_for(lambda: self._count() >= count, timeout, f"{count} stored rows")
        return self.rows()

    def _count(self) -> int:
        try:
            return self.reader.count()
        except sa.exc.OperationalError:
            return 0

    def stop(self) -> None:
        self.servers.stop(self.runner)


@pytest.fixture
def start_proxy(
    servers: ServerThread, upstream: FakeOpenAI, tmp_path: Path
) -> Iterator[Callable[..., RunningProxy]]:
    started: list[RunningProxy] = []

    def start(
        config: dict[str, Any] | None = None, database_url: str | None = None, **_: Any
    ) -> RunningProxy:
        config = dict(config or {})
        config.setdefault("upstream", {}).setdefault("url", upstream.url + "/v1")  # type: ignore[attr-defined]
        storage = config.setdefault("storage", {})
        storage.setdefault(
            "database_url", database_url or f"sqlite:///{tmp_path / 'distillery.db'}"
        )
        settings = Settings.model_validate(config)
        from distillery.proxy.server import open_capture_store

        store = open_capture_store(settings) if settings.capture.enabled else None
        running = RunningProxy(servers, settings, store)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
        running.reader.close()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh schema in the CI Postgres; skipped where none is reachable."""
    url = os.environ.get(POSTGRES_ENV)
    if not url:
        pytest.skip(
            f"no Postgres: set {POSTGRES_ENV} (e.g. postgresql://postgres@127.0.0.1:5432/test)"
        )
    schema = f"t_{uuid.uuid4().hex[:10]}"
    admin = create_engine(url)
    try:
        with admin.begin() as conn:
            conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
    except sa.exc.OperationalError as exc:
        admin.dispose()
        pytest.skip(f"Postgres at {url} is not reachable: {str(exc.orig).strip().splitlines()[0]}")
    separator = "&" if "?" in url else "?"
    yield f"{url}{separator}options=-csearch_path%3D{schema}"
    with admin.begin() as conn:
        conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


__all__ = ["RunningProxy", "ServerThread", "load_settings", "wait_for"]


@pytest.fixture
def sdk() -> Iterator[Callable[..., Any]]:
    """``sdk(base_url, api_key, async_=False, **kw)``: real openai clients, closed at teardown."""
    import openai

    made: list[Any] = []

    def make(base_url: str, api_key: str = "sk-app-key", **kwargs: Any) -> openai.OpenAI:
        kwargs.setdefault("max_retries", 0)
        client = openai.OpenAI(base_url=base_url, api_key=api_key, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()
