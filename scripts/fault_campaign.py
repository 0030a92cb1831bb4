"""The long fault campaign against a real ``distillery proxy`` process.  Prints tables.

    python scripts/fault_campaign.py [--fuzz 10000] [--postgres URL] [--skip-disk]

What it does, each part side by side with a reference measured in the same run:

1. Records the database refuses (tests/test_faults.py's POISON cases), on SQLite
   and on Postgres: each sent through the proxy, then 50 ordinary calls; counts
   the later calls that were answered but not stored (must be 0).
2. A full disk: database and spool on a 16 MB tmpfs (needs root; skipped
   otherwise) filled to the last byte while 1,000 calls go through; the space
   is freed; counts answered-but-not-stored calls (must be 0).
3. Fuzz: ``--fuzz`` hostile requests (tests/fuzzing.py); counts plain-text
   answers, connections closed without an answer, timeouts, and tracebacks or
   unhandled errors in the proxy's log (all must be 0).
4. Streams of 8,000 to 128,000 one-word deltas: seconds direct vs through the
   proxy (linear: the ratio stays flat), and the slowest ``/healthz`` answer
   while each streams.
5. A 50 MB request body: the proxy's peak RSS growth, as a multiple of the body.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from distillery.store import open_store  # noqa: E402

from fake_openai import FakeOpenAI  # noqa: E402
from fuzzing import run as fuzz  # noqa: E402
from helpers import distinct_words, fill  # noqa: E402
from proxy_process import ProxyProcess  # noqa: E402
from test_faults import POISON  # noqa: E402

MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "hi"}]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Upstream:
    """The fake OpenAI upstream on its own thread and event loop."""

    def __init__(self) -> None:
        from aiohttp import web

        self.fake = FakeOpenAI()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

        async def start() -> str:
            runner = web.AppRunner(self.fake.app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            return f"http://127.0.0.1:{runner.addresses[0][1]}"

        self.url = asyncio.run_coroutine_threadsafe(start(), self.loop).result(10)


def table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)))


def stored_completion_ids(database_url: str) -> set[str]:
    import sqlalchemy as sa

    store = open_store(database_url)
    try:
        with store.engine.connect() as conn:
            return {r[0] for r in conn.execute(sa.text("SELECT completion_id FROM completions"))}
    finally:
        store.close()


def wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def ask(client: openai.OpenAI, text: str, stream: bool) -> str:
    messages = [MESSAGES[0], {"role": "user", "content": text}]
    if stream:
        chunks = client.chat.completions.create(model="fake-model", messages=messages, stream=True)
        ids = [chunk.id for chunk in chunks]  # read to the end: the call completes
        return ids[0]
    return client.chat.completions.create(model="fake-model", messages=messages).id


def poison(upstream: Upstream, work: Path, database_url: str, label: str) -> list[list[Any]]:
    rows = []
    for name, change in POISON.items():
        data = work / f"poison-{label}-{len(rows)}"
        proxy = ProxyProcess(free_port(), upstream.url + "/v1", data, database_url).start()
        client = openai.OpenAI(base_url=proxy.base_url, api_key="sk-campaign", max_retries=0)
        try:
            client.chat.completions.create(
                **{"model": "fake-model", "messages": MESSAGES, **change}
            )
        except openai.BadRequestError:
            pass
        later = {ask(client, f"{label} after {name} {i}", bool(i % 2)) for i in range(50)}
        wait(lambda later=later: later <= stored_completion_ids(database_url), 30)
        lost = len(later - stored_completion_ids(database_url))
        repaired = httpx.get(f"http://127.0.0.1:{proxy.port}/healthz").json()["capture"]["repaired"]
        proxy.signal(signal.SIGTERM)
        proxy.wait()
        client.close()
        rows.append([name, label, len(later), lost, repaired])
    return rows


def full_disk(upstream: Upstream, work: Path, calls: int) -> list[list[Any]] | str:
    if os.geteuid() != 0:
        return "skipped: mounting a tmpfs needs root"
    mount = work / "small"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        return f"skipped: {done.stderr.strip()}"
    try:
        database_url = f"sqlite:///{mount / 'db.sqlite'}"
        proxy = ProxyProcess(free_port(), upstream.url + "/v1", mount, database_url).start()
        client = openai.OpenAI(base_url=proxy.base_url, api_key="sk-disk", max_retries=0)
        filler = fill(mount)
        answered = [ask(client, f"disk {i}", bool(i % 2)) for i in range(calls)]
        health = httpx.get(f"http://127.0.0.1:{proxy.port}/healthz").json()
        stored_while_full = len(stored_completion_ids(database_url))
        filler.unlink()
        wait(lambda: set(answered) <= stored_completion_ids(database_url), 60)
        stored = stored_completion_ids(database_url)
        proxy.signal(signal.SIGTERM)
        proxy.wait()
        client.close()
        return [
            [
                calls,
                len(answered),
                health["status"],
                health["capture"]["spool_write_errors"],
                stored_while_full,
                len(set(answered) & stored),
                len(set(answered) - stored),
            ]
        ]
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fuzz_campaign(upstream: Upstream, work: Path, count: int) -> list[list[Any]]:
    data = work / "fuzz"
    database_url = f"sqlite:///{work / 'fuzz.db'}"
    proxy = ProxyProcess(free_port(), upstream.url + "/v1", data, database_url).start()
    started = time.perf_counter()
    results = asyncio.run(fuzz("127.0.0.1", proxy.port, seed=int(time.time()), count=count))
    seconds = time.perf_counter() - started
    proxy.signal(signal.SIGTERM)
    proxy.wait()
    verdicts = Counter(answer.verdict for _, answer in results)
    statuses = Counter(answer.status for _, answer in results)
    log = proxy.log.read_text(errors="replace")
    tracebacks = log.count("Traceback")
    unhandled = sum(
        1
        for line in log.splitlines()
        if '"unhandled error"' in line or "Unhandled exception" in line or '"exception"' in line
    )
    print("\nfuzz statuses:", dict(sorted(statuses.items())))
    errors = [line for line in log.splitlines() if '"level":"error"' in line]
    for line in errors[:5]:
        print("  error logged:", line[:400])
    return [
        [
            len(results),
            f"{seconds:.1f}",
            verdicts["json"],
            verdicts["sse"],
            verdicts["empty"],
            verdicts["plain"],
            verdicts["closed"],
            verdicts["none"],
            tracebacks,
            unhandled,
        ]
    ]


def big_stream(upstream: Upstream, work: Path) -> list[list[Any]]:
    proxy = ProxyProcess(
        free_port(), upstream.url + "/v1", work / "stream", f"sqlite:///{work / 'stream.db'}"
    ).start()
    body = {"model": "fake-many", "messages": MESSAGES, "stream": True}
    health_max = 0.0
    streaming = threading.Event()

    def poll_health() -> None:
        nonlocal health_max
        while streaming.is_set():
            t = time.perf_counter()
            httpx.get(f"http://127.0.0.1:{proxy.port}/healthz")
            health_max = max(health_max, time.perf_counter() - t)

    def timed(url: str) -> float:
        t = time.perf_counter()
        httpx.post(url + "/chat/completions", json=body, timeout=300).raise_for_status()
        return time.perf_counter() - t

    rows = []
    for deltas in (8_000, 32_000, 32_000, 128_000):
        upstream.fake.many_deltas = deltas
        direct = timed(upstream.url + "/v1")
        streaming.set()
        poller = threading.Thread(target=poll_health)
        poller.start()
        proxied = timed(proxy.base_url)
        streaming.clear()
        poller.join()
        rows.append(
            [
                deltas,
                f"{direct:.2f}",
                f"{proxied:.2f}",
                f"{proxied / direct:.1f}x",
                f"{proxied / deltas * 1e6:.1f}",
                f"{health_max * 1000:.0f}",
            ]
        )
    proxy.signal(signal.SIGTERM)
    proxy.wait()
    return rows


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def big_body(upstream: Upstream, work: Path) -> list[list[Any]]:
    proxy = ProxyProcess(
        free_port(), upstream.url + "/v1", work / "body", f"sqlite:///{work / 'body.db'}"
    ).start()
    assert proxy.process is not None
    pid = proxy.process.pid
    small = orjson.dumps({"model": "fake-model", "messages": MESSAGES})
    httpx.post(proxy.base_url + "/chat/completions", content=small)
    before = peak_rss_kb(pid)
    text = distinct_words(50_000_000)
    body = orjson.dumps({"model": "fake-model", "messages": [{"role": "user", "content": text}]})
    response = httpx.post(proxy.base_url + "/chat/completions", content=body, timeout=300)
    wait(lambda: len(stored_completion_ids(f"sqlite:///{work / 'body.db'}")) >= 2, 120)
    after = peak_rss_kb(pid)
    proxy.signal(signal.SIGTERM)
    proxy.wait()
    growth = (after - before) * 1024
    return [
        [
            f"{len(body) / 1e6:.0f} MB",
            response.status_code,
            f"{growth / 1e6:.0f} MB",
            f"{growth / len(body):.1f}x",
        ]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fuzz", type=int, default=10_000)
    parser.add_argument("--postgres", default=os.environ.get("DISTILLERY_TEST_POSTGRES_URL"))
    parser.add_argument("--skip-disk", action="store_true")
    parser.add_argument(
        "--only", default="poison,disk,fuzz,stream,body", help="comma-separated parts to run"
    )
    args = parser.parse_args()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    upstream = Upstream()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        parts = set(args.only.split(","))
        rows = []
        if "poison" in parts:
            rows = poison(upstream, work, f"sqlite:///{work / 'poison.db'}", "sqlite")
        if args.postgres and "poison" in parts:
            import uuid

            import sqlalchemy as sa

            schema = f"campaign_{uuid.uuid4().hex[:8]}"
            admin = sa.create_engine(
                args.postgres.replace("postgresql://", "postgresql+psycopg://")
            )
            with admin.begin() as conn:
                conn.execute(sa.text(f"CREATE SCHEMA {schema}"))
            try:
                url = f"{args.postgres}?options=-csearch_path%3D{schema}"
                rows += poison(upstream, work, url, "postgres")
            finally:
                with admin.begin() as conn:
                    conn.execute(sa.text(f"DROP SCHEMA {schema} CASCADE"))
                admin.dispose()
        if rows:
            table(
                "1. Records the database refuses",
                ["case", "db", "later calls", "lost", "repaired"],
                rows,
            )
        if not args.skip_disk and "disk" in parts:
            disk = full_disk(upstream, work, 1000)
            if isinstance(disk, str):
                print(f"\n2. Full disk: {disk}")
            else:
                table(
                    "2. Full disk (16 MB tmpfs, database + spool)",
                    [
                        "calls",
                        "answered",
                        "health",
                        "spool errors",
                        "stored while full",
                        "stored after",
                        "lost",
                    ],
                    disk,
                )
        if "fuzz" in parts:
            header = ["requests", "seconds", "json", "sse", "empty", "plain", "closed"]
            header += ["timeout", "tracebacks", "unhandled"]
            table("3. Fuzz", header, fuzz_campaign(upstream, work, args.fuzz))
        if "stream" in parts:
            table(
                "4. A long stream",
                ["deltas", "direct s", "proxy s", "ratio", "proxy µs/delta", "max healthz ms"],
                big_stream(upstream, work),
            )
        if "body" in parts:
            table(
                "5. A large request body",
                ["body", "status", "peak RSS growth", "x body"],
                big_body(upstream, work),
            )
        ProxyProcess.reap()


if __name__ == "__main__":
    main()
