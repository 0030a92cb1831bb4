"""Fine-tuning through OpenAI's API, or any provider that speaks it.

A job uploads a dataset version's train/validation files (``purpose="fine-tune"``)
and creates a supervised job with the hyperparameters, suffix, seed and metadata
naming the dataset version, so every ``ft:...`` model traces back to the exact
data it learned from.

OpenAI closed self-serve fine-tuning to new accounts in May 2026 and takes no
new jobs after 2027-01-06: when the API refuses, the error says so and points
to the self-hosted backend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import openai

from distillery.curation.endpoints import Endpoint
from distillery.curation.training.backends import (
    BackendContext,
    FineTuneError,
    JobEvent,
    JobSpec,
    JobState,
    Started,
)
from distillery.store.records import FineTuneJobRecord

REFUSED = (
    "The fine-tuning API refused the job: {message} "
    "(OpenAI closed self-serve fine-tuning to new accounts in May 2026 and takes no new jobs "
    "after 2027-01-06.) Train on your own hardware instead: --backend local "
    "(pip install torch==2.13.0 'distillery[train]'), or use a provider that still takes jobs "
    "(--base-url)."
)
MIN_EXAMPLES = 10  # OpenAI's fine-tuning API refuses a training file with fewer
MAX_EPOCHS = 50  # and n_epochs above this (its spec: 1 to 50)


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    return str(body.get("message") or exc.message)


class OpenAIBackend:
    name: ClassVar[str] = "openai"
    local_models: ClassVar[bool] = False

    def __init__(self, base_url: str | None, api_key: str | None) -> None:
        self.base_url = base_url
        self.client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=3)

    @classmethod
    def open(cls, context: BackendContext) -> OpenAIBackend:
        endpoint = context.endpoint or Endpoint.from_env("fine-tuning")
        endpoint.check()  # never the SDK's fallback to another key, never its traceback
        return cls(endpoint.base_url, endpoint.api_key)

    def close(self) -> None:
        self.client.close()

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

    def start(self, spec: JobSpec) -> Started:
        epochs = spec.hyperparameters.epochs
        if epochs is not None and epochs > MAX_EPOCHS:
            raise FineTuneError(
                f"OpenAI's fine-tuning API takes at most {MAX_EPOCHS} epochs, not {epochs}."
            )
        train = spec.directory / "train.jsonl"
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
            path = spec.directory / f"{split}.jsonl"
            if path.exists() and path.stat().st_size:
                with path.open("rb") as handle:
                    uploaded = self._call(
                        "upload files",
                        self.client.files.create,
                        file=(path.name, handle),
                        purpose="fine-tune",
                    )
                files[split] = uploaded.id
        hyper = spec.hyperparameters
        sent = hyper.given("batch_size", "learning_rate_multiplier")
        if hyper.epochs is not None:
            sent["n_epochs"] = hyper.epochs
        options: dict[str, Any] = {}
        if spec.suffix:
            options["suffix"] = spec.suffix
        if hyper.seed is not None:
            options["seed"] = hyper.seed
        if "val" in files:
            options["validation_file"] = files["val"]
        remote = self._call(
            "create",
            self.client.fine_tuning.jobs.create,
            model=spec.base_model,
            training_file=files["train"],
            method={"type": "supervised", "supervised": {"hyperparameters": sent}},
            metadata={
                "distillery_job": spec.job_id,
                "dataset": spec.label,
                "dataset_hash": spec.dataset["content_hash"][:32],
            },
            **options,
        )
        recorded = {**sent, "suffix": spec.suffix, "seed": hyper.seed}
        return Started(remote.id, remote.status, self.base_url, recorded)

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

    def _checkpoints(self, provider_job_id: str) -> list[Any]:
        page = self._optional(self.client.fine_tuning.jobs.checkpoints.list, provider_job_id)
        return list(page.data) if page is not None else []

    def state(self, job: FineTuneJobRecord) -> JobState:
        provider_id = _provider_id(job)
        remote = self._call("read the job", self.client.fine_tuning.jobs.retrieve, provider_id)
        metrics = dict(job.get("metrics") or {})
        if remote.status == "succeeded":
            checkpoints = self._checkpoints(provider_id)
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

    def events(self, job: FineTuneJobRecord) -> list[JobEvent]:
        page = self._optional(
            self.client.fine_tuning.jobs.list_events, _provider_id(job), limit=100
        )
        return [
            {
                "id": e.id,
                "level": e.level,
                "message": e.message,
                "data": e.data if isinstance(e.data, dict) else {},
            }
            for e in (reversed(page.data) if page is not None else [])  # newest first
        ]

    def cancel(self, job: FineTuneJobRecord) -> str:
        remote = self._call("cancel", self.client.fine_tuning.jobs.cancel, _provider_id(job))
        return str(remote.status)


def _provider_id(job: FineTuneJobRecord) -> str:
    if not job["provider_job_id"]:
        raise FineTuneError(f"Job {job['id']} has no provider job id.")
    return job["provider_job_id"]


def _examples(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open("rb") as handle:
        return sum(1 for line in handle if line.strip())
