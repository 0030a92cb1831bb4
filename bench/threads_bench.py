"""How many CPU threads should the trainer use?  Prints a table.

Times training steps of a student as `distillery student create` makes it (batch 32 of
~60-token conversations), with 1, 2, ... threads, interleaved round by round so that
whatever else the machine is doing falls on every setting alike.

    python bench/threads_bench.py [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM

    from distillery.curation.training.student import create

    texts = [
        f"please ship {n} steel bolts to oslo by 2026-0{n % 9 + 1}-1{n % 9}" for n in range(500)
    ]
    directory = Path(tempfile.mkdtemp()) / "student"
    create(directory, texts)
    model = AutoModelForCausalLM.from_pretrained(directory)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batch = torch.randint(5, model.config.vocab_size, (32, 60))
    counts = sorted({1, 2, os.cpu_count() or 1})
    times: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(args.rounds):
        for threads in counts:
            torch.set_num_threads(threads)
            started = time.perf_counter()
            for _ in range(args.steps):
                model(input_ids=batch, labels=batch).loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            times[threads].append((time.perf_counter() - started) / args.steps)
    print(f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"{'threads':>8} {'s/step (median)':>16} {'vs 1 thread':>12}")
    one = statistics.median(times[1])
    for threads in counts:
        median = statistics.median(times[threads])
        print(f"{threads:>8} {median:>16.3f} {median / one:>11.2f}x")


if __name__ == "__main__":
    main()
