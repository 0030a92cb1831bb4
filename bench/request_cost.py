"""What a call costs the proxy, counted in instructions rather than timed.  Prints a table.

Wall-clock ratios on a small shared VM move by 2x from one run to the next (README,
"Against the floor").  valgrind's callgrind counts the instructions a process executes,
which the same code repeats on the same input to within 0.1% whatever else the machine is
doing, so this bench answers *what each piece costs* exactly where ``proxy_bench.py``
answers *how fast* roughly.  Instructions are not time (a system call or a cache miss
costs more than its count), but a cut that removes instructions removes CPU.

Each target runs under callgrind with counting off; once it answers, counting goes on
for ``--calls`` calls from a raw-asyncio client (another process, not counted), then the
counts are dumped and divided by the calls:

* the floor (``floor_forwarder.py``) and ``distillery proxy --no-capture`` and with
  capture on (the proxy's own process);
* the ladder: ``--no-capture`` with one more piece switched off at each step
  (``ablate.py``), each step's saving in instructions a call;
* the writer: instructions per record it stores, from draining a spool of N records and
  one of 2N (the difference, so that start-up and migrations cancel out).

    python bench/request_cost.py [--calls 1000] [--concurrency 1] [--stream]
                                 [--records 2000] [--batch 64] [--no-ladder]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from ablate import PIECES  # noqa: E402
from proxy_bench import REQUEST_BODY, STREAM_BODY, connect, free_port, request_bytes  # noqa: E402
from stub_upstream import COMPLETION  # noqa: E402

TOTALS = re.compile(rb"^(?:summary|totals): (\d+)", re.M)
COMMAND = re.compile(rb"^cmd: (.*)$", re.M)
# The ladder's steps, cheapest to find first: each switches off one more piece.
LADDER = ("log", "contextvars", "metrics", "tags", "drain", "headers", "timeouts")


async def drive(port: int, payload: bytes, calls: int, concurrency: int) -> None:
    async def one(count: int) -> None:
        connection = await connect(port)
        for _ in range(count):
            await connection.send(payload)
        assert connection.transport is not None
        connection.transport.close()

    share, rest = divmod(calls, concurrency)
    await asyncio.gather(*(one(share + (i < rest)) for i in range(concurrency)))


def callgrind(out: Path, command: list[str], counting: bool) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        f"--instr-atstart={'yes' if counting else 'no'}",
        "--trace-children=yes",
        f"--callgrind-out-file={out}.%p",
        *command,
    ]


def counts(out: Path) -> dict[int, tuple[int, str]]:
    """Instructions by process id, from the dumps of ``out`` (the last part of each)."""
    found: dict[int, tuple[int, str]] = {}
    for path in sorted(out.parent.glob(out.name + ".*")):
        data = path.read_bytes()
        total, command = TOTALS.search(data), COMMAND.search(data)
        if total is None or command is None:
            continue  # still being written
        pid = int(path.name.split(".")[1])
        found[pid] = (int(total.group(1)), command.group(1).decode(errors="replace"))
    return found


def measure_server(
    command: list[str], port: int, payload: bytes, calls: int, concurrency: int, out: Path
) -> int:
    """Instructions a call in the target's main process (its own process only)."""
    target = subprocess.Popen(
        callgrind(out, command, counting=False),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while True:  # until it answers a call (under valgrind a start takes a while)
            if target.poll() is not None:
                sys.exit(f"{command[1]} exited with {target.returncode} under valgrind")
            try:
                asyncio.run(drive(port, payload, 200, concurrency))  # warm: caches, imports
                break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit(f"{command[1]} did not answer under valgrind")
                time.sleep(0.2)
        subprocess.run(
            ["callgrind_control", "-i", "on", str(target.pid)], check=True, capture_output=True
        )
        asyncio.run(drive(port, payload, calls, concurrency))
        subprocess.run(
            ["callgrind_control", "-d", str(target.pid)], check=True, capture_output=True
        )
        dump = out.parent / f"{out.name}.{target.pid}.1"
        deadline = time.monotonic() + 60
        while not (dump.exists() and TOTALS.search(dump.read_bytes())):
            if time.monotonic() > deadline:
                sys.exit(f"callgrind wrote no dump for {command[1]}")
            time.sleep(0.05)
        match = TOTALS.search(dump.read_bytes())
        assert match is not None
        return int(match.group(1)) // calls
    finally:
        os.killpg(target.pid, 15)
        target.wait(60)


def spool_of(directory: Path, records: int) -> None:
    """A spool of ``records`` records as the proxy writes them (the bench's call and the
    stub's answer, redacted and serialised by the proxy's own Capture)."""
    from distillery.core.config import Settings
    from distillery.core.redact import Redactor
    from distillery.proxy.capture import Capture
    from distillery.proxy.spool import new_record_id

    settings = Settings()
    capture = Capture(
        None, directory, settings.capture, Redactor.from_settings(settings.redact.defaults)
    )
    response = orjson.loads(COMPLETION)
    for _ in range(records):
        request = orjson.loads(REQUEST_BODY) | {"store": True, "metadata": {"app": "bench"}}
        capture.submit(
            {
                "id": new_record_id(),
                "completion_id": response["id"],
                "created_at": time.time(),
                "tenant": "bench",
                "upstream": "http://127.0.0.1:1/v1",
                "path": "/v1/chat/completions",
                "model_requested": request["model"],
                "model_served": response["model"],
                "status": 200,
                "stream": False,
                "finish_reason": "stop",
                "prompt_tokens": 40,
                "completion_tokens": 64,
                "total_tokens": 104,
                "latency_ms": 1.5,
                "ttft_ms": None,
                "upstream_request_id": "req_bench",
                "prompt_fingerprint": "fp",
                "request": request,
                "response": response,
                "error": None,
                "metadata": request["metadata"],
            }
        )
    capture.spool.close()


def drain(spool: str, database_url: str, expected: int, batch: int) -> None:
    """(The child under callgrind) store everything in ``spool``, as the writer does, in
    batches of ``batch`` (what one of its rounds finds at a steady rate of calls)."""
    from distillery.core.config import Settings
    from distillery.proxy.writer import Writer
    from distillery.store import open_store

    store = open_store(database_url)
    settings = Settings().capture.model_copy(update={"batch_size": batch})
    writer = Writer(store, Path(spool), settings)
    while not writer.step():
        pass
    if store.count() != expected:
        sys.exit(f"the writer stored {store.count()} of {expected} records")


def measure_writer(records: int, batch: int, tmp: Path) -> int:
    """Instructions per record stored: draining 2N records minus draining N, over N."""
    totals = []
    for n in (records, 2 * records):
        spool = tmp / f"spool-{n}"
        spool_of(spool, n)
        out = tmp / f"writer-{n}"
        child = [
            sys.executable,
            __file__,
            "--drain",
            str(spool),
            f"sqlite:///{tmp}/w{n}.db",
            str(n),
            str(batch),
        ]
        done = subprocess.run(callgrind(out, child, counting=True), capture_output=True)
        if done.returncode != 0:
            sys.exit(f"the writer's drain failed:\n{done.stderr.decode()[-3000:]}")
        [(total, _)] = counts(out).values()
        totals.append(total)
    return (totals[1] - totals[0]) // records


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=1000, help="counted calls per target")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--stream", action="store_true", help="streamed calls")
    parser.add_argument("--records", type=int, default=2000, help="the writer's N")
    parser.add_argument(
        "--batch",
        type=int,
        default=64,
        help="records per writer batch (a round every 50 ms at ~1,300 calls/s finds 64)",
    )
    parser.add_argument("--no-ladder", action="store_true", help="skip the ladder's steps")
    parser.add_argument("--writer-only", action="store_true", help="measure the writer alone")
    parser.add_argument("--drain", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drain:
        drain(args.drain[0], args.drain[1], int(args.drain[2]), int(args.drain[3]))
        return
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("valgrind is not installed: apt-get install valgrind")

    tmp = Path(tempfile.mkdtemp(prefix="request-cost-"))
    stub_port = free_port()
    stub = subprocess.Popen([sys.executable, str(HERE / "stub_upstream.py"), str(stub_port)])
    upstream = f"http://127.0.0.1:{stub_port}/v1"
    payload = request_bytes("/v1/chat/completions", STREAM_BODY if args.stream else REQUEST_BODY)
    rows: list[tuple[str, int]] = []

    def proxy(name: str, ablate: tuple[str, ...] = (), *extra: str) -> None:
        port = free_port()
        os.environ["ABLATE"] = ",".join(ablate)
        command = [
            sys.executable,
            str(HERE / "ablate.py"),
            "proxy",
            "--port",
            str(port),
            "--upstream",
            upstream,
            "--data-dir",
            str(tmp / f"data-{port}"),
            "--database-url",
            f"sqlite:///{tmp}/proxy-{port}.db",
            "--log-json",
            *extra,
        ]
        cost = measure_server(
            command, port, payload, args.calls, args.concurrency, tmp / f"p{port}"
        )
        rows.append((name, cost))
        print(f"  {name}: {cost:,}", file=sys.stderr, flush=True)

    try:
        if not args.writer_only:
            port = free_port()
            floor = [sys.executable, str(HERE / "floor_forwarder.py"), str(port), upstream]
            cost = measure_server(floor, port, payload, args.calls, args.concurrency, tmp / "floor")
            rows.append(("floor (aiohttp forwarder)", cost))
            proxy("distillery --no-capture", (), "--no-capture")
            if not args.no_ladder:
                for step in range(1, len(LADDER) + 1):
                    proxy("  without " + LADDER[step - 1], LADDER[:step], "--no-capture")
            proxy("capture on (proxy process)")
            proxy("  without redaction", ("redaction",))
        writer = measure_writer(args.records, args.batch, tmp)
    finally:
        stub.terminate()
        stub.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    print(
        f"\nInstructions per call (callgrind), {platform.node()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; {args.calls} calls at concurrency "
        f"{args.concurrency}, {'streaming' if args.stream else 'non-streaming'}\n"
    )
    print(f"{'target':<34} {'instructions':>13} {'vs floor':>9} {'step saves':>11}")
    print("-" * 70)
    floor_cost = rows[0][1] if rows else None
    previous = None
    for name, cost in rows:
        saves = f"{previous - cost:>11,}" if name.startswith("  ") and previous else ""
        print(f"{name:<34} {cost:>13,} {cost / rows[0][1]:>8.2f}x {saves}")
        previous = cost
    label = f"writer, per record (batch {args.batch})"
    ratio = f"{writer / floor_cost:>8.2f}x" if floor_cost else ""
    print(f"{label:<34} {writer:>13,} {ratio}")
    print("\nLadder pieces:", "; ".join(f"{name}: {PIECES[name]}" for name in LADDER))


if __name__ == "__main__":
    main()
