"""What does a route cost the client?  Prints a table; numbers go in the README.

Starts two stub upstreams (the teacher and the student: the same canned answer, so
every shadow pair grades 1.0) and four ``distillery proxy`` processes on them: capture
only, twice (A and B, identical: their difference is the machine's noise), a route in
``shadow``, and a route ``on`` (no holdout: the student answers everything).  Each
scenario is driven through the proxies in turn, a slice at a time over several rounds,
so that a machine that drifts (a shared VM does) drifts under all four alike.

    python bench/route_bench.py [--requests 4000] [--rounds 8] [--rate 200]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import sqlalchemy as sa
import uvloop
from proxy_bench import (
    REQUEST_BODY,
    STREAM_BODY,
    fixed_rate,
    free_port,
    pct,
    request_bytes,
    sequential,
    wait_listening,
)

from distillery.proxy.process import start as launch

HERE = Path(__file__).parent
ROUTE = """
[endpoints.student]
base_url = "http://127.0.0.1:{port}/v1"

[routes.bench]
match = {{ model = "gpt-4o-mini" }}
student = "student-model@student"
graders = ["exact"]
bar = 0.9
mode = "{mode}"
holdout = 0
"""


def start_proxy(
    tmp: Path, name: str, teacher: int, config: str | None
) -> tuple[int, subprocess.Popen[bytes]]:
    port = free_port()
    config_file = tmp / f"{name}.toml"
    config_file.write_text(config or "")
    process = launch(
        port,
        f"http://127.0.0.1:{teacher}/v1",
        data_dir=tmp / name,
        database_url=f"sqlite:///{tmp / (name + '.db')}",
        extra=["--config", str(config_file), "--log-json"],
        env={**os.environ, "DISTILLERY_CONFIG": ""},
        log=tmp / f"{name}.log",
    )
    wait_listening(port, process, name)
    return port, process


def graded_pairs(tmp: Path, name: str) -> int:
    engine = sa.create_engine(f"sqlite:///{tmp / (name + '.db')}")
    with engine.connect() as conn:
        count = conn.execute(sa.text("SELECT count(*) FROM route_samples")).scalar_one()
    engine.dispose()
    return int(count)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--requests", type=int, default=4000, help="sequential, per proxy and scenario"
    )
    parser.add_argument("--rounds", type=int, default=8, help="slices each proxy's run is cut in")
    parser.add_argument("--rate", type=float, default=200, help="requests/second under load")
    parser.add_argument("--seconds", type=float, default=8, help="per proxy, at --rate")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="distillery-route-bench-"))
    stubs = []
    for _ in range(2):
        port = free_port()
        stub = subprocess.Popen([sys.executable, str(HERE / "stub_upstream.py"), str(port)])
        wait_listening(port, stub, "stub")
        stubs.append((port, stub))
    (teacher, _), (student, _) = stubs
    proxies = {
        "capture only (A)": start_proxy(tmp, "capture", teacher, None),
        "capture only (B)": start_proxy(tmp, "capture-b", teacher, None),
        "route in shadow": start_proxy(
            tmp, "shadow", teacher, ROUTE.format(port=student, mode="shadow")
        ),
        "route on": start_proxy(tmp, "on", teacher, ROUTE.format(port=student, mode="on")),
    }
    chat = "/v1/chat/completions"
    scenarios = {
        "non-streaming, c=1": (request_bytes(chat, REQUEST_BODY), "total", None),
        "streaming TTFB, c=1": (request_bytes(chat, STREAM_BODY), "first", None),
        f"non-streaming, {args.rate:.0f} req/s": (
            request_bytes(chat, REQUEST_BODY),
            "total",
            args.rate,
        ),
    }
    results: dict[str, list[tuple[str, float, float]]] = {}
    per_round = max(1, args.requests // args.rounds)
    try:
        for label, (payload, key, rate) in scenarios.items():
            values: dict[str, list[float]] = {name: [] for name in proxies}
            for _ in range(args.rounds):
                for name, (port, _) in proxies.items():
                    if rate is None:
                        sample = uvloop.run(sequential(port, payload, per_round))
                    else:
                        sample = uvloop.run(
                            fixed_rate(port, payload, rate, args.seconds / args.rounds)
                        )
                    values[name].extend(getattr(sample, key))
            results[label] = [
                (name, pct(taken, 50), pct(taken, 99)) for name, taken in values.items()
            ]
    finally:
        for _, process in proxies.values():
            process.send_signal(signal.SIGTERM)
            process.wait(60)
        for _, stub in stubs:
            stub.terminate()
            stub.wait()
    print(
        f"\nDistillery route benchmark: {platform.node()}, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"SQLite; per proxy and scenario: {args.requests} sequential requests, or "
        f"{args.seconds:g} s at {args.rate:g} req/s; in {args.rounds} interleaved rounds"
    )
    print(f"{'scenario (ms, p50 / p99)':<28}  {'proxy':<18}  {'p50 / p99':>17}  vs capture (A)")
    print(f"{'-' * 28}  {'-' * 18}  {'-' * 17}  {'-' * 17}")
    for label, runs in results.items():
        base50, base99 = runs[0][1], runs[0][2]
        for name, p50, p99 in runs:
            print(
                f"{label:<28}  {name:<18}  {p50:>7.3f} / {p99:>7.3f}  "
                f"{p50 - base50:+7.3f} / {p99 - base99:+7.3f}"
            )
    print(
        f"\ngraded shadow pairs: {graded_pairs(tmp, 'shadow'):,} (route in shadow); "
        f"{graded_pairs(tmp, 'on'):,} (route on, no holdout: none expected)"
    )


if __name__ == "__main__":
    main()
