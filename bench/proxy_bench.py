"""How much does the capture proxy cost?  Prints a table; numbers go in the README.

Starts the stub upstream and ``distillery proxy`` (capture on, SQLite by default)
as separate processes and drives both with a raw-asyncio HTTP/1.1 client, so the
same run measures the stub directly and through the proxy:

* added latency (p50/p99) at concurrency 1, non-streaming and streaming
  (time to first body byte), and at a fixed request rate;
* the maximum sustained request rate through the proxy with capture on;
* captured rows in the database vs chat requests sent (must be equal);
* against the floor (``floor_forwarder.py``: a minimal aiohttp + uvloop forwarder, no
  capture), in the same run: requests/s and p50 at c=1 and c=32 and p50/p99 at a fixed
  rate, streaming and not, for the proxy without capture, with capture on SQLite (1 and 2
  workers) and on Postgres (with ``--postgres-url``), each as a ratio to the floor, and
  each target's RSS (its processes together: workers, the writer) at the end.
  The targets take turns, a slice at a time over several rounds, so a machine that
  drifts drifts under all alike;
* with ``--rss-requests N``, RSS of proxy + writer every N/10 calls over N calls;
* with ``--stalled-writer``, c=1 latency with the writer running and stopped (SIGSTOP).

    python bench/proxy_bench.py [--requests 2000] [--rate 500] [--seconds 10]
                                [--concurrency 64] [--database-url URL]
                                [--floor-rounds 4] [--postgres-url URL]
                                [--rss-requests 100000] [--stalled-writer]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from distillery.proxy import process

HERE = Path(__file__).parent

REQUEST_BODY = orjson.dumps(
    {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are a geography tutor. Answer in one sentence."},
            {"role": "user", "content": "What is the capital of France? Reply to me@example.com"},
        ],
        "temperature": 0.2,
    }
)
STREAM_BODY = orjson.dumps({**orjson.loads(REQUEST_BODY), "stream": True})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def request_bytes(path: str, body: bytes) -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer sk-bench\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
        % (path.encode(), len(body), body)
    )


class Connection(asyncio.Protocol):
    """One keep-alive connection; ``send`` resolves to (time to first body byte, total)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[tuple[float, float]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def send(self, payload: bytes) -> asyncio.Future[tuple[float, float]]:
        self.buffer = b""
        self.head_end = -1
        self.first = 0.0
        self.started = time.perf_counter()
        self.waiter = asyncio.get_running_loop().create_future()
        assert self.transport is not None
        self.transport.write(payload)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.head_end == -1:
            self.head_end = self.buffer.find(b"\r\n\r\n")
            if self.head_end == -1:
                return
            head = self.buffer[: self.head_end].lower()
            self.status = int(head[9:12])
            start = head.find(b"content-length:")
            self.length = (
                int(
                    head[
                        start + 15 : head.find(b"\r\n", start)
                        if head.find(b"\r\n", start) != -1
                        else None
                    ]
                )
                if start != -1
                else None
            )
        if not self.first and len(self.buffer) > self.head_end + 4:
            self.first = time.perf_counter()
        body_len = len(self.buffer) - self.head_end - 4
        done = (
            body_len >= self.length
            if self.length is not None
            else self.buffer.endswith(b"\r\n0\r\n\r\n")
        )
        if done and self.waiter is not None and not self.waiter.done():
            if self.status != 200:
                self.waiter.set_exception(
                    RuntimeError(f"HTTP {self.status}: {self.buffer[:300]!r}")
                )
            else:
                now = time.perf_counter()
                self.waiter.set_result((self.first - self.started, now - self.started))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost: {exc}"))


async def connect(port: int) -> Connection:
    _, protocol = await asyncio.get_running_loop().create_connection(Connection, "127.0.0.1", port)
    return protocol


@dataclass
class Sample:
    first: list[float] = field(default_factory=list)
    total: list[float] = field(default_factory=list)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] * 1000


