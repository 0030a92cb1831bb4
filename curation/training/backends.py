"""The interface every fine-tuning backend implements (:mod:`.registry` names them).

A backend turns a :class:`JobSpec` (a dataset version, a base model, the
hyperparameters) into a running job somewhere, and reports on it later.  It
never touches the database: :mod:`.jobs` records what it started and what it
reports, so every backend's jobs look the same to ``finetune list``, ``distill``
and the dashboard.

Built in: ``openai`` (OpenAI's fine-tuning API or any provider speaking it),
``local`` (TRL + PEFT on this machine) and ``memory`` (in-process, for tests
and for trying a pipeline).  A package adds its own through the
``distillery.backends`` entry point group, or code calls
:func:`distillery.curation.training.registry.register`; see "Extending
Distillery" in the README.  This module imports no backend, so a backend
imports it freely.

    FineTuneError (DistilleryError)   a job could not be started, read or cancelled
"""

from __future__ import annotations

import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, TypedDict, runtime_checkable

from distillery.core.errors import DistilleryError
from distillery.curation.endpoints import Endpoint
from distillery.store.records import DatasetVersionRecord, FineTuneJobRecord

TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
Method = Literal["auto", "full", "lora"]


class FineTuneError(DistilleryError):
    """A fine-tune could not be started, read or cancelled."""


def new_job_id() -> str:
    return f"ftjob_{time.time_ns():016x}{secrets.token_hex(3)}"


@dataclass(frozen=True)
class Limit:
    """The values a hyperparameter may take: ``low`` (excluded when ``open``) to ``high``."""

    low: float
    high: float | None = None
    open: bool = False
    kind: type[int] | type[float] = int

    def admits(self, value: float) -> bool:
        above = value > self.low if self.open else value >= self.low
        return above and (self.high is None or value <= self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'above' if self.open else 'at least'} {self.low:g}"
        return f"from {self.low:g} to {self.high:g}"


# Whoever sets them (flags, the dashboard's form, a caller of the API), the same ranges.
LIMITS = {
    "epochs": Limit(1, 500),
    "batch_size": Limit(1, 256),
    "learning_rate": Limit(0, open=True, kind=float),
    "learning_rate_multiplier": Limit(0, open=True, kind=float),
    "lora_r": Limit(1, 1024),
    "lora_alpha": Limit(1, 4096),
    "threads": Limit(1, 256),
}
SUFFIX_LENGTH = 64  # OpenAI's limit on a fine-tuned model name's suffix


@dataclass(frozen=True)
class Hyperparameters:
    """What the user asked for; ``None`` leaves the choice to the backend.

    Each backend sends the ones it understands (OpenAI: epochs, batch size,
    learning-rate multiplier and seed; local: all but the multiplier).  A value
    outside :data:`LIMITS` is refused here, whoever asked for it.
    """

    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    learning_rate_multiplier: float | None = None
    lora_r: int | None = None
    lora_alpha: int | None = None
    threads: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            if value is not None and not limit.admits(value):
                raise FineTuneError(f"{name.replace('_', ' ')} must be {limit}, not {value}.")

    def given(self, *names: str) -> dict[str, Any]:
        """The values that were set, among ``names`` (all when none are named)."""
        return {
            k: v for k, v in asdict(self).items() if v is not None and (not names or k in names)
        }


def check_model(base_model: str, suffix: str | None = None) -> None:
    """What a :class:`JobSpec` refuses in its model and suffix (a form checks it before
    the dataset the spec will name is built)."""
    if not base_model.strip():
        raise FineTuneError("Name the base model to fine-tune.")
    if suffix is not None and len(suffix) > SUFFIX_LENGTH:
        raise FineTuneError(f"The suffix can be at most {SUFFIX_LENGTH} characters.")


@dataclass(frozen=True)
class JobSpec:
    """One fine-tune to start: what to train, on what, how."""

    job_id: str
    dataset: DatasetVersionRecord
    base_model: str
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    method: Method = "auto"  # local: force full training or LoRA; auto lets the trainer choose
    merge: bool = False  # local: also save the base model with a LoRA adapter merged in
    suffix: str | None = None  # openai: added to the fine-tuned model's name
    keep_checkpoints: bool = False  # local: keep the per-epoch checkpoints after success

    def __post_init__(self) -> None:
        check_model(self.base_model, self.suffix)

    @property
    def label(self) -> str:
        return f"{self.dataset['name']}@{self.dataset['version']}"

    @property
    def directory(self) -> Path:
        """Where the version's train.jsonl and val.jsonl are."""
        return Path(self.dataset["path"])


@dataclass(frozen=True)
class Started:
    provider_job_id: str
    status: str
    base_url: str | None
    hyperparameters: dict[str, Any]  # what the job record keeps: what was actually sent


class JobState(TypedDict, total=False):
    """A job as its backend sees it now; ``hyperparameters`` only when the backend chose some."""

    status: str
    fine_tuned_model: str | None
    metrics: dict[str, Any]
    error: dict[str, Any] | None
    hyperparameters: dict[str, Any]


class JobEvent(TypedDict):
    id: str
    level: str
    message: str
    data: dict[str, Any]


@runtime_checkable
class FineTuneBackend(Protocol):
    """Start fine-tunes somewhere and report on them."""

    # The name jobs are recorded under (the `backend` column) and `--backend` takes.
    name: ClassVar[str]
    # True when a fine-tuned model is a directory on this machine (`distill` serves it);
    # False when it is a model name its provider serves (`distill` calls it there).
    local_models: ClassVar[bool]

    def start(self, spec: JobSpec) -> Started:
        """Start the job; raise :class:`FineTuneError` when it cannot start, saying why."""
        ...

    def state(self, job: FineTuneJobRecord) -> JobState:
        """Status, fine-tuned model, metrics and error of a job this backend started."""
        ...

    def events(self, job: FineTuneJobRecord) -> list[JobEvent]:
        """The job's events, oldest first (ids stable across calls)."""
        ...

    def cancel(self, job: FineTuneJobRecord) -> str:
        """Cancel the job; returns its status afterwards."""
        ...

    def close(self) -> None:
        """Release what the backend holds (an HTTP client); called once, at the end."""
        ...


@dataclass(frozen=True)
class BackendContext:
    """What a backend may need to open: where its API is and with which key, where data lives."""

    data_dir: Path
    endpoint: Endpoint | None = None  # None: OPENAI_BASE_URL / OPENAI_API_KEY
