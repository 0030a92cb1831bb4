"""Fine-tune jobs: the OpenAI fine-tuning API (or any provider that speaks it).

A job uploads a dataset version's train/validation files (``purpose="fine-tune"``),
creates a supervised job with the given hyperparameters, suffix, seed and
metadata naming the dataset version, and is recorded in the database, so every
``ft:...`` model traces back to the exact data it learned from.  ``refresh``
brings the record up to date (status, fine-tuned model, last metrics).

OpenAI closed self-serve fine-tuning to new accounts in May 2026 and takes no
new jobs after 2027-01-06: when the API refuses, the error says so and points
to the self-hosted backend.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
import sqlalchemy as sa

from distillery.errors import DistilleryError
from distillery.store import Store
from distillery.store.db import FINETUNES, as_record

TERMINAL = {"succeeded", "failed", "cancelled"}
REFUSED = (
    "The fine-tuning API refused the job: {message} "
    "(OpenAI closed self-serve fine-tuning to new accounts in May 2026 and takes no new jobs "
    "after 2027-01-06.) Train on your own hardware instead: --backend local "
    "(pip install torch==2.13.0 'distillery[train]'), or use a provider that still takes jobs (--base-url)."
)


MIN_EXAMPLES = 10  # OpenAI's fine-tuning API refuses a training file with fewer


class FineTuneError(DistilleryError):
    """A fine-tune could not be started, read or cancelled."""


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    return str(body.get("message") or exc.message)


def new_job_id() -> str:
    return f"ftjob_{time.time_ns():016x}{secrets.token_hex(3)}"


class OpenAIBackend:
    def __init__(self, base_url: str | None, api_key: str | None) -> None:
        self.base_url = base_url
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=3)

    def _call(self, what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (openai.PermissionDeniedError, openai.AuthenticationError) as exc:
            raise FineTuneError(REFUSED.format(message=_message(exc))) from None
        except openai.APIStatusError as exc:
            if exc.status_code == 404 and what == "create":
                raise FineTuneError(REFUSED.format(message=_message(exc))) from None
            raise FineTuneError(
                f"Could not {what}: HTTP {exc.status_code}: {_message(exc)}"
            ) from None
        except openai.APIConnectionError as exc:
            raise FineTuneError(
                f"Could not {what}: cannot reach {self.base_url or 'OpenAI'} ({exc})."
            ) from None

    def create(
        self,
        directory: Path,
        base_model: str,
        hyperparameters: dict[str, Any],
        *,
        suffix: str | None,
        seed: int | None,
        metadata: dict[str, str],
    ) -> Any:
        train = directory / "train.jsonl"
        examples = _examples(train)
        if examples < MIN_EXAMPLES:
            # Checked here: the provider would accept the upload, start the job and fail it.
            raise FineTuneError(
                f"{train} has {examples} examples; OpenAI's fine-tuning API needs at least "
                f"{MIN_EXAMPLES}. Capture more calls and build the dataset again, or fine-tune "
                "with --backend local."
            )
        files = {}
        for split in ("train", "val"):
            path = directory / f"{split}.jsonl"
            if path.exists() and path.stat().st_size:
                with path.open("rb") as handle:
                    uploaded = self._call(
                        "upload files",
                        self.client.files.create,
                        file=(path.name, handle),
                        purpose="fine-tune",
                    )
                files[split] = uploaded.id
        if "train" not in files:
            raise FineTuneError(
                f"{directory}/train.jsonl is empty: build the dataset with more calls first."
            )
        options: dict[str, Any] = {}
        if suffix:
            options["suffix"] = suffix
        if seed is not None:
            options["seed"] = seed
        if "val" in files:
            options["validation_file"] = files["val"]
        return self._call(
            "create",
            self.client.fine_tuning.jobs.create,
            model=base_model,
            training_file=files["train"],
            method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
            metadata=metadata,
            **options,
        )

    def retrieve(self, provider_job_id: str) -> Any:
        return self._call("read the job", self.client.fine_tuning.jobs.retrieve, provider_job_id)

    def _optional(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        """An endpoint that only adds detail (events, checkpoints): ``None`` where the
        provider has none, so a job that succeeded is never recorded as failed for it."""
        try:
            return function(*args, **kwargs)
        except openai.APIStatusError as exc:
            if exc.status_code in (404, 405, 501):
                return None
            raise FineTuneError(f"HTTP {exc.status_code}: {_message(exc)}") from None
        except openai.APIConnectionError as exc:
            raise FineTuneError(f"cannot reach {self.base_url or 'OpenAI'} ({exc}).") from None

    def events(self, provider_job_id: str) -> list[Any]:
        page = self._optional(self.client.fine_tuning.jobs.list_events, provider_job_id, limit=100)
        return list(reversed(page.data)) if page is not None else []  # newest first

    def checkpoints(self, provider_job_id: str) -> list[Any]:
        page = self._optional(self.client.fine_tuning.jobs.checkpoints.list, provider_job_id)
        return list(page.data) if page is not None else []

    def cancel(self, job: dict[str, Any]) -> str:
        remote = self._call("cancel", self.client.fine_tuning.jobs.cancel, job["provider_job_id"])
        return str(remote.status)

    def state(self, job: dict[str, Any]) -> dict[str, Any]:
        remote = self.retrieve(job["provider_job_id"])
        metrics = dict(job.get("metrics") or {})
        if remote.status == "succeeded":
            checkpoints = self.checkpoints(job["provider_job_id"])
            if checkpoints:
                latest = max(checkpoints, key=lambda c: c.step_number)
                metrics.update(
                    {k: v for k, v in latest.metrics.model_dump().items() if v is not None}
                )
                metrics["checkpoints"] = [c.fine_tuned_model_checkpoint for c in checkpoints]
        error = remote.error.model_dump() if remote.error and remote.error.message else None
        return {
            "status": remote.status,
            "fine_tuned_model": remote.fine_tuned_model,
            "metrics": metrics,
            "error": error,
        }

    def job_events(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        return [
            {
                "id": e.id,
                "level": e.level,
                "message": e.message,
                "data": e.data if isinstance(e.data, dict) else {},
            }
            for e in self.events(job["provider_job_id"])
        ]


def _examples(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())


def record(store: Store, values: dict[str, Any]) -> dict[str, Any]:
    now = datetime.now(UTC)
    row = {"created_at": now, "updated_at": now, "metrics": {}, "error": None, **values}
    with store.engine.begin() as conn:
        conn.execute(FINETUNES.insert().values(**row))
    return row


def update(store: Store, job_id: str, **values: Any) -> None:
    with store.engine.begin() as conn:
        conn.execute(
            FINETUNES.update()
            .where(FINETUNES.c.id == job_id)
            .values(updated_at=datetime.now(UTC), **values)
        )


def get(store: Store, job_id: str) -> dict[str, Any] | None:
    with store.engine.connect() as conn:
        row = conn.execute(
            sa.select(FINETUNES).where(
                sa.or_(FINETUNES.c.id == job_id, FINETUNES.c.provider_job_id == job_id)
            )
        ).first()
    return as_record(row) if row else None


def all_jobs(store: Store, limit: int | None = 20) -> list[dict[str, Any]]:
    query = sa.select(FINETUNES).order_by(FINETUNES.c.id.desc())
    if limit:
        query = query.limit(limit)
    with store.engine.connect() as conn:
        return [as_record(row) for row in conn.execute(query)]


def refresh(store: Store, job: dict[str, Any], backend: Any) -> dict[str, Any]:
    """Bring the record up to date from its backend; returns the record."""
    changes = backend.state(job)
    update(store, job["id"], **changes)
    return {**job, **changes}


class LocalBackend:
    """Training on this machine: a ``trainer`` process per job, in ``<data dir>/finetunes``.

    The "provider job id" of a local job is its directory, which holds the
    job description, the trainer's status and events, checkpoints and the model.
    """

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "finetunes"

    def create(
        self,
        job_id: str,
        dataset_dir: Path,
        dataset: str,
        base_model: str,
        hyperparameters: dict[str, Any],
        *,
        lora: bool | None,
        merge: bool,
    ) -> Path:
        """Start the trainer; ``lora`` True/False forces LoRA/full, None lets it choose."""
        import importlib.util

        if importlib.util.find_spec("trl") is None or importlib.util.find_spec("torch") is None:
            raise FineTuneError(
                "The local backend needs the training extra: "
                "pip install torch==2.13.0 'distillery[train]' (or a CUDA build of torch)."
            )
        directory = self.root / job_id
        directory.mkdir(parents=True)
        job = {
            "base_model": base_model,
            "dataset_dir": str(dataset_dir),
            "dataset": dataset,
            "hyperparameters": hyperparameters,
            "lora": lora,
            "merge": merge,
        }
        (directory / "job.json").write_text(json.dumps(job, indent=2))
        (directory / "status.json").write_text(json.dumps({"status": "queued"}))
        # Started through a short-lived launcher so the trainer is nobody's child: it
        # outlives this command, and no process is left to reap it or warn about it.
        launcher = (
            "import subprocess, sys; "
            "log = open(sys.argv[2], 'ab'); "
            "p = subprocess.Popen([sys.executable, '-m', 'distillery.curation.training.trainer', sys.argv[1]], "
            "stdout=log, stderr=subprocess.STDOUT, start_new_session=True); "
            "print(p.pid)"
        )
        started = subprocess.run(
            [sys.executable, "-c", launcher, str(directory), str(directory / "train.log")],
            capture_output=True,
            text=True,
            check=True,
        )
        (directory / "pid").write_text(started.stdout.strip())
        return directory

    @staticmethod
    def _alive(directory: Path) -> bool:
        try:
            pid = int((directory / "pid").read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return False
        # A finished child we never waited for is a zombie: not alive for us.
        try:
            with open(f"/proc/{pid}/stat") as handle:
                return handle.read().split()[2] != "Z"
        except OSError:
            return True

    def state(self, job: dict[str, Any]) -> dict[str, Any]:
        directory = Path(job["provider_job_id"])
        status = json.loads((directory / "status.json").read_text())
        state = status["status"]
        error = status.get("error")
        if state in ("queued", "running") and not self._alive(directory):
            state, error = (
                "failed",
                {"message": f"the trainer exited unexpectedly; see {directory / 'train.log'}"},
            )
        metrics = {
            k: v
            for k, v in (status.get("metrics") or {}).items()
            if isinstance(v, (int, float)) or k == "device"
        }
        changes = {
            "status": state,
            "fine_tuned_model": status.get("model_dir"),
            "metrics": metrics,
            "error": error,
        }
        if status.get("settings"):  # what the trainer chose, defaults included
            changes["hyperparameters"] = {
                **(job.get("hyperparameters") or {}),
                **status["settings"],
            }
        return changes

    def job_events(self, job: dict[str, Any]) -> list[dict[str, Any]]:
        path = Path(job["provider_job_id"]) / "events.jsonl"
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        return [{"id": str(n), **json.loads(line)} for n, line in enumerate(lines) if line.strip()]

    def cancel(self, job: dict[str, Any]) -> str:
        directory = Path(job["provider_job_id"])
        if self._alive(directory):
            os.kill(int((directory / "pid").read_text()), signal.SIGTERM)
            deadline = time.monotonic() + 60
            while self._alive(directory) and time.monotonic() < deadline:
                time.sleep(0.2)
        status = json.loads((directory / "status.json").read_text())["status"]
        if status in ("queued", "running"):
            _write_status(directory, "cancelled")
            return "cancelled"
        return str(status)


def _write_status(directory: Path, state: str) -> None:
    (directory / "status.json").write_text(json.dumps({"status": state, "updated_at": time.time()}))
