"""Fine-tuning on this machine: one trainer process (``trainer.py``) per job.

A job lives in ``<data dir>/finetunes/<job id>/``: the job description, the
trainer's status and events, checkpoints and the model.  That directory is the
job's "provider job id", so any process that can see it can follow the job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

from distillery.curation.training.backends import (
    BackendContext,
    FineTuneError,
    JobEvent,
    JobSpec,
    JobState,
    Started,
)
from distillery.curation.training.job_files import (
    TrainerJob,
    TrainerStatus,
    job_path,
    status_path,
)
from distillery.store.records import FineTuneJobRecord

# Started through a short-lived launcher so the trainer is nobody's child: it outlives
# the command that started it, and no process is left to reap it or warn about it.
LAUNCHER = (
    "import subprocess, sys; "
    "log = open(sys.argv[2], 'ab'); "
    "p = subprocess.Popen([sys.executable, '-m', 'distillery.curation.training.trainer', "
    "sys.argv[1]], stdout=log, stderr=subprocess.STDOUT, start_new_session=True); "
    "print(p.pid)"
)


class LocalBackend:
    name: ClassVar[str] = "local"
    local_models: ClassVar[bool] = True

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "finetunes"

    @classmethod
    def open(cls, context: BackendContext) -> LocalBackend:
        return cls(context.data_dir)

    def close(self) -> None:
        pass

    def start(self, spec: JobSpec) -> Started:
        import importlib.util

        if importlib.util.find_spec("trl") is None or importlib.util.find_spec("torch") is None:
            raise FineTuneError(
                "The local backend needs the training extra: "
                "pip install torch==2.13.0 'distillery[train]' (or a CUDA build of torch)."
            )
        directory = self.root / spec.job_id
        directory.mkdir(parents=True)
        given = spec.hyperparameters.given(
            "epochs", "batch_size", "learning_rate", "seed", "lora_r", "lora_alpha", "threads"
        )
        TrainerJob(
            base_model=spec.base_model,
            dataset_dir=str(spec.directory),
            dataset=spec.label,
            hyperparameters=given,
            lora=None if spec.method == "auto" else spec.method == "lora",
            merge=spec.merge,
            keep_checkpoints=spec.keep_checkpoints,
        ).write(job_path(directory))
        TrainerStatus(status="queued").write(status_path(directory))
        started = subprocess.run(
            [sys.executable, "-c", LAUNCHER, str(directory), str(directory / "train.log")],
            capture_output=True,
            text=True,
            check=True,
        )
        (directory / "pid").write_text(started.stdout.strip())
        return Started(str(directory), "queued", None, {**given, "merge": spec.merge})

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

    def state(self, job: FineTuneJobRecord) -> JobState:
        directory = _directory(job)
        status = TrainerStatus.read(status_path(directory))
        state: str = status.status
        error = status.error
        if state in ("queued", "running") and not self._alive(directory):
            state, error = (
                "failed",
                {"message": f"the trainer exited unexpectedly; see {directory / 'train.log'}"},
            )
        metrics = {
            k: v
            for k, v in (status.metrics or {}).items()
            if isinstance(v, (int, float)) or k == "device"
        }
        changes: JobState = {
            "status": state,
            "fine_tuned_model": status.model_dir,
            "metrics": metrics,
            "error": error,
        }
        if status.settings:  # what the trainer chose, defaults included
            changes["hyperparameters"] = {**(job["hyperparameters"] or {}), **status.settings}
        return changes

    def events(self, job: FineTuneJobRecord) -> list[JobEvent]:
        path = _directory(job) / "events.jsonl"
        if not path.exists():
            return []
        lines = path.read_text().splitlines()
        return [
            {"id": str(n), "level": "info", "message": "", "data": {}, **json.loads(line)}
            for n, line in enumerate(lines)
            if line.strip()
        ]

    def cancel(self, job: FineTuneJobRecord) -> str:
        directory = _directory(job)
        if self._alive(directory):
            os.kill(int((directory / "pid").read_text()), signal.SIGTERM)
            deadline = time.monotonic() + 60
            while self._alive(directory) and time.monotonic() < deadline:
                time.sleep(0.2)
        status = TrainerStatus.read(status_path(directory)).status
        if status in ("queued", "running"):
            TrainerStatus.now("cancelled").write(status_path(directory))
            return "cancelled"
        return status


def _directory(job: FineTuneJobRecord) -> Path:
    if not job["provider_job_id"]:
        raise FineTuneError(f"Job {job['id']} has no directory.")
    return Path(job["provider_job_id"])
