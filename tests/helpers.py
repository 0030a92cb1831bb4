"""What several test modules share: records, servers, waiting on observable state.

Test modules (and conftest's fixtures) import from here, never from each other.
"""

from __future__ import annotations

import asyncio
import html.parser
import os
import random
import re
import shutil
import sqlite3
import string
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import openai
import sqlalchemy as sa
from aiohttp import web
from openai.types.chat import ChatCompletionMessageParam

from distillery.core.config import Settings
from distillery.proxy.app import Extension, make_app
from distillery.proxy.http import ProxyRunner, close_loop
from distillery.store import Store, open_store
from distillery.store.db import create_engine
from distillery.store.records import CaptureRecord

# Every key a capture record has, at its "nothing known" value.
EMPTY: dict[str, Any] = {
    "completion_id": None,
    "model_requested": None,
    "model_served": None,
    "finish_reason": None,
    "prompt_tokens": None,
    "completion_tokens": None,
    "total_tokens": None,
    "ttft_ms": None,
    "upstream_request_id": None,
    "prompt_fingerprint": None,
    "response": None,
    "error": None,
    "metadata": {},
}
REQUIRED = frozenset(
    {"id", "created_at", "tenant", "upstream", "path", "status", "stream", "latency_ms", "request"}
)


def capture_record(
    record_id: str,
    *,
    created_at: float = 1_764_300_000.0,
    tenant: str = "anonymous",
    upstream: str = "http://upstream.test/v1",
    path: str = "/v1/chat/completions",
    status: int = 200,
    stream: bool = False,
    latency_ms: float = 1.0,
    request: dict[str, Any] | None = None,
    **fields: Any,
) -> CaptureRecord:
    """A whole capture record, as the proxy builds one: the fields given, the rest empty.

    An unknown field is a TypeError here, as a misspelled key is a refusal in the store.
    """
    return complete(
        {
            "id": record_id,
            "created_at": created_at,
            "tenant": tenant,
            "upstream": upstream,
            "path": path,
            "status": status,
            "stream": stream,
            "latency_ms": latency_ms,
            "request": request if request is not None else {"messages": []},
            **fields,
        }
    )


def complete(fields: Mapping[str, Any]) -> CaptureRecord:
    """``fields`` with every capture-record key it leaves out at its empty value."""
    unknown = fields.keys() - EMPTY.keys() - REQUIRED
    if unknown:
        raise TypeError(f"not capture record fields: {sorted(unknown)}")
    missing = REQUIRED - fields.keys()
    if missing:
        raise TypeError(f"capture record fields missing: {sorted(missing)}")
    return cast(CaptureRecord, {**EMPTY, **fields})


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
        if self.loop.is_closed():
            return
        for runner in list(self.runners):
            self.stop(runner)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        close_loop(self.loop)


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll observable state (a row, a file, a port) until ``predicate`` holds; never a sleep."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class RunningProxy:
    def __init__(
        self,
        servers: ServerThread,
        settings: Settings,
        store: Store | None,
        extensions: Sequence[Extension] = (),
        reload: Callable[[], Settings] | None = None,
    ) -> None:
        self.servers = servers
        self.settings = settings
        self.app = make_app(settings, store, extensions, reload)
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


T0 = datetime(2026, 11, 1, tzinfo=UTC).timestamp()


SYSTEM = "You are the support assistant for ACME. " + "Follow the policy carefully. " * 60


TOOLS = [
    {
        "type": "function",
        "function": {"name": "lookup_order", "parameters": {"type": "object", "properties": {}}},
    }
]


TOPICS = [
    "my parcel never arrived and tracking is stuck",
    "how do I change the billing address on my account",
    "the blender I bought makes a grinding noise",
    "can I return shoes that I wore once outside",
    "why was I charged twice for one subscription",
    "the discount code from the newsletter is rejected",
    "please delete my account and all my data",
    "my password reset email never comes",
    "do you ship to Iceland and how long does it take",
    "the invoice shows the wrong company name",
    "I want to upgrade my plan in the middle of the month",
    "the app crashes when I open my order history",
    "can I pick up my order at a store instead",
    "what is the warranty on refurbished laptops",
]


def record(
    i: Any,
    user: Any,
    answer: Any = "Sure, here is what I found.",
    *,
    system: Any = SYSTEM,
    tags: Any = None,
    status: Any = 200,
    error: Any = None,
    finish: Any = "stop",
    refusal: Any = None,
    tool_calls: Any = None,
    history: Any = (),
    tools: Any = None,
) -> CaptureRecord:
    message = {"role": "assistant", "content": answer, "refusal": refusal}
    if tool_calls:
        message = {"role": "assistant", "content": None, "tool_calls": tool_calls}
    request: dict[str, Any] = {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": system},
            *history,
            {"role": "user", "content": user},
        ],
    }
    if tools:
        request["tools"] = tools
        request["parallel_tool_calls"] = False
    return complete(
        {
            "id": f"cap_{i:028d}",
            "completion_id": f"chatcmpl-{i}",
            "created_at": T0 + i * 60,
            "tenant": "key-aaaaaaaaaaaaaaaa",
            "upstream": "https://api.openai.com/v1",
            "path": "/v1/chat/completions",
            "model_requested": "gpt-4o",
            "status": status,
            "stream": False,
            "finish_reason": finish,
            "latency_ms": 10.0,
            "request": request,
            "response": None
            if error
            else {
                "id": f"chatcmpl-{i}",
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            },
            "error": error,
            "metadata": {"app": "support", **(tags or {})},
        }
    )


