"""Does computing a batch in parts of similar length pay?  Prints a table.

For each task in bench/tasks.py, as it is and with a quarter of its requests 45 tokens
longer (real traffic's lengths vary far more than a synthetic task's), a student as
`distillery student create` makes it, 640 conversations in batches of 32 collated by TRL,
and the trainer's forward and backward passes over every batch: the batch in one piece
against the batch in the parts the trainer chooses (``length_parts``), interleaved round by
round on one thread so that whatever else the machine does falls on both alike.  The
median round is reported.

    python bench/batch_parts.py [--tasks route,dates,extract] [--rounds 5]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from tasks import TASKS, inputs

TAIL = " it was working fine until last week and now it makes a strange noise" * 3


def batches(task_name: str, longer: bool, work: Path) -> tuple[Any, Any, list[Any]]:
    """The trainer, its model and every collated training batch of one task."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer  # type: ignore[attr-defined]

    from distillery.curation.training.student import create
    from distillery.curation.training.trainer import recomputing, trainer_class

    task = TASKS[task_name]
    prompts = inputs(task, 640, 0)
    if longer:
        prompts = [p + TAIL if i % 4 == 0 else p for i, p in enumerate(prompts)]
    rows = [
        {"messages": [{"role": "system", "content": task.system}, {"role": "user", "content": p},
                      {"role": "assistant", "content": task.answer(p)}]}
        for p in prompts
    ]  # fmt: skip
    student = work / f"{task_name}-{longer}"
    create(student, [t for p in prompts for t in (p, task.answer(p))] + [task.system])
    config = SFTConfig(
        output_dir=str(work / "out"),
        per_device_train_batch_size=32,
        assistant_only_loss=True,
        use_cpu=True,
        **recomputing(False),
        report_to=[],
        disable_tqdm=True,
    )
    trainer = trainer_class(SFTTrainer)(
        model=str(student),
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=AutoTokenizer.from_pretrained(student),
    )
    collated = [trainer._prepare_inputs(batch) for batch in trainer.get_train_dataloader()]
    return trainer, trainer.model, collated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", default="route,dates,extract")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    import torch
    from transformers.utils import logging as hf_logging

    from distillery.curation.training import trainer as trainer_module

    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    work = Path(tempfile.mkdtemp())
    chosen = trainer_module.length_parts
    rows = []
    for name in args.tasks.split(","):
        for longer in (False, True):
            trainer, model, collated = batches(name, longer, work)
            model.train()
            masks = [batch["attention_mask"] for batch in collated]
            real = sum(int(mask.sum()) for mask in masks)
            whole = sum(mask.numel() for mask in masks)
            split = [chosen(batch) for batch in collated]
            computed = sum(
                sum(len(p) * int(mask.sum(dim=1)[p].max()) for p in parts)
                for parts, mask in zip(split, masks, strict=True)
            )
            times: dict[str, list[float]] = {"whole": [], "parts": []}
            for _ in range(args.rounds):
                for how in times:
                    trainer_module.length_parts = chosen if how == "parts" else lambda _: []
                    start = time.perf_counter()
                    for batch in collated:
                        model.zero_grad()
                        count = (batch["labels"][:, 1:] != -100).sum()
                        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=count)
                        loss.backward()
                    times[how].append(time.perf_counter() - start)
            trainer_module.length_parts = chosen
            one, parted = statistics.median(times["whole"]), statistics.median(times["parts"])
            rows.append(
                (
                    name,
                    "a quarter 45 tokens longer" if longer else "as generated",
                    f"{1 - real / whole:.1%}",
                    f"{1 - real / computed:.1%}",
                    f"{sum(map(len, split)) / len(split):.1f}",
                    f"{one:.2f} s",
                    f"{parted:.2f} s",
                    f"{parted / one:.2f}",
                )
            )
    print(f"{platform.machine()}, {torch.__version__}, one thread, {args.rounds} rounds (median)")
    head = ("task", "requests", "padding whole", "padding in parts", "parts a batch",
            "whole", "in parts", "x whole")  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
