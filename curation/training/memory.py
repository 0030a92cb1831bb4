"""A fine-tuning backend that trains nothing: jobs live in this process and succeed on cue.

For tests and for trying a pipeline end to end without an API or a GPU.  Each
``state`` call moves a job one step: ``queued`` -> ``running`` -> ``succeeded``
(or ``failed``, for a base model whose name contains ``fail``).  The
fine-tuned model is named ``ft:<base model>:<job id>``, like OpenAI's.  Jobs are
kept per process, so a job started here is only followed here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from distillery.curation.training.backends import (
    BackendContext,
    FineTuneError,
    JobEvent,
    JobSpec,
    JobState,
    Started,
)
from distillery.store.records import FineTuneJobRecord

STEPS = ("queued", "running", "succeeded")


@dataclass
class _Job:
    spec: JobSpec
    step: int = 0
    events: list[JobEvent] = field(default_factory=list)
    cancelled: bool = False


class InMemoryBackend:
    name: ClassVar[str] = "memory"
    local_models: ClassVar[bool] = False
    jobs: ClassVar[dict[str, _Job]] = {}  # one process, one set of jobs, like one provider

    @classmethod
    def open(cls, context: BackendContext) -> InMemoryBackend:
        return cls()

    def close(self) -> None:
        pass

    def start(self, spec: JobSpec) -> Started:
        if spec.dataset["train_examples"] == 0:
            raise FineTuneError(f"{spec.label} has no training examples.")
        job = self.jobs[spec.job_id] = _Job(spec)
        self._event(job, f"Created job on {spec.label}")
        return Started(spec.job_id, "queued", None, spec.hyperparameters.given())

    def _job(self, record: FineTuneJobRecord) -> _Job:
        job = self.jobs.get(record["provider_job_id"] or "")
        if job is None:
            raise FineTuneError(f"No in-memory job {record['provider_job_id']!r} in this process.")
        return job

    def _event(self, job: _Job, message: str, **data: float) -> None:
        level = "error" if "fail" in message.lower() else "info"
        job.events.append(
            {"id": str(len(job.events)), "level": level, "message": message, "data": data}
        )

    def state(self, record: FineTuneJobRecord) -> JobState:
        job = self._job(record)
        if job.cancelled:
            return {"status": "cancelled", "fine_tuned_model": None, "metrics": {}, "error": None}
        failing = "fail" in job.spec.base_model
        if job.step < len(STEPS) - 1:
            job.step += 1
            if STEPS[job.step] == "running":
                self._event(job, "Training started", step=0)
            elif failing:
                self._event(job, "Training failed")
            else:
                self._event(job, "Training finished", step=1, train_loss=0.5)
        status = STEPS[job.step]
        if status == "succeeded" and failing:
            return {
                "status": "failed",
                "fine_tuned_model": None,
                "metrics": {},
                "error": {"message": "the base model is set to fail", "code": "memory_failure"},
            }
        done = status == "succeeded"
        return {
            "status": status,
            "fine_tuned_model": f"ft:{job.spec.base_model}:{record['id']}" if done else None,
            "metrics": {"train_loss": 0.5} if done else {},
            "error": None,
        }

    def events(self, record: FineTuneJobRecord) -> list[JobEvent]:
        return list(self._job(record).events)

    def cancel(self, record: FineTuneJobRecord) -> str:
        job = self._job(record)
        if STEPS[job.step] != "succeeded":
            job.cancelled = True
            return "cancelled"
        return "succeeded"
