"""The end-to-end proof: captured traffic in, a fine-tuned student that matches the teacher out.

Runs offline on a CPU (needs the training extra: pip install torch==2.13.0 -e '.[train]'):

1. a teacher (a local OpenAI-compatible server that extracts ticket fields perfectly);
2. an app sending tickets with the real openai SDK through the real proxy;
3. `distillery dataset build` and `distillery student create`: a small student made from
   scratch, with a tokenizer trained on the dataset's text (nothing is downloaded);
4. `distillery distill` with its default settings: baseline of the teacher and the untrained
   student, a local fine-tune (the trainer picks full training for a student made from
   scratch and stops at the best epoch), `distillery serve`, the final eval.

With network access, `--student-base` of `distill` takes any hub model instead.

    python examples/ticket_extraction/run.py [--tickets 300] [--seed 0]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import openai
from aiohttp import web

from distillery.proxy import process

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from task import SYSTEM, teacher_app, tickets  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_teacher(port: int) -> None:
    loop = asyncio.new_event_loop()

    async def start() -> None:
        runner = web.AppRunner(teacher_app(), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()

    loop.run_until_complete(start())
    threading.Thread(target=loop.run_forever, daemon=True).start()


def wait(url: str, tries: int = 200) -> None:
    for _ in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


def run_command(env: dict[str, str], database: str, *command: str) -> str:
    """``distillery COMMAND --database-url DATABASE``; what it printed."""
    done = subprocess.run(
        [sys.executable, "-m", "distillery", *command, "--database-url", database],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return done.stdout


def start_proxy(
    port: int, teacher_url: str, database: str, env: dict[str, str], *flags: str
) -> subprocess.Popen[bytes]:
    """`distillery proxy` in front of the teacher, ready to take calls."""
    proxy = process.start(
        port,
        teacher_url,
        database_url=database,
        extra=["--no-access-log", *flags],
        env=env,
    )
    process.wait_ready(port, proxy)
    return proxy


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tickets", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0, help="the student's and the training's")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    import importlib.util

    if importlib.util.find_spec("trl") is None or importlib.util.find_spec("torch") is None:
        raise SystemExit(
            "This example trains a model and needs the training extra:\n"
            "    pip install torch==2.13.0 -e '.[train]'"
        )
    work = args.workdir or Path(tempfile.mkdtemp(prefix="distillery-example-"))
    env = {**os.environ, "DISTILLERY_DATA_DIR": str(work / "data"), "OPENAI_API_KEY": "sk-example"}
    database = f"sqlite:///{work / 'data' / 'distillery.db'}"

    teacher_port, proxy_port = free_port(), free_port()
    serve_teacher(teacher_port)
    teacher_url = f"http://127.0.0.1:{teacher_port}/v1"
    proxy = start_proxy(proxy_port, teacher_url, database, env)
    app = openai.OpenAI(
        base_url=f"http://127.0.0.1:{proxy_port}/v1",
        api_key="sk-example",
        default_headers={"X-Distillery-Tag-app": "tickets"},
    )
    texts = tickets(args.tickets, seed=1)
    for ticket in texts:
        app.chat.completions.create(
            model="teacher-model",
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": ticket}],
        )
    app.close()
    proxy.send_signal(signal.SIGTERM)
    proxy.wait(60)

    distillery = functools.partial(run_command, env, database)

    student = work / "student"
    distillery("dataset", "build", "tickets", "--tag", "app=tickets")
    distillery("student", "create", str(student), "--dataset", "tickets", "--seed", str(args.seed))
    command = [
        sys.executable,
        "-m",
        "distillery",
        "distill",
        "--name",
        "tickets",
        "--tag",
        "app=tickets",
        "--teacher",
        "teacher-model",
        "--base-url",
        teacher_url,
        "--api-key-env",
        "OPENAI_API_KEY",
        "--student-base",
        str(student),
        "--backend",
        "local",
        "--seed",
        str(args.seed),
        "--grader",
        "exact",
        "--grader",
        "json",
        "--database-url",
        database,
        "--html",
        str(work / "report.html"),
    ]
    started = time.time()
    subprocess.run(command, env=env, check=True)
    elapsed = time.time() - started
    # The nightly re-run with no new traffic: nothing is rebuilt, retrained or re-graded.
    again = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    print(
        "re-run without new calls:",
        "nothing to do" if "the last result stands" in again.stderr else "RAN AGAIN",
    )
    runs = json.loads(distillery("eval", "list", "--json"))
    summary = json.loads(distillery("eval", "show", runs[0]["id"], "--json"))["summary"]
    scores = {
        label: entry["graders"]["exact"]["mean"] for label, entry in summary["candidates"].items()
    }
    print(
        f"\nexact-match on held-out tickets ({summary['items']} items, distill took {elapsed:.0f} s):"
    )
    for label, score in scores.items():
        print(f"  {label:<28} {score:.3f}")
    print(f"report: {work / 'report.html'}")
    return scores


if __name__ == "__main__":
    main()
