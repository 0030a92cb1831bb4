"""What the local trainer will do, decided from what it is given.

Two profiles, because the right settings for the two kinds of student differ by
an order of magnitude:

- **From scratch or very small** (a model ``distillery student create`` made, or
  one under ``SMALL_MODEL`` parameters): every weight is trained.  Randomly
  initialised weights need a learning rate near 1e-3, a warm-up so the first
  steps do not blow up, and enough epochs to learn the task; a decay to a floor
  (not to zero) keeps the last epochs learning.
- **Pretrained** (anything larger): a LoRA adapter with the usual settings
  (rank 16, alpha 32, learning rate 2e-4) for a few epochs; the model already
  knows language, the adapter only learns the task.

A model trained from scratch learns from the number of updates more than from the
number of epochs, so its batch follows the dataset: about 40 steps an epoch, between 8
and 32 examples a batch (280 examples train in batches of 8, 1,350 in batches of 32).
Its epochs follow the updates too: the ceiling and the floor below were measured at 35
updates an epoch (the example's 280 tickets), and a dataset whose epoch is more updates
runs as many updates in fewer epochs (1,350 examples, 43 updates an epoch: 37 to 49).

In both the number of epochs is not guessed: training evaluates the validation
split every epoch, stops when its token accuracy has not improved for ``patience`` epochs
(never before ``min_epochs``) and keeps the best checkpoint (``max_epochs`` is the
ceiling).  Without a
validation split there is nothing to stop on, and ``epochs`` runs in full.

Everything chosen here, defaults included, goes into the job's status and
manifest; a value the user gave always wins.
"""

from __future__ import annotations

import os
from typing import Any

SMALL_MODEL = 30_000_000  # parameters: below this, training all of them is cheap

SCRATCH: dict[str, Any] = {
    "method": "full",
    "learning_rate": 1e-3,
    "min_learning_rate_ratio": 0.1,
    "warmup_ratio": 0.05,
    "weight_decay": 0.01,
    "batch_size": 32,
    # A student learning from scratch plateaus, then learns again when it finds how to copy
    # from the prompt: on the example's split, one seed sat at a validation loss of 0.12 from
    # epoch 13 to 29 and scored 0.636 after 40 epochs; with 60 it reached 0.0006 and 1.000.
    "max_epochs": 60,
    # With 5, a noisy validation loss stopped a run at epoch 27 of 40 while the rate was
    # still a third of its peak, and the student answered nothing.
    "patience": 10,
    # And no stop before three quarters of the ceiling, the plateau being what patience
    # would stop on (a CI run stopped with patience 10 scored 0.152).
    "min_epochs": 45,
    # The updates an epoch those counts were measured at (see the module's docstring).
    "epoch_updates": 35,
}
SMALL_PRETRAINED: dict[str, Any] = {
    **SCRATCH,
    "learning_rate": 1e-4,
    "batch_size": 16,
    "max_epochs": 20,
    "patience": 3,
    "min_epochs": 0,
    "epoch_updates": None,
}
PRETRAINED: dict[str, Any] = {
    "method": "lora",
    "learning_rate": 2e-4,
    "min_learning_rate_ratio": 0.1,
    "warmup_ratio": 0.03,
    "weight_decay": 0.0,
    "batch_size": 8,
    "max_epochs": 5,
    "patience": 2,
    "min_epochs": 0,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
}
NO_VALIDATION_EPOCHS = {"full": 20, "lora": 3}  # without a split to stop on


def default_threads(cpu_count: int | None = None) -> int:
    """CPU threads for training: half the cores, at most 8.  On a small shared machine
    torch's default (every core) spends more time waiting on its own threads than
    computing; on 2 cores one thread was the fastest measured."""
    return max(1, min(8, (cpu_count or os.cpu_count() or 1) // 2))


def scratch_batch(examples: int) -> int:
    """About 40 steps an epoch, as a power of two from 8 to 32."""
    batch = 8
    while batch < 32 and examples / (batch * 2) >= 40:
        batch *= 2
    return batch


def choose(
    *,
    parameters: int,
    examples: int,
    from_scratch: bool,
    has_validation: bool,
    given: dict[str, Any],
    method: str | None = None,
    cuda: bool = False,
) -> dict[str, Any]:
    """The settings a run will use: the profile for this model, then what was given.

    ``method`` is ``"full"``/``"lora"`` when the user chose (``--full``/``--lora``),
    else None for the profile's choice.
    """
    if from_scratch:
        profile, why = SCRATCH, "randomly initialised (made by `distillery student create`)"
    elif parameters < SMALL_MODEL:
        profile, why = SMALL_PRETRAINED, f"small ({parameters:,} parameters)"
    else:
        profile, why = PRETRAINED, f"pretrained ({parameters:,} parameters)"
    settings = dict(profile)
    if method is not None and method != settings["method"]:
        settings = {**(PRETRAINED if method == "lora" else SMALL_PRETRAINED), "method": method}
    if settings["method"] == "full":
        settings["batch_size"] = min(settings["batch_size"], scratch_batch(examples))
    settings["profile"] = why
    # Recomputing activations in the backward pass (TRL's default) saves memory a small
    # model does not need, at a third more compute a step.
    settings["gradient_checkpointing"] = parameters >= SMALL_MODEL
    settings["parameters"] = parameters
    settings["examples"] = examples
    for key, value in given.items():
        if value is not None:
            settings[key] = value
    if "epochs" in given and given["epochs"] is not None:
        # A fixed count asked for: run it all, still keeping the best epoch's weights.
        settings["max_epochs"] = given["epochs"]
        settings["early_stopping"] = False
    else:
        settings["early_stopping"] = has_validation
        if not has_validation:
            settings["max_epochs"] = NO_VALIDATION_EPOCHS[settings["method"]]
    settings.pop("epochs", None)
    _epochs_by_updates(settings, examples)
    settings.setdefault("seed", 0)
    settings.setdefault("max_length", 1024)
    settings["threads"] = None if cuda else (given.get("threads") or default_threads())
    if settings["method"] != "lora":
        for key in ("lora_r", "lora_alpha", "lora_dropout"):
            settings.pop(key, None)
    return settings


def _epochs_by_updates(settings: dict[str, Any], examples: int) -> None:
    """Fewer epochs, as many updates, where an epoch is more updates than the profile's
    epoch counts were measured at (``epoch_updates``); never more epochs."""
    measured = settings.pop("epoch_updates", None)
    updates = -(-examples // settings["batch_size"])
    if not measured or not settings["early_stopping"] or updates <= measured:
        return
    for key in ("max_epochs", "min_epochs"):
        settings[key] = -(-settings[key] * measured // updates)


def epoch_range(settings: dict[str, Any]) -> tuple[int, int]:
    """The fewest and most epochs a run with ``settings`` can train: with early stopping, it
    stops once ``patience`` epochs pass without a better validation accuracy, never before
    ``min_epochs``, and at ``max_epochs`` at the latest; without, it runs ``max_epochs``."""
    most = int(settings["max_epochs"])
    if not settings.get("early_stopping"):
        return most, most
    fewest = max(int(settings.get("min_epochs") or 0), int(settings["patience"]) + 1)
    return min(fewest, most), most