async def sequential(port: int, payload: bytes, n: int) -> Sample:
    conn = await connect(port)
    sample = Sample()
    for _ in range(200):  # warm-up
        await conn.send(payload)
    for _ in range(n):
        first, total = await conn.send(payload)
        sample.first.append(first)
        sample.total.append(total)
    conn.transport.close()  # type: ignore[union-attr]
    return sample


async def fixed_rate(port: int, payload: bytes, rate: float, seconds: float) -> Sample:
    """Open loop: request i is due at i/rate; latency counts from when it was due."""
    pool: asyncio.Queue[Connection] = asyncio.Queue()
    for _ in range(64):
        pool.put_nowait(await connect(port))
    sample = Sample()
    start = time.perf_counter() + 0.05

    async def one(due: float) -> None:
        conn = await pool.get()
        wait = due - time.perf_counter()
        _, total = await conn.send(payload)
        sample.total.append(total + max(0.0, -wait))
        pool.put_nowait(conn)

    tasks = []
    for i in range(int(rate * seconds)):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(due)))
    await asyncio.gather(*tasks)
    while not pool.empty():
        pool.get_nowait().transport.close()  # type: ignore[union-attr]
    return sample


async def saturate(
    port: int, payload: bytes, concurrency: int, seconds: float
) -> tuple[int, float]:
    conns = [await connect(port) for _ in range(concurrency)]
    deadline = time.perf_counter() + seconds
    count = 0

    async def worker(conn: Connection) -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            await conn.send(payload)
            count += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in conns))
    elapsed = time.perf_counter() - started
    for conn in conns:
        conn.transport.close()  # type: ignore[union-attr]
    return count, count / elapsed


def spawn_proxy(
    port: int,
    upstream: str,
    data_dir: Path,
    database_url: str,
    log: Path,
    *extra: str,
    pythonpath: str | None = None,
) -> subprocess.Popen[bytes]:
    """``distillery proxy`` as the benches run it (``pythonpath``: another version's package)."""
    env = {**os.environ, "DISTILLERY_CONFIG": ""}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    log.unlink(missing_ok=True)
    return process.start(
        port,
        upstream,
        data_dir=data_dir,
        database_url=database_url,
        extra=["--log-json", *extra],
        env=env,
        log=log,
    )


