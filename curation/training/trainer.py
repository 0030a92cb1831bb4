"""The self-hosted trainer, run as its own process: ``python -m distillery.curation.training.trainer DIR``.

``DIR/job.json`` says what to train (base model path or hub id, dataset files,
the hyperparameters the user gave, LoRA, full or neither).  The settings are
chosen from the model (:mod:`distillery.curation.training.settings`) and written,
defaults included, to ``DIR/status.json`` before training starts.  The process
appends every logged step and evaluation to ``DIR/events.jsonl``, keeps
``DIR/status.json`` current (running / succeeded / failed / cancelled), saves
a checkpoint per epoch under ``DIR/checkpoints`` (weights only; removed once the job
succeeds unless ``keep_checkpoints``), the best epoch's adapter (or full model) under
``DIR/model`` and, when asked, the merged model under
``DIR/merged``, with a ``manifest.json`` naming the base model, dataset
version, settings, the epoch kept and final metrics.

Supervised fine-tuning with Hugging Face TRL (+ PEFT for LoRA): the model's
chat template is applied and the loss counts assistant tokens only.  Runs on
CUDA (bf16 where supported) or the CPU with a set number of threads;
``accelerate launch`` for several GPUs.  SIGTERM stops training at the next
step and marks the job cancelled.
"""

from __future__ import annotations

import json
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, cast

from distillery.curation.training import settings as train_settings
from distillery.curation.training import student
from distillery.curation.training.job_files import (
    Status,
    TrainedModel,
    TrainerJob,
    TrainerStatus,
    job_path,
    status_path,
)


