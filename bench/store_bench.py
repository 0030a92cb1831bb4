"""How fast are the store's queries on a million captured calls?  Prints a table.

Fills a database with N synthetic records (once: an existing database that
already holds N rows is reused), then times the queries behind
``completions list --tag k=v -n 20``, the API list with one metadata filter,
full-text search and ``stats``, plus the whole CLI commands with Python
start-up included.

    python bench/store_bench.py [--rows 1000000] [--database-url URL]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distillery.store import open_store
from distillery.store.query import Filters, count, find, parse_filters
from distillery.store.stats import aggregate_stats, group_stats

WORDS = tuple(
    "refund order invoice shipping delay account password reset billing card charge "
    "subscription cancel upgrade plan discount coupon address delivery tracking warehouse "
    "return exchange size colour damaged missing late early thanks please".split(" ")
)
APPS = [f"app-{i}" for i in range(20)]
MODELS = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "o4-mini"]
TENANTS = [f"key-{i:016x}" for i in range(5)]
T0 = time.time() - 90 * 86400


def record(i: int, rng: random.Random) -> dict[str, Any]:
    app = APPS[int(rng.paretovariate(1.2)) % len(APPS)]
    model = MODELS[i % len(MODELS)]
    fp = f"{rng.randrange(50):012x}"
    user = " ".join(rng.choices(WORDS, k=25))
    answer = " ".join(rng.choices(WORDS, k=30))
    metadata = {"app": app, "env": rng.choice(["prod", "prod", "prod", "staging"]), "prompt_fp": fp}
    if rng.random() < 0.001:
        metadata["quality"] = "approved"
    error = {"error": {"message": "rate limited"}} if rng.random() < 0.02 else None
    return {
        "id": f"cap_{int((T0 + i * 7.776) * 1e9):016x}{i:012x}",
        "completion_id": f"chatcmpl-{i:012d}",
        "created_at": T0 + i * 7.776,  # a million calls over 90 days
        "tenant": TENANTS[i % len(TENANTS)],
        "upstream": "https://api.openai.com/v1",
        "path": "/v1/chat/completions",
        "model_requested": model,
        "model_served": model + "-2025-01-01",
        "status": 429 if error else 200,
        "stream": i % 3 == 0,
        "finish_reason": None if error else "stop",
        "prompt_tokens": rng.randrange(50, 800),
        "completion_tokens": rng.randrange(10, 400),
        "total_tokens": 0,
        "latency_ms": rng.lognormvariate(6.5, 0.6),
        "ttft_ms": None,
        "upstream_request_id": f"req_{i}",
        "prompt_fingerprint": fp,
        "request": {
            "model": model,
            "messages": [
                {"role": "system", "content": f"You are assistant {fp}. Be brief."},
                {"role": "user", "content": user},
            ],
        },
        "response": None
        if error
        else {
            "id": f"chatcmpl-{i:012d}",
            "object": "chat.completion",
            "created": int(T0),
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150},
        },
        "error": error,
        "metadata": metadata,
    }


def fill(url: str, rows: int) -> None:
    store = open_store(url)
    have = store.count()
    if have >= rows:
        print(f"reusing {have:,} rows in {store.url}", file=sys.stderr)
        return
    rng = random.Random(have)
    started = time.perf_counter()
    batch = 5000
    for start in range(have, rows, batch):
        store.insert(record(i, rng) for i in range(start, min(rows, start + batch)))
        if sys.stderr.isatty():
            print(f"\r{start + batch:,} / {rows:,}", end="", file=sys.stderr)
    print(
        f"\ninserted {rows - have:,} rows in {time.perf_counter() - started:.0f} s", file=sys.stderr
    )
    store.close()


def timed(fn: Callable[[], Any], runs: int = 5) -> tuple[float, Any]:
    fn()  # warm the cache, as a second command would find it
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000, result


def cli(url: str, *args: str) -> Callable[[], Any]:
    command = [sys.executable, "-m", "distillery", "completions", *args, "--database-url", url]
    return lambda: subprocess.run(command, check=True, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--database-url", help="default: a SQLite file in the temp dir")
    args = parser.parse_args()
    url = (
        args.database_url
        or f"sqlite:///{Path(tempfile.gettempdir()) / f'distillery-store-bench-{args.rows}.db'}"
    )
    fill(url, args.rows)
    store = open_store(url)
    common = Filters(tags=(("app", "app-1"),))
    rare = Filters(tags=(("quality", "approved"),))
    api = Filters(tags=(("app", "app-1"),), tenants=(TENANTS[2],), completions_only=True)
    week = parse_filters(since="7d")  # starts within a day: whole days plus a scanned part
    rows = [
        ("list --tag app=app-1 -n 20 (query)", *timed(lambda: find(store, common, limit=20))),
        (
            "list --tag quality=approved -n 20 (rare tag)",
            *timed(lambda: find(store, rare, limit=20)),
        ),
        (
            "API list metadata[app]=app-1, one tenant",
            *timed(lambda: find(store, api, order="asc", limit=21)),
        ),
        (
            "API list, page 2 (after=...)",
            *timed(
                lambda: find(
                    store,
                    api,
                    order="asc",
                    limit=21,
                    after=find(store, api, order="asc", limit=21)[-1]["id"],
                )
            ),
        ),
        (
            "list -q 'refund invoice' -n 20",
            *timed(lambda: find(store, Filters(text="refund invoice"), limit=20)),
        ),
        (
            "count --tag env=staging",
            *timed(lambda: count(store, Filters(tags=(("env", "staging"),))), runs=3),
        ),
        (
            "stats --by model --exact (scan)",
            *timed(lambda: group_stats(store, Filters(), "model"), runs=3),
        ),
        (
            "stats --by model (aggregates)",
            *timed(lambda: aggregate_stats(store, Filters(), "model"), runs=3),
        ),
        (
            "stats --by tag:app --since 7d (aggregates)",
            *timed(lambda: aggregate_stats(store, week, "tag:app"), runs=3),
        ),
        (
            "CLI: distillery --help",
            *timed(
                lambda: subprocess.run(
                    [sys.executable, "-m", "distillery", "--help"], check=True, capture_output=True
                ),
                runs=3,
            ),
        ),
        (
            "CLI: completions --tag app=app-1 -n 20",
            *timed(cli(url, "--tag", "app=app-1", "-n", "20"), runs=3),
        ),
        ("CLI: completions stats --exact", *timed(cli(url, "stats", "--exact"), runs=3)),
        ("CLI: completions stats", *timed(cli(url, "stats"), runs=3)),
    ]
    total = store.count()
    print(
        f"\nDistillery store benchmark: {total:,} rows, {store.engine.dialect.name}, "
        f"{platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()} "
        "(median ms, warm cache)"
    )
    print(f"{'operation':<48}  {'ms':>9}  result")
    print(f"{'-' * 48}  {'-' * 9}  {'-' * 20}")
    for name, ms, result in rows:
        shown = (
            f"{len(result)} rows"
            if isinstance(result, list)
            else ("ok" if not isinstance(result, int) else result)
        )
        print(f"{name:<48}  {ms:>9.1f}  {shown}")


if __name__ == "__main__":
    main()
