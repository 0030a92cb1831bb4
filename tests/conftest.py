from __future__ import annotations

import os
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from distillery.core.config import Settings
from distillery.proxy.app import Extension
from distillery.store.db import create_engine

from corpus import Replay
from fake_openai import FakeOpenAI
from helpers import CHROMIUM, DRIVER, RunningProxy, ServerThread

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
    fake.url, _ = servers.serve(fake.app)
    return fake


@pytest.fixture
def replay(servers: ServerThread) -> Replay:
    """An upstream that answers with whatever exchange the test sets, byte for byte."""
    fake = Replay()
    fake.url, _ = servers.serve(fake.app)
    return fake


@pytest.fixture
def start_proxy(
    servers: ServerThread, upstream: FakeOpenAI, tmp_path: Path
) -> Iterator[Callable[..., RunningProxy]]:
    started: list[RunningProxy] = []

    def start(
        config: dict[str, Any] | None = None,
        database_url: str | None = None,
        dashboard: bool = False,
        extensions: Sequence[Extension] = (),
        reload: Callable[[], Settings] | None = None,
        **_: Any,
    ) -> RunningProxy:
        config = dict(config or {})
        config.setdefault("upstream", {}).setdefault("url", upstream.url + "/v1")
        storage = config.setdefault("storage", {})
        storage.setdefault(
            "database_url", database_url or f"sqlite:///{tmp_path / 'distillery.db'}"
        )
        settings = Settings.model_validate(config)
        from distillery.proxy.server import open_capture_store

        store = open_capture_store(settings) if settings.capture.enabled else None
        from distillery.ui.app import mount

        running = RunningProxy(
            servers, settings, store, [*([mount] if dashboard else []), *extensions], reload
        )
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


@pytest.fixture
def chrome(tmp_path: Path) -> Iterator[Any]:
    """Debian's chromium through chromium-driver, headless; quit even when the test fails."""
    if CHROMIUM is None or DRIVER is None:
        pytest.skip("no chromium/chromedriver: apt-get install chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chrome'}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.implicitly_wait(0)
    # Downloads (an export) land in tmp_path/downloads, without asking.
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    driver.execute_cdp_cmd(
        "Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)}
    )
    try:
        yield driver
    finally:
        driver.quit()
