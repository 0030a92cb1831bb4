"""The self-hosted trainer, run as its own process: ``python -m distillery.curation.train_local DIR``.

``DIR/job.json`` says what to train (base model path or hub id, dataset files,
hyperparameters, LoRA or full).  The process appends every logged step and
evaluation to ``DIR/events.jsonl``, keeps ``DIR/status.json`` current
(running / succeeded / failed / cancelled), saves a checkpoint per epoch under
``DIR/checkpoints``, the adapter (or full model) under ``DIR/model`` and, when
asked, the merged model under ``DIR/merged``, with a ``manifest.json`` naming
the base model, dataset version, hyperparameters and final metrics.

Supervised fine-tuning with Hugging Face TRL (+ PEFT for LoRA): the model's
chat template is applied and the loss counts assistant tokens only.  Runs on
CUDA (bf16 where supported) or the CPU; ``accelerate launch`` for several GPUs.
SIGTERM stops training at the next step and marks the job cancelled.
"""

from __future__ import annotations

import json
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, cast


def _write(path: Path, value: Any) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value, indent=2))
    temporary.replace(path)


def run(directory: Path) -> int:
    job = json.loads((directory / "job.json").read_text())
    status_path = directory / "status.json"
    events = (directory / "events.jsonl").open("a")
    cancelled = {"flag": False}

    def status(state: str, **extra: Any) -> None:
        _write(status_path, {"status": state, "updated_at": time.time(), **extra})

    def event(message: str, level: str = "info", data: dict[str, Any] | None = None) -> None:
        events.write(
            json.dumps(
                {"time": time.time(), "level": level, "message": message, "data": data or {}}
            )
            + "\n"
        )
        events.flush()

    def stop(*_: Any) -> None:
        cancelled["flag"] = True

    signal.signal(signal.SIGTERM, stop)
    status("running")
    event("loading the base model and the dataset")
    try:
        import torch
        from datasets import Dataset
        from transformers import AutoTokenizer, TrainerCallback
        from trl import SFTConfig, SFTTrainer  # type: ignore[attr-defined]

        tokenizer = AutoTokenizer.from_pretrained(job["base_model"])
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

        # Loss on assistant tokens only: through the template's {% generation %} markers
        # when it has them, else as prompt/completion pairs (the final assistant turn is
        # the completion), which works with any chat template.
        masks = "{% generation %}" in (tokenizer.chat_template or "")

        def load(name: str) -> Any:
            path = Path(job["dataset_dir"]) / f"{name}.jsonl"
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if not rows:
                return None
            if masks:
                return Dataset.from_list([{"messages": row["messages"]} for row in rows])
            return Dataset.from_list(
                [
                    {"prompt": row["messages"][:-1], "completion": row["messages"][-1:]}
                    for row in rows
                ]
            )

        train, valid = load("train"), load("val")
        hyper = job["hyperparameters"]
        steps = -(-len(train) // hyper.get("batch_size", 8)) * hyper.get("epochs", 3)
        cuda = torch.cuda.is_available()
        bf16 = cuda and torch.cuda.is_bf16_supported()

        class Report(TrainerCallback):  # type: ignore[misc]
            def on_log(
                self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any
            ) -> None:
                logs = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
                if "loss" in logs or "eval_loss" in logs:
                    label = "valid" if "eval_loss" in logs else "train"
                    loss = logs.get("eval_loss", logs.get("loss"))
                    key = "valid_loss" if label == "valid" else "train_loss"
                    event(
                        f"step {state.global_step}: {label} loss {loss:.4f}",
                        "info",
                        {"step": state.global_step, key: loss, "epoch": logs.get("epoch")},
                    )

            def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
                if cancelled["flag"]:
                    control.should_training_stop = True

        config = SFTConfig(
            output_dir=str(directory / "checkpoints"),
            num_train_epochs=hyper.get("epochs", 3),
            per_device_train_batch_size=hyper.get("batch_size", 8),
            learning_rate=hyper.get("learning_rate", 2e-4 if job["lora"] else 5e-5),
            seed=hyper.get("seed", 0),
            logging_steps=hyper.get("logging_steps", max(1, min(50, steps // 10))),
            eval_strategy="epoch" if valid is not None else "no",
            save_strategy="epoch",
            save_total_limit=2,
            assistant_only_loss=masks,
            completion_only_loss=None if masks else True,
            max_length=hyper.get("max_length", 1024),
            bf16=bf16,
            use_cpu=not cuda,
            report_to=[],
            disable_tqdm=True,
        )
        peft_config = None
        if job["lora"]:
            from peft import LoraConfig

            peft_config = LoraConfig(
                r=hyper.get("lora_r", 16),
                lora_alpha=hyper.get("lora_alpha", 32),
                target_modules="all-linear",
                task_type="CAUSAL_LM",
            )
        trainer = SFTTrainer(
            model=job["base_model"],
            args=config,
            train_dataset=train,
            eval_dataset=valid,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[Report()],
        )
        started = time.time()
        trainer.train()
        if cancelled["flag"]:
            event("cancelled", level="warning")
            status("cancelled")
            return 0
        metrics = trainer.evaluate() if valid is not None else {}
        trainer.save_model(str(directory / "model"))
        tokenizer.save_pretrained(str(directory / "model"))
        output = directory / "model"
        if job["lora"] and job.get("merge"):
            merged = cast(Any, trainer.model).merge_and_unload()
            merged.save_pretrained(str(directory / "merged"))
            tokenizer.save_pretrained(str(directory / "merged"))
            output = directory / "merged"
        history = [h for h in trainer.state.log_history if "loss" in h]
        manifest = {
            "base_model": job["base_model"],
            "dataset": job["dataset"],
            "lora": job["lora"],
            "hyperparameters": hyper,
            "device": "cuda" if cuda else "cpu",
            "bf16": bf16,
            "train_seconds": round(time.time() - started, 1),
            "first_train_loss": history[0]["loss"] if history else None,
            "final_train_loss": history[-1]["loss"] if history else None,
            "valid_loss": metrics.get("eval_loss"),
            "model_dir": str(output),
        }
        _write(output / "manifest.json", manifest)
        summary = {k: v for k, v in manifest.items() if isinstance(v, (int, float))}
        event(f"done: {output}", "info", summary)
        status("succeeded", model_dir=str(output), metrics=manifest)
        return 0
    except Exception as exc:  # reported to the user through status.json, then re-raised in the log
        event(f"failed: {exc}", level="error")
        status("failed", error={"message": f"{type(exc).__name__}: {exc}"})
        traceback.print_exc()
        return 1
    finally:
        events.close()


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1])))
