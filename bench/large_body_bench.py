"""Does one large request hold up everyone else?  Prints a table; numbers go in the README.

Starts the stub upstream and ``distillery proxy`` (capture on, SQLite), keeps one client
sending small chat completions back to back, and sends one large request (a prompt of
ordinary words with some e-mail addresses to redact) from a second connection.  Reported:
the small calls' p50 before the large one, and the slowest small call while the large one
was in flight -- how long the event loop was held.

``--before DIR`` runs the same measurement, in the same run, against another version of
the package (``DIR/distillery``, e.g. a symlink to a ``git worktree`` of an older commit),
so the two are compared side by side on one machine.

    python bench/large_body_bench.py [--mb 20 --mb 80] [--before /tmp/oldpkg]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson
from proxy_bench import HERE, connect, free_port, pct, request_bytes, spawn_proxy, wait_listening

CHAT = "/v1/chat/completions"
SMALL = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


def large_body(megabytes: float) -> bytes:
    rng = random.Random(7)
    words = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)
    ]
    words += [f"user{i}@example.com" for i in range(50)]
    target = int(megabytes * 1024 * 1024)
    text = " ".join(rng.choices(words, k=target // 6))[:target]
    return orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]})


async def measure(port: int, big: bytes) -> tuple[float, float, float]:
    """(small p50 before, slowest small call during the large one, the large one's time), ms."""
    small = request_bytes(CHAT, SMALL)
    probe = await connect(port)
    baseline = []
    for _ in range(300):
        baseline.append((await probe.send(small))[1])
    loader = await connect(port)
    started = time.perf_counter()
    pending = asyncio.ensure_future(loader.send(request_bytes(CHAT, big)))
    during = []
    while not pending.done():
        during.append((await probe.send(small))[1])
    took = time.perf_counter() - started
    await pending
    for connection in (probe, loader):
        assert connection.transport is not None
        connection.transport.close()
    return pct(baseline, 50), max(during) * 1000, took * 1000  # pct() is in ms already


def run_one(
    label: str, pythonpath: str | None, stub_port: int, sizes: list[float], tmp: Path
) -> list[tuple[str, ...]]:
    import uvloop

    port = free_port()
    proxy = spawn_proxy(
        port,
        f"http://127.0.0.1:{stub_port}/v1",
        tmp / label,
        f"sqlite:///{tmp / label}.db",
        tmp / f"{label}.log",
        pythonpath=pythonpath,
    )
    rows = []
    try:
        wait_listening(port, proxy, f"proxy ({label})")
        for megabytes in sizes:
            p50, worst, took = uvloop.run(measure(port, large_body(megabytes)))
            rows.append((label, f"{megabytes:g} MB", f"{p50:.2f}", f"{worst:.0f}", f"{took:.0f}"))
    finally:
        proxy.terminate()
        proxy.wait(60)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--mb", type=float, action="append", help="large body size (repeatable; default 20)"
    )
    parser.add_argument(
        "--before", help="a directory holding another version's `distillery` package"
    )
    args = parser.parse_args()
    sizes = args.mb or [20.0]
    tmp = Path(tempfile.mkdtemp(prefix="distillery-large-"))
    stub_port = free_port()
    stub = subprocess.Popen([sys.executable, str(HERE / "stub_upstream.py"), str(stub_port)])
    rows: list[tuple[str, ...]] = []
    try:
        wait_listening(stub_port, stub, "stub")
        if args.before:
            rows += run_one("before", args.before, stub_port, sizes, tmp)
        rows += run_one("this version", None, stub_port, sizes, tmp)
    finally:
        stub.terminate()
        stub.wait(10)
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    header = (
        "version",
        "large body",
        "small p50 before (ms)",
        "slowest small during (ms)",
        "large call (ms)",
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
