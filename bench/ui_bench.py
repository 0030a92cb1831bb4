"""How fast are the dashboard's pages on a million captured calls?  Prints a table.

Fills a database with N synthetic calls (bench/store_bench.py's: 90 days, 20 apps,
5 tenants, 5 models; an existing database that already holds N rows is reused),
serves the dashboard alone (open, single-user) and times each page over loopback
(median of warm runs): the overview for a week and for 90 days, the completions list
with a tag filter, its next page, and one call.  For reference, in the same run: the
scan that `completions stats` does for the same week, which the overview's
aggregates replace.

    python bench/ui_bench.py [--rows 1000000] [--database-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from aiohttp import web

sys.path.insert(0, str(Path(__file__).parent))

from store_bench import fill

from distillery.core.config import Settings
from distillery.store import open_store
from distillery.store.query import parse_filters, parse_when
from distillery.store.stats import group_stats
from distillery.ui.app import mount


def serve(app: web.Application) -> tuple[str, Callable[[], None]]:
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(app, access_log=None)

    async def start() -> str:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    url = asyncio.run_coroutine_threadsafe(start(), loop).result(60)

    def stop() -> None:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    return url, stop


def timed(fn: Callable[[], Any], runs: int = 7) -> tuple[float, Any]:
    result = fn()  # warm
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        result = fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--database-url")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="distillery-ui-bench-"))
    url = args.database_url or f"sqlite:///{tempfile.gettempdir()}/distillery-bench-{args.rows}.db"
    fill(url, args.rows)
    os.environ["DISTILLERY_DATA_DIR"] = str(scratch)
    settings = Settings.model_validate(
        {"storage": {"database_url": url, "data_dir": str(scratch)}, "ui": {"open": True}}
    )
    store = open_store(url)
    app = web.Application()
    mount(app, settings, store)
    base, stop = serve(app)
    rows = []
    try:
        with httpx.Client(base_url=base, timeout=120) as client:

            def page(path: str) -> Callable[[], httpx.Response]:
                def get() -> httpx.Response:
                    answer = client.get(path)
                    answer.raise_for_status()
                    return answer

                return get

            listing = client.get("/ui/completions?tag=app%3Dapp-1").text
            older = re.search(r'<a href="([^"]+)" hx-get', listing)
            first = re.search(r'data-id="([^"]+)"', listing)
            assert older and first, "the list has no rows"
            pages = [
                ("overview, last 24 hours (by the hour)", "/ui/?since=24h"),
                ("overview, last 3 days (by the hour)", "/ui/?since=3d"),
                ("overview, last 7 days", "/ui/?since=7d"),
                ("overview, last 90 days", "/ui/?since=90d"),
                ("completions, no filter (pickers)", "/ui/completions"),
                ("completions, tag app=app-1", "/ui/completions?tag=app%3Dapp-1"),
                (
                    "completions, next page",
                    "/ui/completions" + older.group(1).replace("&amp;", "&"),
                ),
                ("one call", f"/ui/completions/{first.group(1)}"),
            ]
            for label, path in pages:
                ms, answer = timed(page(path))
                rows.append((label, ms, f"{len(answer.content) // 1024} KB"))
        week = parse_filters(since="7d")
        assert parse_when("7d")
        ms, found = timed(lambda: group_stats(store, week, "model"), runs=3)
        rows.append(("reference: stats scan, last 7 days", ms, f"{len(found)} groups"))
    finally:
        stop()
        store.close()
    backend = url.split(":", 1)[0]
    print(
        f"Distillery dashboard: {args.rows:,} stored calls, {backend}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    )
    print(f"{'page (server time over loopback, median)':<44} {'ms':>9}  size")
    print(f"{'-' * 44} {'-' * 9}  {'-' * 8}")
    for label, ms, size in rows:
        print(f"{label:<44} {ms:>9.1f}  {size}")


if __name__ == "__main__":
    main()