class Journal:
    """The job's directory as the trainer keeps it: ``status.json``, ``events.jsonl``, and
    whether SIGTERM asked it to stop."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.cancelled = False
        self._events = (directory / "events.jsonl").open("a")

    def status(self, state: Status, **fields: Any) -> None:
        TrainerStatus.now(state, **fields).write(status_path(self.directory))

    def event(self, message: str, level: str = "info", data: dict[str, Any] | None = None) -> None:
        line = {"time": time.time(), "level": level, "message": message, "data": data or {}}
        self._events.write(json.dumps(line) + "\n")
        self._events.flush()

    def stop(self, *_: Any) -> None:
        self.cancelled = True

    def close(self) -> None:
        self._events.close()


def run(directory: Path) -> int:
    journal = Journal(directory)
    signal.signal(signal.SIGTERM, journal.stop)
    journal.status("running")
    journal.event("loading the base model and the dataset")
    try:
        job = TrainerJob.read(job_path(directory))
        model = train(job, journal)
        if model is None:
            journal.event("cancelled", level="warning")
            journal.status("cancelled")
            return 0
        if not job.keep_checkpoints:  # the kept model is in DIR/model (or DIR/merged)
            shutil.rmtree(directory / "checkpoints", ignore_errors=True)
        summary = {k: v for k, v in model.model_dump().items() if isinstance(v, (int, float))}
        journal.event(f"done: {model.model_dir}", "info", summary)
        journal.status("succeeded", model_dir=model.model_dir, metrics=model.model_dump())
        return 0
    except Exception as exc:  # reported to the user through status.json, then re-raised in the log
        journal.event(f"failed: {exc}", level="error")
        journal.status("failed", error={"message": f"{type(exc).__name__}: {exc}"})
        traceback.print_exc()
        return 1
    finally:
        journal.close()


def train(job: TrainerJob, journal: Journal) -> TrainedModel | None:
    """Train as ``job`` asks; the saved model's manifest, or None when cancelled."""
    import torch
    from transformers import AutoTokenizer
    from trl import SFTTrainer  # type: ignore[attr-defined]

    tokenizer = AutoTokenizer.from_pretrained(job.base_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Loss on assistant tokens only: through the template's {% generation %} markers
    # when it has them, else as prompt/completion pairs (the final assistant turn is
    # the completion), which works with any chat template.
    masks = "{% generation %}" in (tokenizer.chat_template or "")
    train_set, valid = _split(job, "train", masks), _split(job, "val", masks)
    if train_set is None:
        raise ValueError(f"{job.dataset_dir}/train.jsonl has no examples")
    cuda = torch.cuda.is_available()
    settings = choose_settings(job, len(train_set), valid is not None, cuda)
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    journal.status("running", settings=settings)
    journal.event(f"settings: {settings['profile']}", "info", settings)
    bf16 = cuda and torch.cuda.is_bf16_supported()
    steps = -(-len(train_set) // settings["batch_size"]) * settings["max_epochs"]
    trainer = trainer_class(SFTTrainer)(
        model=job.base_model,
        args=_config(journal.directory, settings, steps, valid is not None, masks, cuda, bf16),
        train_dataset=train_set,
        eval_dataset=valid,
        processing_class=tokenizer,
        peft_config=_lora(settings),
        callbacks=_callbacks(journal, settings),
    )
    started = time.time()
    trainer.train()
    if journal.cancelled:
        return None
    metrics = trainer.evaluate() if valid is not None else {}
    output = journal.directory / "model"
    trainer.save_model(str(output))
    tokenizer.save_pretrained(str(output))
    lora = settings["method"] == "lora"
    if lora and job.merge:
        output = journal.directory / "merged"
        cast(Any, trainer.model).merge_and_unload().save_pretrained(str(output))
        tokenizer.save_pretrained(str(output))
    history = [h for h in trainer.state.log_history if "loss" in h]
    model = TrainedModel(
        base_model=job.base_model,
        dataset=job.dataset,
        lora=lora,
        settings=settings,
        best_epoch=_best_epoch(trainer.state),
        epochs_run=round(trainer.state.epoch or 0, 2),
        device="cuda" if cuda else "cpu",
        bf16=bf16,
        train_seconds=round(time.time() - started, 1),
        first_train_loss=history[0]["loss"] if history else None,
        final_train_loss=history[-1]["loss"] if history else None,
        valid_loss=metrics.get("eval_loss"),
        valid_accuracy=metrics.get("eval_mean_token_accuracy"),
        model_dir=str(output),
    )
    model.write(output / "manifest.json")
    return model


def _split(job: TrainerJob, name: str, masks: bool) -> Any:
    """One split as a datasets.Dataset, or None when it has no examples."""
    from datasets import Dataset

    path = Path(job.dataset_dir) / f"{name}.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        return None
    if masks:
        return Dataset.from_list([{"messages": row["messages"]} for row in rows])
    return Dataset.from_list(
        [{"prompt": row["messages"][:-1], "completion": row["messages"][-1:]} for row in rows]
    )


def _config(
    directory: Path,
    settings: dict[str, Any],
    steps: int,
    validated: bool,
    masks: bool,
    cuda: bool,
    bf16: bool,
) -> Any:
    """TRL's SFTConfig for the chosen settings."""
    from trl import SFTConfig  # type: ignore[attr-defined]

    return SFTConfig(
        output_dir=str(directory / "checkpoints"),
        num_train_epochs=settings["max_epochs"],
        per_device_train_batch_size=settings["batch_size"],
        per_device_eval_batch_size=settings["batch_size"],
        learning_rate=settings["learning_rate"],
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": settings["min_learning_rate_ratio"]},
        warmup_steps=max(1, round(steps * settings["warmup_ratio"])),
        weight_decay=settings["weight_decay"],
        seed=settings["seed"],
        logging_steps=max(1, min(50, steps // 20)),
        eval_strategy="epoch" if validated else "no",
        prediction_loss_only=True,  # else each evaluation batch is run twice, for logits
        save_strategy="epoch",
        save_total_limit=2,
        # The weights alone: the best epoch's are what is kept, and a job is never resumed
        # from a checkpoint, so the optimizer's state (6x a small model) is not written.
        save_only_model=True,
        load_best_model_at_end=validated,
        metric_for_best_model=SCORE if validated else None,
        greater_is_better=True if validated else None,
        assistant_only_loss=masks,
        completion_only_loss=None if masks else True,
        max_length=settings["max_length"],
        bf16=bf16,
        use_cpu=not cuda,
        dataloader_num_workers=0,
        report_to=[],
        **recomputing(settings["gradient_checkpointing"]),
        disable_tqdm=True,
    )


# What picks the best epoch and stops training: the validation split's token accuracy (the
# answer's tokens the student predicts itself, as greedy decoding does), then its loss.
# Not the loss alone: the dataset's split keeps near-duplicate prompts on one side, so
# validation holds kinds of prompt training never shows, and on them the loss can rise from
# the first epoch while the student learns everything else (on the benchmark's `route`, the
# loss picked epoch 1 of 20, which scored 0.28 on held-out prompts where the reference loop
# scored 0.91).
SCORE = "eval_score"


def score(accuracy: float | None, loss: float) -> float:
    """The kept epoch's measure: token accuracy, the lower loss breaking ties (its term is
    under 1e-7, less than one answer token in any split)."""
    return (accuracy if accuracy is not None else 0.0) - min(loss, 100.0) * 1e-9


def progress(accuracy: float | None, loss: float) -> tuple[float, float]:
    """What early stopping counts as progress, compared as a tuple: a better accuracy, or
    the same at a lower loss while some answer tokens are still wrong.  Once every one is
    right, a loss still creeping down is no reason to go on (the benchmark's `dates` and
    `extract` were right from epochs 13 and 20 and their loss fell until the ceiling of 49)."""
    if accuracy is None:
        return (0.0, -loss)
    return (accuracy, 0.0 if accuracy >= 1.0 else -loss)


# A prefix every row of a batch shares is computed once when it saves at least this many
# token positions; below that the extra forward call is not worth it.
MIN_SAVING = 64
# What computing a part of a batch apart costs, in token positions (its own forward and
# backward calls; measured on the benchmark's 1M-parameter students, one thread: at 64 a
# batch of even lengths split for 7% less padding took as long as in one piece; at 128 it
# stays whole, and batches where a quarter of the rows are 45 tokens longer train 11-41%
# faster).  Larger models pay more a token, so it is conservative for them.
PART_COST = 128


def shared_prefix(inputs: dict[str, Any]) -> int:
    """How many leading tokens every row of a collated batch shares and can be computed once:
    the same ids, all attended, and ending before the first token any row is scored on (its
    prediction comes from the position before it, which must be the rows' own).  0 when it
    is not worth it or the batch is not a plain padded one."""
    ids, mask, labels = inputs.get("input_ids"), inputs.get("attention_mask"), inputs.get("labels")
    if ids is None or mask is None or labels is None or ids.dim() != 2 or len(ids) < 2:
        return 0
    if any(key in inputs for key in ("position_ids", "cache", "past_key_values")):
        return 0
    same = ((ids == ids[:1]) & (mask == 1)).all(dim=0)
    differ = (~same).nonzero()
    length = int(differ[0]) if len(differ) else ids.shape[1]
    scored = (labels != -100).any(dim=0).nonzero()
    if len(scored):
        length = min(length, int(scored[0]) - 1)
    return length if length * (len(ids) - 1) >= MIN_SAVING else 0


def with_shared_prefix(model: Any, inputs: dict[str, Any], length: int) -> dict[str, Any]:
    """The batch's inputs with its first ``length`` tokens computed once, for one row, and
    their keys and values repeated for every row: the rest of the forward pass attends to
    them exactly as to its own (the attention mask still covers the whole row, positions
    continue after the prefix) and the gradients through them sum over the rows, so the
    loss and its gradients are the whole batch's."""
    ids, rows = inputs["input_ids"], len(inputs["input_ids"])
    prefix = model(
        input_ids=ids[:1, :length],
        attention_mask=inputs["attention_mask"][:1, :length],
        use_cache=True,
        logits_to_keep=1,
    )
    name = "cache" if "cache" in prefix else "past_key_values"
    cache = prefix.get(name)
    if cache is None:  # a model that keeps no cache: the batch as it was
        return inputs
    cache.batch_repeat_interleave(rows)
    return {**inputs, "input_ids": ids[:, length:], "labels": inputs["labels"][:, length:],
            name: cache}  # fmt: skip


def length_parts(inputs: dict[str, Any]) -> list[Any]:
    """The rows of a right-padded batch in parts of similar length, each to be computed
    padded only to its own longest row: the batch's rows are what the sampler drew (grouping
    the batches themselves by length made a batch of one kind of example, and cost the
    ticket example's student its score), only the padding goes.  Each part after the first
    must save more than :data:`PART_COST` token positions (an optimal split, by dynamic
    programming over the rows sorted by length).  One part, the whole batch, when there is
    nothing to save or the batch is not a plain right-padded one."""
    import torch

    ids, mask = inputs.get("input_ids"), inputs.get("attention_mask")
    every = [torch.arange(len(ids))] if ids is not None else []
    if ids is None or mask is None or ids.dim() != 2 or len(ids) < 2:
        return every
    if set(inputs) - {"input_ids", "attention_mask", "labels"}:
        return every
    lengths = mask.sum(dim=1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    if not (mask == (positions < lengths[:, None])).all():  # not right-padded
        return every
    order = lengths.argsort(stable=True)
    sorted_lengths = lengths[order].tolist()
    rows = len(sorted_lengths)
    # cost[j]: the fewest positions (plus PART_COST a part) for the j shortest rows; cut[j]
    # where its last part starts.
    cost, cut = [0] + [0] * rows, [0] * (rows + 1)
    for j in range(1, rows + 1):
        cost[j], cut[j] = min(
            (cost[i] + (j - i) * sorted_lengths[j - 1] + PART_COST, i) for i in range(j)
        )
    bounds, j = [], rows
    while j:
        bounds.append((cut[j], j))
        j = cut[j]
    return [order[start:end] for start, end in reversed(bounds)]


def part_of(inputs: dict[str, Any], rows: Any) -> dict[str, Any]:
    """These rows of a right-padded batch, cut to their own longest."""
    width = int(inputs["attention_mask"][rows].sum(dim=1).max())
    return {key: value[rows, :width] for key, value in inputs.items()}


def scored(labels: Any) -> Any:
    """The positions a causal model's loss counts: labels shifted by one, not ignored."""
    return (labels[:, 1:] != -100).sum()


def trainer_class(sft_trainer: Any) -> Any:
    """TRL's SFTTrainer, computing less for the same updates: a batch's rows in parts of
    similar length, each padded only to its own longest (:func:`length_parts`), and a prefix
    every row of a part shares (a task's system prompt and the template around it: a third
    of the tokens of a short task) computed once instead of once per row
    (:func:`with_shared_prefix`)."""

    class Trainer(sft_trainer):  # type: ignore[misc,valid-type]
        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "eval_loss" in logs:  # an evaluation: its score, for the best epoch and stopping
                right = self._metrics["eval"].get("mean_token_accuracy") or []
                accuracy = sum(right) / len(right) if right else None
                logs[SCORE] = score(accuracy, logs["eval_loss"])
            super().log(logs, start_time)

        def compute_loss(
            self,
            model: Any,
            inputs: dict[str, Any],
            return_outputs: bool = False,
            num_items_in_batch: Any = None,
        ) -> Any:
            parts = [] if return_outputs else length_parts(inputs)
            if len(parts) < 2:
                return self._part_loss(model, inputs, return_outputs, num_items_in_batch)
            # Each part's loss is its sum over the whole batch's scored tokens, so the parts'
            # losses add up to the batch's; TRL's per-call metrics become the batch's, as one
            # call would have logged them (weighted by each part's scored tokens).
            pieces = [part_of(inputs, rows) for rows in parts]
            if num_items_in_batch is None:
                num_items_in_batch = scored(inputs["labels"])
            metrics = self._metrics["train" if self.model.training else "eval"]
            keys = ("entropy", "mean_token_accuracy")
            logged = {key: len(metrics[key]) for key in keys}
            loss = sum(self._part_loss(model, piece, False, num_items_in_batch) for piece in pieces)
            weights = [int(scored(piece["labels"])) for piece in pieces]
            for key in keys:
                values = metrics[key][logged[key] :]
                del metrics[key][logged[key] :]
                if len(values) == len(weights):
                    total = sum(weights)
                    mean = sum(v * w for v, w in zip(values, weights, strict=True)) / total
                    metrics[key].append(mean if total else 0.0)
            return loss

        def _part_loss(
            self, model: Any, inputs: dict[str, Any], return_outputs: bool, num_items: Any
        ) -> Any:
            # Recomputing activations runs each layer again without a cache: no sharing then.
            plain = return_outputs or self.args.gradient_checkpointing
            length = 0 if plain else shared_prefix(inputs)
            if length:
                inputs = with_shared_prefix(model, inputs, length)
            return super().compute_loss(model, inputs, return_outputs, num_items)

    return Trainer


def recomputing(activations: bool) -> dict[str, Any]:
    """SFTConfig's switch for recomputing activations in the backward pass, by the name this
    transformers knows (``gradient_checkpointing`` before 5.x's ``activation_checkpointing``)."""
    import dataclasses

    from trl import SFTConfig  # type: ignore[attr-defined]

    names = {field.name for field in dataclasses.fields(SFTConfig)}
    new = "activation_checkpointing" in names
    return {"activation_checkpointing" if new else "gradient_checkpointing": activations}


def _lora(settings: dict[str, Any]) -> Any:
    """PEFT's LoraConfig when the settings train an adapter, else None."""
    if settings["method"] != "lora":
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=settings["lora_r"],
        lora_alpha=settings["lora_alpha"],
        lora_dropout=settings["lora_dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )


def _callbacks(journal: Journal, settings: dict[str, Any]) -> list[Any]:
    """Losses into the journal, SIGTERM honoured at the next step, early stopping if set."""
    from transformers import TrainerCallback

    class Report(TrainerCallback):  # type: ignore[misc]
        """Each logged loss as an event, with where the run is (step of max_steps, epoch of
        epochs); an epoch's end is marked (``epoch_end``) on its validation loss, or, with no
        validation split, on an event of its own: the CLI prints a line per epoch from it.
        The best weights' evaluation after training is no epoch's end."""

        training = True

        def on_train_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            self.training = False

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
            logs = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
            if "loss" in logs or "eval_loss" in logs:
                label = "valid" if "eval_loss" in logs else "train"
                loss = logs.get("eval_loss", logs.get("loss"))
                key = "valid_loss" if label == "valid" else "train_loss"
                data = {"step": state.global_step, key: loss, "epoch": logs.get("epoch")}
                if label == "valid" and "eval_mean_token_accuracy" in logs:
                    data["valid_accuracy"] = logs["eval_mean_token_accuracy"]
                data.update(max_steps=state.max_steps, epochs=args.num_train_epochs)
                if label == "valid" and self.training:
                    data["epoch_end"] = True
                journal.event(f"step {state.global_step}: {label} loss {loss:.4f}", "info", data)

        def on_epoch_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if args.eval_strategy != "no":
                return  # its validation loss, logged next, marks the end
            journal.event(
                f"epoch {round(state.epoch or 0)} done",
                "info",
                {
                    "step": state.global_step,
                    "epoch": state.epoch,
                    "max_steps": state.max_steps,
                    "epochs": args.num_train_epochs,
                    "epoch_end": True,
                },
            )

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            if journal.cancelled:
                control.should_training_stop = True

    class Patience(TrainerCallback):  # type: ignore[misc]
        """Stops training once the validation answers have not progressed (see
        :func:`progress`) for ``patience`` epochs, never before ``min_epochs``."""

        best: tuple[float, float] | None = None
        waited = 0

        def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            metrics = kwargs.get("metrics") or {}
            if "eval_loss" not in metrics:
                return
            now = progress(metrics.get("eval_mean_token_accuracy"), metrics["eval_loss"])
            if self.best is None or now > self.best:
                self.best, self.waited = now, 0
            else:
                self.waited += 1
            if self.waited >= settings["patience"] and (state.epoch or 0) >= min_epochs - 1e-6:
                control.should_training_stop = True

    min_epochs = settings.get("min_epochs") or 0
    return [Report(), Patience()] if settings["early_stopping"] else [Report()]


def choose_settings(
    job: TrainerJob, examples: int, has_validation: bool, cuda: bool
) -> dict[str, Any]:
    """The run's settings (see :mod:`.settings`) for the job's base model."""
    given = dict(job.hyperparameters)
    lora = job.lora  # True/False when --lora/--full was given, None to choose
    return train_settings.choose(
        parameters=_parameters(job.base_model),
        examples=examples,
        from_scratch=student.from_scratch(job.base_model),
        has_validation=has_validation,
        given=given,
        method=None if lora is None else ("lora" if lora else "full"),
        cuda=cuda,
    )


def estimate_epochs(
    base_model: str,
    examples: int,
    has_validation: bool,
    given: dict[str, Any] | None = None,
    lora: bool | None = None,
) -> tuple[int, int]:
    """The fewest and most epochs this trainer will run on ``base_model`` for a dataset of
    ``examples`` train examples: what ``dataset build`` and the Distill dialog estimate with,
    from the same settings a job would choose."""
    job = TrainerJob(
        base_model=base_model, dataset_dir="", dataset="", hyperparameters=given or {}, lora=lora
    )
    return train_settings.epoch_range(choose_settings(job, examples, has_validation, cuda=False))


def _parameters(base_model: str) -> int:
    """The model's parameter count, from its config alone (no weights are loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base_model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    return sum(p.numel() for p in model.parameters())


def _best_epoch(state: Any) -> float | None:
    best = state.best_metric
    for entry in state.log_history:
        if best is not None and entry.get(SCORE) == best:
            return cast(float, entry.get("epoch"))
    return None


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1])))