def wait_listening(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{what} exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    sys.exit(f"{what} did not start")


def count_rows(database_url: str) -> int:
    from distillery.store import open_store

    store = open_store(database_url)
    try:
        return store.count()
    finally:
        store.close()


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and every process under it (workers, the writer)."""
    children = _children()
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            status = Path(f"/proc/{current}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def rss_over(stub_port: int, tmp: Path, requests: int, every: int) -> list[str]:
    """RSS of proxy + writer (capture on SQLite) every ``every`` calls over ``requests``."""
    import uvloop

    port = free_port()
    url = f"sqlite:///{tmp / 'rss.db'}"
    proc = spawn_proxy(
        port, f"http://127.0.0.1:{stub_port}/v1", tmp / "rss-data", url, tmp / "rss.log"
    )
    samples: list[tuple[int, int]] = []
    payload = request_bytes("/v1/chat/completions", REQUEST_BODY)
    stream = request_bytes("/v1/chat/completions", STREAM_BODY)
    try:
        wait_listening(port, proc, "proxy (RSS)")
        done = 0
        while done < requests:
            uvloop.run(counted(port, (payload, stream), 32, every))
            done += every
            samples.append((done, tree_rss(proc.pid)))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    stored = count_rows(url)
    lines = [f"\nRSS of proxy + writer, capture on SQLite, c=32, half streamed ({stored:,} stored)"]
    lines.append(f"{'requests':>10} {'RSS MB':>8}")
    lines += [f"{n:>10,} {rss / 2**20:>8.1f}" for n, rss in samples]
    base = samples[min(1, len(samples) - 1)][1]
    lines.append(f"last / after the first {every:,}: {samples[-1][1] / base:.2f}")
    if stored != requests:
        lines.append(f"LOST: {requests - stored} of {requests} not stored")
    return lines


def stalled_writer(stub_port: int, tmp: Path, requests: int) -> list[str]:
    """p50/p99 at c=1 with the writer running, then with it stopped (SIGSTOP): the proxy
    must not feel it (the spool grows instead), and every call is stored once it moves."""
    import uvloop

    port = free_port()
    url = f"sqlite:///{tmp / 'stalled.db'}"
    proc = spawn_proxy(
        port, f"http://127.0.0.1:{stub_port}/v1", tmp / "stalled-data", url, tmp / "stalled.log"
    )
    payload = request_bytes("/v1/chat/completions", REQUEST_BODY)
    lines = ["\nThe writer stalled (SIGSTOP), capture on SQLite, c=1 (ms)"]
    try:
        wait_listening(port, proc, "proxy (stalled writer)")
        writer = writer_pid(port)
        for label, stop in (("writer running", False), ("writer stopped", True)):
            if stop:
                os.kill(writer, signal.SIGSTOP)
            sample = uvloop.run(sequential(port, payload, requests))
            lines.append(
                f"{label:<16} p50 {pct(sample.total, 50):.3f}  p99 {pct(sample.total, 99):.3f}"
            )
        os.kill(writer, signal.SIGCONT)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    sent, stored = 2 * (requests + 200), count_rows(url)
    lines.append(f"stored after it moved again: {stored:,} of {sent:,}")
    return lines


def writer_pid(port: int) -> int:
    """The proxy's writer process, as /healthz names it once it runs."""
    import urllib.request

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz") as answer:
            pid = orjson.loads(answer.read())["capture"]["writer_pid"]
        if pid:
            return int(pid)
        time.sleep(0.1)
    sys.exit("the writer did not start")


def _children() -> dict[int, list[int]]:
    """Every process's children, by its pid."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    return children


async def counted(port: int, payloads: tuple[bytes, ...], concurrency: int, n: int) -> None:
    """Exactly ``n`` requests over ``concurrency`` connections, taking turns at ``payloads``."""
    conns = [await connect(port) for _ in range(concurrency)]
    left = n

    async def worker(conn: Connection) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await conn.send(payloads[left % len(payloads)])

    await asyncio.gather(*(worker(c) for c in conns))
    for conn in conns:
        conn.transport.close()  # type: ignore[union-attr]


FLOOR_SCENARIOS = (
    ("non-streaming", False),
    ("streaming", True),
)


def against_floor(
    stub_port: int,
    tmp: Path,
    rounds: int,
    requests: int,
    seconds: float,
    postgres: str | None,
    rate: float,
) -> list[str]:
    """The proxy's throughput and p50 as ratios to the floor's, measured side by side."""
    import uvloop

    upstream = f"http://127.0.0.1:{stub_port}/v1"
    targets: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
    port = free_port()
    targets["floor (aiohttp forwarder)"] = (
        port,
        subprocess.Popen([sys.executable, str(HERE / "floor_forwarder.py"), str(port), upstream]),
    )
    variants = [
        ("distillery --no-capture", f"sqlite:///{tmp / 'floor-none.db'}", ["--no-capture"]),
        ("capture, SQLite", f"sqlite:///{tmp / 'floor-1.db'}", []),
        ("capture, SQLite, --workers 2", f"sqlite:///{tmp / 'floor-2.db'}", ["--workers", "2"]),
    ]
    if postgres:
        variants.append(("capture, Postgres", postgres, []))
    for label, url, extra in variants:
        port = free_port()
        data = tmp / f"data-{port}"
        targets[label] = (port, spawn_proxy(port, upstream, data, url, tmp / f"{port}.log", *extra))
    try:
        for label, (port, proc) in targets.items():
            wait_listening(port, proc, label)
        results: dict[tuple[str, str, int], list[float]] = {}
        counts: dict[tuple[str, str, int], tuple[int, float]] = {}
        chat = "/v1/chat/completions"
        for _ in range(rounds):
            for scenario, stream in FLOOR_SCENARIOS:
                payload = request_bytes(chat, STREAM_BODY if stream else REQUEST_BODY)
                for label, (port, _) in targets.items():
                    one = uvloop.run(sequential(port, payload, requests // rounds))
                    results.setdefault((label, scenario, 1), []).extend(one.total)
                    n, _rate = uvloop.run(saturate(port, payload, 32, seconds / rounds))
                    done, spent = counts.get((label, scenario, 32), (0, 0.0))
                    counts[label, scenario, 32] = (done + n, spent + seconds / rounds)
                    paced = uvloop.run(fixed_rate(port, payload, rate, seconds / rounds))
                    results.setdefault((label, scenario, 0), []).extend(paced.total)
        rss = {label: tree_rss(proc.pid) for label, (_, proc) in targets.items()}
    finally:
        for _, proc in targets.values():
            proc.send_signal(signal.SIGTERM)
        for _, proc in targets.values():
            proc.wait(60)
    floor = next(iter(targets))
    header = f"{'target':<30} {'scenario':<14} {'c=1 req/s':>10} {'ratio':>6} "
    header += f"{'c=1 p50 ms':>11} {'ratio':>6} {'c=32 req/s':>11} {'ratio':>6} "
    header += f"{f'{rate:.0f}/s p50':>10} {'ratio':>6} {'p99 ms':>7} {'RSS MB':>7}"
    lines = [f"\nAgainst the floor, {rounds} rounds (ratio: the floor's = 1.00)", header]
    lines.append("-" * len(header))
    for scenario, _ in FLOOR_SCENARIOS:
        base_lat = results[floor, scenario, 1]
        base_rps1 = len(base_lat) / sum(base_lat)
        base_p50 = pct(base_lat, 50)
        n, spent = counts[floor, scenario, 32]
        base_rps32 = n / spent
        base_paced = pct(results[floor, scenario, 0], 50)
        for label in targets:
            lat = results[label, scenario, 1]
            rps1, p50 = len(lat) / sum(lat), pct(lat, 50)
            n, spent = counts[label, scenario, 32]
            rps32 = n / spent
            paced = results[label, scenario, 0]
            lines.append(
                f"{label:<30} {scenario:<14} {rps1:>10,.0f} {rps1 / base_rps1:>6.2f} "
                f"{p50:>11.3f} {p50 / base_p50:>6.2f} {rps32:>11,.0f} {rps32 / base_rps32:>6.2f} "
                f"{pct(paced, 50):>10.3f} {pct(paced, 50) / base_paced:>6.2f} "
                f"{pct(paced, 99):>7.2f} {rss[label] / 2**20:>7.0f}"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--requests", type=int, default=2000, help="sequential requests per scenario"
    )
    parser.add_argument(
        "--rate", type=float, default=500, help="requests/second for the fixed-rate run"
    )
    parser.add_argument("--seconds", type=float, default=10, help="length of the saturation run")
    parser.add_argument(
        "--concurrency", type=int, default=64, help="connections for the saturation run"
    )
    parser.add_argument("--database-url", help="default: a SQLite file in a temp dir")
    parser.add_argument(
        "--floor-rounds", type=int, default=4, help="rounds against the floor (0: skip it)"
    )
    parser.add_argument("--postgres-url", help="also measure capture on this Postgres")
    parser.add_argument(
        "--stalled-writer",
        action="store_true",
        help="also measure c=1 latency with the writer process stopped (SIGSTOP)",
    )
    parser.add_argument(
        "--rss-requests",
        type=int,
        default=0,
        help="also send this many calls (100000 for the README) and print RSS as they go",
    )
    parser.add_argument(
        "--proxy-arg",
        action="append",
        default=[],
        help="extra flag for `distillery proxy` (repeatable)",
    )
    args = parser.parse_args()

    import uvloop

    tmp = Path(tempfile.mkdtemp(prefix="distillery-bench-"))
    database_url = args.database_url or f"sqlite:///{tmp / 'bench.db'}"
    stub_port, proxy_port = free_port(), free_port()
    stub = subprocess.Popen([sys.executable, str(HERE / "stub_upstream.py"), str(stub_port)])
    wait_listening(stub_port, stub, "stub")
    proxy = spawn_proxy(
        proxy_port,
        f"http://127.0.0.1:{stub_port}/v1",
        tmp / "data",
        database_url,
        tmp / "proxy.log",
        *args.proxy_arg,
    )
    wait_listening(proxy_port, proxy, "proxy")
    chat = "/v1/chat/completions"
    json_req, sse_req = request_bytes(chat, REQUEST_BODY), request_bytes(chat, STREAM_BODY)
    sent_through_proxy = 0
    rows: list[tuple[str, str, str, str]] = []
    try:
        run = uvloop.run
        for label, payload in (("non-streaming, c=1", json_req), ("streaming TTFB, c=1", sse_req)):
            direct = run(sequential(stub_port, payload, args.requests))
            proxied = run(sequential(proxy_port, payload, args.requests))
            sent_through_proxy += args.requests + 200
            key = "first" if "TTFB" in label else "total"
            d, p = getattr(direct, key), getattr(proxied, key)
            rows.append(
                (
                    label,
                    f"{pct(d, 50):.3f} / {pct(d, 99):.3f}",
                    f"{pct(p, 50):.3f} / {pct(p, 99):.3f}",
                    f"{pct(p, 50) - pct(d, 50):.3f} / {pct(p, 99) - pct(d, 99):.3f}",
                )
            )
        direct = run(fixed_rate(stub_port, json_req, args.rate, 5))
        proxied = run(fixed_rate(proxy_port, json_req, args.rate, 5))
        sent_through_proxy += int(args.rate * 5)
        rows.append(
            (
                f"non-streaming, {args.rate:.0f} req/s",
                f"{pct(direct.total, 50):.3f} / {pct(direct.total, 99):.3f}",
                f"{pct(proxied.total, 50):.3f} / {pct(proxied.total, 99):.3f}",
                f"{pct(proxied.total, 50) - pct(direct.total, 50):.3f} / "
                f"{pct(proxied.total, 99) - pct(direct.total, 99):.3f}",
            )
        )
        _direct_n, direct_rps = run(saturate(stub_port, json_req, args.concurrency, 3))
        proxy_n, proxy_rps = run(saturate(proxy_port, json_req, args.concurrency, args.seconds))
        sent_through_proxy += proxy_n
    finally:
        proxy.send_signal(signal.SIGTERM)
        proxy.wait(60)
    floor: list[str] = []
    try:
        if args.floor_rounds:
            floor = against_floor(
                stub_port,
                tmp,
                args.floor_rounds,
                args.requests,
                args.seconds,
                args.postgres_url,
                args.rate,
            )
        if args.rss_requests:
            floor += rss_over(stub_port, tmp, args.rss_requests, max(args.rss_requests // 10, 1))
        if args.stalled_writer:
            floor += stalled_writer(stub_port, tmp, args.requests)
    finally:
        stub.terminate()
        stub.wait()
    captured = count_rows(database_url)

    print(
        f"\nDistillery proxy benchmark: {platform.node()}, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"{database_url.split(':')[0]}"
    )
    widths = (26, 20, 20, 20)
    header = ("scenario (ms, p50 / p99)", "stub direct", "through proxy", "added by proxy")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=False)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)))
    print(
        f"\nmax sustained rate, c={args.concurrency}: stub direct {direct_rps:,.0f} req/s, "
        f"through proxy with capture {proxy_rps:,.0f} req/s over {args.seconds:.0f} s"
    )
    print("\n".join(floor))
    if "--no-capture" in args.proxy_arg:
        return
    lost = sent_through_proxy - captured
    print(f"captured rows: {captured:,} of {sent_through_proxy:,} chat requests sent ({lost} lost)")
    if lost:
        sys.exit(1)


if __name__ == "__main__":
    main()