def base_records() -> list[CaptureRecord]:
    records = [record(i, topic + f" (ticket {i})") for i, topic in enumerate(TOPICS, 1)]
    records += [
        record(
            20,
            "where is order 5 — lookup please",
            tool_calls=[
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "lookup_order", "arguments": '{"id": 5}'},
                }
            ],
            finish="tool_calls",
            tools=TOOLS,
        ),
        record(
            21,
            "and what about the second one?",
            history=[
                {"role": "user", "content": "what did I order last week?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_9",
                            "type": "function",
                            "function": {"name": "lookup_order", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_9", "content": '{"items": 2}'},
                {"role": "assistant", "content": "You ordered two items."},
            ],
            tools=TOOLS,
        ),
        record(22, "my email is jane.doe@example.com, call +1 415 555 2671 about SSN 123-45-6789"),
        record(23, "write something hateful", answer="", refusal="I can't help with that."),
        record(24, "tell me a long story", finish="length"),
        record(25, "this one failed upstream", status=500, error={"error": {"message": "boom"}}),
        record(26, TOPICS[0] + " (ticket 1)"),  # exact duplicate of 1 (the newer copy is kept)
        record(27, TOPICS[1].upper() + "!! (TICKET 2)"),  # near duplicate of 2
        record(28, "ignore me", tags={"app": "other"}),
    ]
    return records


class HTMLTable(html.parser.HTMLParser):
    """The last <table> of a page as rows of cell texts."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.cell: list[str] | None = None

    def handle_starttag(self, tag: Any, attrs: Any) -> None:
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self.cell = []

    def handle_endtag(self, tag: Any) -> None:
        if tag in ("td", "th") and self.cell is not None:
            self.tables[-1][-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data: Any) -> None:
        if self.cell is not None:
            self.cell.append(data)


def distinct_words(size: int, seed: int = 7) -> str:
    rng = random.Random(seed)
    words: list[str] = []
    total = 0
    while total < size:
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(9))
        words.append(word)
        total += 10
    return " ".join(words)


def fill(directory: Path) -> Path:
    """Write a file until the filesystem refuses another byte."""
    path = directory / "filler"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)
    return path


def readme_code(section: str, language: str = "python") -> list[str]:
    """The ```language blocks of one README section, in order: docs that the tests run."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    start = readme.index(f"## {section}\n")
    end = readme.find("\n## ", start + 1)
    text = readme[start : end if end != -1 else None]
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


CHROMIUM = shutil.which("chromium")
DRIVER = shutil.which("chromedriver")


def wait_until(driver: Any, predicate: Callable[[Any], Any], what: str) -> Any:
    """Poll ``predicate`` until it holds; an element that went away with the page it was
    on (a navigation under way) is a "not yet", not a failure."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(
        driver, 20, ignored_exceptions=(StaleElementReferenceException, WebDriverException)
    )
    return wait.until(predicate, message=f"timed out waiting for {what}")


# -- capture: what the reliability tests ask and read back ----------------------------


def ask_numbered(client: openai.OpenAI, i: int, stream: bool) -> str:
    """Ask question ``i`` through the SDK; returns the completion id the client saw."""
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": f"question {i}"},
    ]
    if stream:
        chunks = list(
            client.chat.completions.create(model="fake-model", messages=messages, stream=True)
        )
        return chunks[0].id
    return client.chat.completions.create(model="fake-model", messages=messages).id


def stored_ids(database_url: str, column: str = "completion_id") -> list[str]:
    store = open_store(database_url)
    try:
        with store.engine.connect() as conn:
            return [row[0] for row in conn.execute(sa.text(f"SELECT {column} FROM completions"))]
    finally:
        store.close()


def lock_database(database_url: str) -> Callable[[], None]:
    """Make the database refuse writes; returns a function that undoes it."""
    if database_url.startswith("sqlite"):
        path = database_url.removeprefix("sqlite:///")
        lite = sqlite3.connect(path, isolation_level=None)
        lite.execute("BEGIN EXCLUSIVE")

        def release() -> None:
            lite.execute("ROLLBACK")
            lite.close()

        return release
    store = open_store(database_url)
    conn = store.engine.connect()
    transaction = conn.begin()
    conn.execute(sa.text("LOCK TABLE completions IN ACCESS EXCLUSIVE MODE"))

    def release_pg() -> None:
        transaction.rollback()
        conn.close()
        store.close()

    return release_pg
