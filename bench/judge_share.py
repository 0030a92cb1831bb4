"""How much CPU does the route judge get on a machine the proxy keeps busy, by niceness?

The judge runs at a lower CPU priority than the proxy (``JUDGE_NICENESS`` in
``curation/judge.py``): background work must not slow the calls, yet must not starve
either (a judge that grades nothing for 20 s drops every pair meanwhile).  This starts
one busy loop per core at niceness 0 (the proxy under full load), and beside them a
worker at each niceness doing fixed units of work (JSON in and out, as grading and
storing a pair do); each figure is a ratio to the same worker on the idle machine,
measured in the same run.

    python bench/judge_share.py [--seconds 4]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import time

import orjson

PAIR = {"messages": [{"role": "user", "content": "word " * 200}], "scores": {"exact": 1.0}}


def _busy(stop: float) -> None:
    while time.time() < stop:
        pass


def _work(niceness: int, seconds: float, result: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    os.nice(niceness)
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        orjson.loads(orjson.dumps(PAIR))
        done += 1
    result.put(done / seconds)


def rate(niceness: int, seconds: float, hogs: int) -> float:
    context = multiprocessing.get_context("spawn")
    result = context.Queue()
    stop = time.time() + seconds + 2
    busy = [context.Process(target=_busy, args=(stop,)) for _ in range(hogs)]
    for process in busy:
        process.start()
    worker = context.Process(target=_work, args=(niceness, seconds, result))
    worker.start()
    value = float(result.get())
    worker.join()
    for process in busy:
        process.terminate()
        process.join()
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    print(f"{platform.machine()}, {cores} cores; {cores} busy loops at niceness 0")
    idle = rate(0, args.seconds, 0)
    print(f"{'judge niceness':<16} {'work/s':>10} {'share of idle':>14}")
    for niceness in (0, 5, 10, 15, 19):
        busy = rate(niceness, args.seconds, cores)
        print(f"{niceness:<16} {busy:>10,.0f} {busy / idle:>13.1%}")
    print(f"{'(idle machine)':<16} {idle:>10,.0f} {1:>13.1%}")


if __name__ == "__main__":
    main()
