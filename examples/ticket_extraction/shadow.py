"""Put the distilled student to work: shadow, promote, answer. Run after run.py.

Takes the work dir `run.py` left (its database and the fine-tuned student) and:

1. serves the student with `distillery serve`;
2. starts the proxy with a route for the app's calls: the student in the teacher's
   shadow, graded against each live answer with `exact`, promoted by itself
   (`auto`) when the lower bound of its score clears 0.95 of the teacher's;
3. sends new tickets (ones the student never saw) through the proxy with the openai
   SDK, the app unchanged, and reports who answered: the teacher while the route
   gathers evidence, then the student on a canary share, then on every call but a
   holdout;
4. prints `distillery routes status`.

    python examples/ticket_extraction/run.py --workdir /tmp/tickets
    python examples/ticket_extraction/shadow.py --workdir /tmp/tickets
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from run import free_port, run_command, serve_teacher, start_proxy, wait  # noqa: E402
from task import SYSTEM, extract, tickets  # noqa: E402

ROUTE = """
[endpoints.student]
base_url = "http://127.0.0.1:{student_port}/v1"

[routes.tickets]
match = {{ app = "tickets" }}
student = "tickets-student@student"
graders = ["exact"]
bar = 0.95
relative = true
min_samples = 20
auto = true
canary = 0.5
holdout = 0.1
timeout = 30
"""


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, required=True, help="the one run.py used")
    parser.add_argument("--max-tickets", type=int, default=400)
    args = parser.parse_args(argv)
    work = args.workdir
    env = {**os.environ, "DISTILLERY_DATA_DIR": str(work / "data"), "OPENAI_API_KEY": "sk-example"}
    database = f"sqlite:///{work / 'data' / 'distillery.db'}"

    distillery = functools.partial(run_command, env, database)

    jobs = json.loads(distillery("finetune", "list", "--json"))
    model = next(j["fine_tuned_model"] for j in jobs if j["status"] == "succeeded")
    teacher_port, student_port, proxy_port = free_port(), free_port(), free_port()
    serve_teacher(teacher_port)
    config = work / "routes.toml"
    config.write_text(ROUTE.format(student_port=student_port))
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distillery",
                "serve",
                model,
                "--port",
                str(student_port),
                "--name",
                "tickets-student",
            ],
            env=env,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        wait(f"http://127.0.0.1:{student_port}/v1/models", tries=1200)
        teacher_url = f"http://127.0.0.1:{teacher_port}/v1"
        processes.append(
            start_proxy(proxy_port, teacher_url, database, env, "--config", str(config))
        )
        return _traffic(proxy_port, args.max_tickets, distillery, config)
    finally:
        for process in reversed(processes):
            process.send_signal(signal.SIGTERM)
            process.wait(60)


def _traffic(
    proxy_port: int, most: int, distillery: Callable[..., str], config: Path
) -> dict[str, Any]:
    app = openai.OpenAI(
        base_url=f"http://127.0.0.1:{proxy_port}/v1",
        api_key="sk-example",
        default_headers={"X-Distillery-Tag-app": "tickets"},
    )
    served: Counter[str] = Counter()
    right: Counter[str] = Counter()
    history: list[tuple[str, Counter[str]]] = [("shadow", Counter())]  # each mode, from when
    first_student: int | None = None

    def status() -> dict[str, Any]:
        rows: list[dict[str, Any]] = json.loads(
            distillery("routes", "status", "-c", str(config), "--json")
        )
        return rows[0]

    for n, ticket in enumerate(tickets(most, seed=2)):  # tickets the student never saw
        raw = app.chat.completions.with_raw_response.create(
            model="teacher-model",
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": ticket}],
        )
        who = raw.headers["X-Distillery-Served-By"]
        if who == "student" and first_student is None:
            first_student = n + 1
        served[who] += 1
        right[who] += raw.parse().choices[0].message.content == extract(ticket)
        if n % 10 == 9:
            mode = status()["mode"]
            if mode != history[-1][0]:
                history.append((mode, served.copy()))
            if mode == "on" and served.total() - history[-1][1].total() >= 50:
                break
        time.sleep(0.05)  # an app's pace: the shadow keeps up
    app.close()
    print(distillery("routes", "status", "-c", str(config)))
    print(f"the student's first answer: call {first_student} (after 20 graded pairs at least)")
    print("who answered the app's calls, by the route's mode (looked up every 10 calls):")
    ends = [counts for _, counts in history[1:]] + [served]
    for (mode, began), ended in zip(history, ends, strict=True):
        calls = ended - began
        print(f"  {mode:<7} teacher {calls['teacher']:>4}  student {calls['student']:>4}")
    for who in ("teacher", "student"):
        if served[who]:
            print(f"  the {who}'s answers right: {right[who]} of {served[who]}")
    return {
        "first_student": first_student,
        "modes": [mode for mode, _ in history],
        "served": dict(served),
        "right": dict(right),
        "status": status(),
    }


if __name__ == "__main__":
    main()
