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

import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import openai
import sqlalchemy as sa

from distillery.errors import DistilleryError
from distillery.store import Store
from distillery.store.db import FINETUNES

TERMINAL = {"succeeded", "failed", "cancelled"}
REFUSED = (
    "The fine-tuning API refused the job: {message} "
    "(OpenAI closed self-serve fine-tuning to new accounts in May 2026 and takes no new jobs "
    "after 2027-01-06.) Use a provider that still takes jobs (--base-url), or train on your "
    "own hardware from `distillery dataset export NAME --format hf-parquet`."
)


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

    def events(self, provider_job_id: str) -> list[Any]:
        page = self._call(
            "read events", self.client.fine_tuning.jobs.list_events, provider_job_id, limit=100
        )
        return list(reversed(page.data))  # the API answers newest first

    def checkpoints(self, provider_job_id: str) -> list[Any]:
        page = self._call(
            "read checkpoints", self.client.fine_tuning.jobs.checkpoints.list, provider_job_id
        )
        return list(page.data)

    def cancel(self, provider_job_id: str) -> Any:
        return self._call("cancel", self.client.fine_tuning.jobs.cancel, provider_job_id)


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
    return {str(k): v for k, v in row._mapping.items()} if row else None


def all_jobs(store: Store, limit: int | None = 20) -> list[dict[str, Any]]:
    query = sa.select(FINETUNES).order_by(FINETUNES.c.id.desc())
    if limit:
        query = query.limit(limit)
    with store.engine.connect() as conn:
        return [{str(k): v for k, v in row._mapping.items()} for row in conn.execute(query)]


def refresh(store: Store, job: dict[str, Any], backend: OpenAIBackend) -> dict[str, Any]:
    """Read the provider's job and checkpoints into our record; returns the record."""
    remote = backend.retrieve(job["provider_job_id"])
    metrics = dict(job.get("metrics") or {})
    checkpoints = (
        backend.checkpoints(job["provider_job_id"]) if remote.status == "succeeded" else []
    )
    if checkpoints:
        latest = max(checkpoints, key=lambda c: c.step_number)
        metrics.update({k: v for k, v in latest.metrics.model_dump().items() if v is not None})
        metrics["checkpoints"] = [c.fine_tuned_model_checkpoint for c in checkpoints]
    error = remote.error.model_dump() if remote.error and remote.error.message else None
    changes = {
        "status": remote.status,
        "fine_tuned_model": remote.fine_tuned_model,
        "metrics": metrics,
        "error": error,
    }
    update(store, job["id"], **changes)
    return {**job, **changes}
