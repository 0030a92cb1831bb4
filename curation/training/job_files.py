"""The files a local fine-tune job keeps in its directory, as typed records.

The backend (:mod:`.local`) writes ``job.json`` and reads ``status.json``; the trainer
process (:mod:`.trainer`) reads ``job.json``, keeps ``status.json`` current and writes
the trained model's ``manifest.json``.  Both sides go through these records, so a field
one side misspells fails at once, naming the file and the field.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

from distillery.core.records import Record

Status = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class TrainerJob(Record):
    """``job.json``: what to train, written once when the job starts."""

    base_model: str  # a model directory or a hub id
    dataset_dir: str  # holds train.jsonl and val.jsonl
    dataset: str  # NAME@VERSION, for the model's manifest
    hyperparameters: dict[str, int | float] = {}  # only what the user gave
    lora: bool | None = None  # True/False force LoRA/full training; None lets the trainer choose
    merge: bool = False  # also save the base model with a LoRA adapter merged in
    keep_checkpoints: bool = False  # keep DIR/checkpoints once the job succeeds


class TrainerStatus(Record):
    """``status.json``: where the job stands, rewritten atomically as it moves."""

    status: Status
    updated_at: float | None = None
    settings: dict[str, Any] | None = None  # what the trainer chose, defaults included
    model_dir: str | None = None  # when it succeeded
    metrics: dict[str, Any] | None = None  # the model's manifest, when it succeeded
    error: dict[str, Any] | None = None  # {"message": ...} when it failed

    @classmethod
    def now(cls, status: Status, **fields: Any) -> TrainerStatus:
        return cls(status=status, updated_at=time.time(), **fields)


class TrainedModel(Record):
    """``manifest.json`` beside the trained weights: how they were made."""

    base_model: str
    dataset: str
    lora: bool
    settings: dict[str, Any]
    best_epoch: float | None  # the epoch whose weights were kept (None without validation)
    epochs_run: float
    device: str
    bf16: bool
    train_seconds: float
    first_train_loss: float | None
    final_train_loss: float | None
    valid_loss: float | None
    model_dir: str
    valid_accuracy: float | None = None  # the answer tokens predicted right, teacher-forced


def job_path(directory: Path) -> Path:
    return directory / "job.json"


def status_path(directory: Path) -> Path:
    return directory / "status.json"
