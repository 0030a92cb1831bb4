"""``distillery finetune``: fine-tune a student on a dataset version, and follow the job."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from distillery.commands.output import output_options, write_rows
from distillery.commands.shared import (
    TrainingProgress,
    count_option,
    fail_on_errors,
    hyperparameter,
    local_method,
    local_method_options,
    open_cli_store,
    resolve,
    store_options,
)
from distillery.core.config import load_settings
from distillery.core.serialize import dumps
from distillery.curation.endpoints import Endpoint
from distillery.curation.training import jobs
from distillery.curation.training.backends import (
    BackendContext,
    FineTuneBackend,
    Hyperparameters,
    JobSpec,
    new_job_id,
)
from distillery.curation.training.jobs import start_job
from distillery.curation.training.registry import open_backend
from distillery.store import Store, finetunes
from distillery.store.records import FineTuneJobRecord

JOB_COLUMNS = (
    "id",
    "created_at",
    "status",
    "dataset",
    "dataset_version",
    "base_model",
    "fine_tuned_model",
)


def _open(
    name: str, config: Path | None, base_url: str | None, api_key_env: str | None
) -> FineTuneBackend:
    """A backend for this command, closed when the command ends."""

    context = BackendContext(
        data_dir=load_settings(config).storage.resolved_data_dir(),
        endpoint=Endpoint.from_env("fine-tuning", base_url, api_key_env),
    )
    backend = open_backend(name, context)
    click.get_current_context().call_on_close(backend.close)
    return backend


def _backend_for(
    job: FineTuneJobRecord, config: Path | None, api_key_env: str | None
) -> FineTuneBackend:
    """The backend that started ``job``, at the address it was started at."""
    return _open(job["backend"], config, job["base_url"], api_key_env)


@click.group()
def finetune() -> None:
    """Fine-tune a student model on a dataset version (OpenAI's fine-tuning API)."""


@finetune.command()
@store_options
@click.option(
    "--dataset",
    "dataset_ref",
    required=True,
    metavar="NAME[@VERSION]",
    help="The dataset version to train on.",
)
@click.option(
    "--base-model", required=True, help="openai: a model name; local: a model directory or hub id."
)
@click.option(
    "--backend",
    default="openai",
    show_default=True,
    metavar="NAME",
    help="openai: OpenAI's fine-tuning API or any provider speaking it (--base-url); local: TRL + PEFT here; memory: in-process, trains nothing (tests); or a plugin's.",
)
@click.option(
    "--base-url",
    envvar="DISTILLERY_FINETUNE_BASE_URL",
    help="Fine-tuning API base URL  [default: OPENAI_BASE_URL]",
)
@click.option("--api-key-env", help="Env var with the API key  [default: OPENAI_API_KEY]")
@hyperparameter(
    "epochs",
    "--epochs",
    "n_epochs",
    help="Training epochs  [default: openai auto; local: until the validation loss stops "
    "improving, keeping the best epoch]",
)
@hyperparameter(
    "batch_size",
    help="[default: openai auto; local: 8-32 from scratch (about 40 steps an epoch), "
    "16 small, 8 LoRA]",
)
@hyperparameter(
    "learning_rate_multiplier",
    help="openai only  [default: auto]",
)
@hyperparameter(
    "learning_rate",
    help="local only  [default: 1e-3 from scratch, 1e-4 small, 2e-4 LoRA]",
)
@hyperparameter("lora_r", help="local: LoRA rank  [default: 16]")
@hyperparameter("lora_alpha", help="local: LoRA alpha  [default: 32]")
@local_method_options
@click.option(
    "--merge", is_flag=True, help="local: also save the base model with the LoRA adapter merged in."
)
@click.option("--suffix", help="openai: up to 64 characters added to the fine-tuned model's name.")
@click.option("--seed", type=int, help="For reproducible jobs.")
@click.option(
    "--keep-checkpoints",
    is_flag=True,
    help="local: keep the per-epoch checkpoints once the job succeeds (removed by default).",
)
@click.option(
    "--watch",
    "follow",
    is_flag=True,
    help="Follow the job until it ends, as `finetune watch` does (exit 1 unless it succeeds).",
)
@fail_on_errors
def create(
    config: Path | None,
    database_url: str | None,
    dataset_ref: str,
    base_model: str,
    backend: str,
    base_url: str | None,
    api_key_env: str | None,
    n_epochs: int | None,
    batch_size: int | None,
    learning_rate_multiplier: float | None,
    learning_rate: float | None,
    lora_r: int | None,
    lora_alpha: int | None,
    full: bool,
    lora: bool,
    threads: int | None,
    merge: bool,
    suffix: str | None,
    seed: int | None,
    keep_checkpoints: bool,
    follow: bool,
) -> None:
    """Start a fine-tune of --base-model on a dataset version; prints the job id.

    \b
    Examples:
        distillery finetune create --dataset support-bot --base-model gpt-4.1-mini-2025-04-14 --suffix support
        distillery finetune create --dataset support-bot --backend local --base-model ./qwen --merge
        distillery finetune watch ftjob_...
    """

    store = open_cli_store(config, database_url)
    spec = JobSpec(
        job_id=new_job_id(),
        dataset=resolve(store, dataset_ref),
        base_model=base_model,
        hyperparameters=Hyperparameters(
            epochs=n_epochs,
            batch_size=batch_size,
            learning_rate=learning_rate,
            learning_rate_multiplier=learning_rate_multiplier,
            lora_r=lora_r,
            lora_alpha=lora_alpha,
            threads=threads,
            seed=seed,
        ),
        method=local_method(full, lora),
        merge=merge,
        suffix=suffix,
        keep_checkpoints=keep_checkpoints,
    )
    opened = _open(backend, config, base_url, api_key_env)
    job = start_job(store, opened, spec)
    click.echo(
        f"Started {job['id']} ({job['provider_job_id']}) on {spec.label}: {job['status']}.",
        err=True,
    )
    click.echo(job["id"])
    if follow:
        _follow(store, job, opened, 2.0 if backend == "local" else 10.0, as_json=False)


@finetune.command(name="list")
@store_options
@count_option
@output_options
@fail_on_errors
def list_command(config: Path | None, database_url: str | None, limit: int, fmt: str) -> None:
    """List fine-tune jobs, newest first, as last seen (`status` refreshes one)."""

    store = open_cli_store(config, database_url)
    write_rows(
        finetunes.list_jobs(store, limit or None), fmt, JOB_COLUMNS, empty="No fine-tune jobs yet."
    )


@finetune.command()
@store_options
@click.argument("job_id", metavar="JOB")
@click.option("--api-key-env", help="Env var with the API key  [default: OPENAI_API_KEY]")
@click.option("--json", "as_json", is_flag=True)
@fail_on_errors
def status(
    config: Path | None,
    database_url: str | None,
    job_id: str,
    api_key_env: str | None,
    as_json: bool,
) -> None:
    """Refresh a job from its provider and show it (status, model, metrics, checkpoints)."""

    store = open_cli_store(config, database_url)
    job = jobs.find(store, job_id)
    job = jobs.refresh(store, job, _backend_for(job, config, api_key_env))
    if as_json:
        click.echo(dumps(job, indent=True))
        return
    click.echo(
        f"{job['id']}  {job['status']}  {job['base_model']} on {job['dataset']}@{job['dataset_version']}"
    )
    if job["fine_tuned_model"]:
        click.echo(f"model: {job['fine_tuned_model']}")
    settings = {k: v for k, v in (job["hyperparameters"] or {}).items() if v is not None}
    if settings:
        click.echo("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    metrics = {k: v for k, v in (job["metrics"] or {}).items() if k != "checkpoints"}
    if metrics:
        click.echo("metrics: " + ", ".join(f"{k}={v}" for k, v in metrics.items()))
    if job["error"]:
        click.echo(f"error: {job['error'].get('message')}")


@finetune.command()
@store_options
@click.argument("job_id", metavar="JOB")
@click.option("--api-key-env", help="Env var with the API key  [default: OPENAI_API_KEY]")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.01),
    default=10.0,
    show_default=True,
    help="Seconds between polls.",
)
@click.option("--json", "as_json", is_flag=True, help="Every event as a JSON line on stdout.")
@fail_on_errors
def watch(
    config: Path | None,
    database_url: str | None,
    job_id: str,
    api_key_env: str | None,
    interval: float,
    as_json: bool,
) -> None:
    """Follow a job until it ends: on a terminal one line with the epoch, step, losses and
    time left; in a pipe a line per epoch; --json every event.

    Exits 0 when the job succeeds and 1 when it fails or is cancelled.
    """

    store = open_cli_store(config, database_url)
    job = jobs.find(store, job_id)
    _follow(store, job, _backend_for(job, config, api_key_env), interval, as_json)


def _follow(
    store: Store, job: FineTuneJobRecord, backend: FineTuneBackend, interval: float, as_json: bool
) -> None:
    """Show a job's progress until it ends; exit 1 unless it succeeded."""
    with TrainingProgress(as_json) as progress:
        job = jobs.wait(store, job, backend, interval, progress)
    click.echo(
        f"{job['id']} {job['status']}"
        + (f": {job['fine_tuned_model']}" if job["fine_tuned_model"] else ""),
        err=True,
    )
    if job["status"] != "succeeded":
        sys.exit(1)


@finetune.command()
@store_options
@click.argument("job_id", metavar="JOB")
@click.option("--api-key-env", help="Env var with the API key  [default: OPENAI_API_KEY]")
@fail_on_errors
def cancel(
    config: Path | None, database_url: str | None, job_id: str, api_key_env: str | None
) -> None:
    """Cancel a running job."""

    store = open_cli_store(config, database_url)
    job = jobs.find(store, job_id)
    status = jobs.cancel(store, job, _backend_for(job, config, api_key_env))
    click.echo(f"{job['id']}: {status}")
