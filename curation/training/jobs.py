"""Starting and following fine-tune jobs on any backend, recorded in the store.

``finetune create`` and ``distill`` both start jobs with :func:`start_job`, so a
job looks the same whoever started it: the same metadata sent, the same
hyperparameters recorded, the same row.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from distillery.curation.training.backends import (
    TERMINAL,
    FineTuneBackend,
    FineTuneError,
    JobEvent,
    JobSpec,
)
from distillery.store import Store, finetunes
from distillery.store.records import FineTuneJobRecord


def start_job(store: Store, backend: FineTuneBackend, spec: JobSpec) -> FineTuneJobRecord:
    """Start ``spec`` on ``backend`` and record it; returns the stored job."""
    started = backend.start(spec)
    return finetunes.insert(
        store,
        {
            "id": spec.job_id,
            "backend": backend.name,
            "base_url": started.base_url,
            "provider_job_id": started.provider_job_id,
            "dataset": spec.dataset["name"],
            "dataset_version": spec.dataset["version"],
            "base_model": spec.base_model,
            "status": started.status,
            "hyperparameters": started.hyperparameters,
        },
    )


def find(store: Store, job_id: str) -> FineTuneJobRecord:
    """A job by our id or its provider's, or an error naming how to see the ids."""
    job = finetunes.get(store, job_id)
    if job is None:
        raise FineTuneError(
            f"No fine-tune job {job_id!r}. Run `distillery finetune list` to see ids."
        )
    return job


def refresh(store: Store, job: FineTuneJobRecord, backend: FineTuneBackend) -> FineTuneJobRecord:
    """Bring the record up to date from its backend; returns the record."""
    changes = backend.state(job)
    finetunes.update(store, job["id"], **changes)
    updated: FineTuneJobRecord = {**job, **changes}
    return updated


def wait(
    store: Store,
    job: FineTuneJobRecord,
    backend: FineTuneBackend,
    poll: float,
    on_event: Callable[[JobEvent], None] | None = None,
) -> FineTuneJobRecord:
    """Follow a job until it ends; ``on_event`` sees each new event once, in order."""
    seen: set[str] = set()
    while True:
        # Refresh first, then read events: the events of the final state are shown too.
        job = refresh(store, job, backend)
        if on_event is not None:
            for event in backend.events(job):
                if event["id"] not in seen:
                    seen.add(event["id"])
                    on_event(event)
        if job["status"] in TERMINAL:
            return job
        time.sleep(poll)


def cancel(store: Store, job: FineTuneJobRecord, backend: FineTuneBackend) -> str:
    status = backend.cancel(job)
    finetunes.update(store, job["id"], status=status)
    return status
