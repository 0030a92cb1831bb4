"""``distillery finetune``: fine-tune a student on a dataset version, and follow the job."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click

from distillery.cli_shared import (
    count_option,
    fail_on_errors,
    local_method_options,
    open_cli_store,
    store_options,
)
from distillery.errors import DistilleryError
from distillery.output import output_options, write_rows

JOB_COLUMNS = (
    "id",
    "created_at",
    "status",
    "dataset",
    "dataset_version",
    "base_model",
    "fine_tuned_model",
)


def _backend(job_or_url: str | None, api_key_env: str | None) -> Any:
    from distillery.curation.evals.generate import Endpoint
    from distillery.curation.training.finetune import OpenAIBackend

    endpoint = Endpoint.from_env("fine-tuning", job_or_url, api_key_env)
    endpoint.check()  # never the SDK's fallback to another key, never its traceback
    backend = OpenAIBackend(job_or_url, endpoint.api_key)
    click.get_current_context().call_on_close(backend.client.close)
    return backend


def _backend_for(job: dict[str, Any], api_key_env: str | None, config: Path | None) -> Any:
    if job["backend"] == "local":
        from distillery.config import load_settings
        from distillery.curation.training.finetune import LocalBackend

        return LocalBackend(load_settings(config).storage.resolved_data_dir())
    return _backend(job["base_url"], api_key_env)


def _job(store: Any, job_id: str) -> dict[str, Any]:
    from distillery.curation.training import finetune

    job = finetune.get(store, job_id)
    if job is None:
        raise DistilleryError(
            f"No fine-tune job {job_id!r}. Run `distillery finetune list` to see ids."
        )
    return job


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
    type=click.Choice(["openai", "local"]),
    default="openai",
    show_default=True,
    help="openai: OpenAI's fine-tuning API or any provider speaking it (--base-url); local: TRL + PEFT here.",
)
@click.option(
    "--base-url",
    envvar="DISTILLERY_FINETUNE_BASE_URL",
    help="Fine-tuning API base URL  [default: OPENAI_BASE_URL]",
)
@click.option("--api-key-env", help="Env var with the API key  [default: OPENAI_API_KEY]")
@click.option(
    "--epochs",
    "n_epochs",
    type=click.IntRange(1, 50),
    help="Training epochs  [default: openai auto; local: until the validation loss stops "
    "improving, keeping the best epoch]",
)
@click.option(
    "--batch-size",
    type=click.IntRange(1, 256),
    help="[default: openai auto; local: 8-32 from scratch (about 40 steps an epoch), "
    "16 small, 8 LoRA]",
)
@click.option(
    "--learning-rate-multiplier",
    type=click.FloatRange(min=0, min_open=True),
    help="openai only  [default: auto]",
)
@click.option(
    "--learning-rate",
    type=click.FloatRange(min=0, min_open=True),
    help="local only  [default: 1e-3 from scratch, 1e-4 small, 2e-4 LoRA]",
)
@click.option("--lora-r", type=click.IntRange(1, 1024), help="local: LoRA rank  [default: 16]")
@click.option("--lora-alpha", type=click.IntRange(1, 4096), help="local: LoRA alpha  [default: 32]")
@local_method_options
@click.option(
    "--merge", is_flag=True, help="local: also save the base model with the LoRA adapter merged in."
)
@click.option("--suffix", help="openai: up to 64 characters added to the fine-tuned model's name.")
@click.option("--seed", type=int, help="For reproducible jobs.")
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
) -> None:
    """Start a fine-tune of --base-model on a dataset version; prints the job id.

    \b
    Examples:
        distillery finetune create --dataset support-bot --base-model gpt-4.1-mini-2025-04-14 --suffix support
        distillery finetune create --dataset support-bot --backend local --base-model ./qwen --merge
        distillery finetune watch ftjob_...
    """
    from distillery.cli_shared import resolve
    from distillery.config import load_settings
    from distillery.curation.training import finetune as ft

    if full and lora:
        raise click.UsageError("Cannot use --full and --lora together.")
    if suffix is not None and len(suffix) > 64:
        raise click.UsageError("--suffix can be at most 64 characters.")
    store = open_cli_store(config, database_url)
    version = resolve(store, dataset_ref)
    label = f"{version['name']}@{version['version']}"
    job_id = ft.new_job_id()
    hyperparameters: dict[str, Any]
    if backend == "local":
        hyperparameters = {
            k: v
            for k, v in {
                "epochs": n_epochs,
                "batch_size": batch_size,
                "learning_rate": learning_rate,
                "seed": seed,
                "lora_r": lora_r,
                "lora_alpha": lora_alpha,
                "threads": threads,
            }.items()
            if v is not None
        }
        local = ft.LocalBackend(load_settings(config).storage.resolved_data_dir())
        directory = local.create(
            job_id,
            Path(version["path"]),
            label,
            base_model,
            hyperparameters,
            lora=True if lora else (False if full else None),
            merge=merge,
        )
        provider_id, status, base_url = str(directory), "queued", None
        hyperparameters.update(merge=merge)
    else:
        hyperparameters = {
            k: v
            for k, v in {
                "n_epochs": n_epochs,
                "batch_size": batch_size,
                "learning_rate_multiplier": learning_rate_multiplier,
            }.items()
            if v is not None
        }
        remote = _backend(base_url, api_key_env).create(
            Path(version["path"]),
            base_model,
            hyperparameters,
            suffix=suffix,
            seed=seed,
            metadata={
                "distillery_job": job_id,
                "dataset": label,
                "dataset_hash": version["content_hash"][:32],
            },
        )
        provider_id, status = remote.id, remote.status
        hyperparameters.update(suffix=suffix, seed=seed)
    ft.record(
        store,
        {
            "id": job_id,
            "backend": backend,
            "base_url": base_url,
            "provider_job_id": provider_id,
            "dataset": version["name"],
            "dataset_version": version["version"],
            "base_model": base_model,
            "status": status,
            "hyperparameters": hyperparameters,
        },
    )
    click.echo(f"Started {job_id} ({provider_id}) on {label}: {status}.", err=True)
    click.echo(job_id)


@finetune.command(name="list")
@store_options
@count_option
@output_options
@fail_on_errors
def list_command(config: Path | None, database_url: str | None, limit: int, fmt: str) -> None:
    """List fine-tune jobs, newest first, as last seen (`status` refreshes one)."""
    from distillery.curation.training import finetune as ft

    store = open_cli_store(config, database_url)
    write_rows(ft.all_jobs(store, limit or None), fmt, JOB_COLUMNS, empty="No fine-tune jobs yet.")


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
    from distillery.curation.training import finetune as ft
    from distillery.output import dumps

    store = open_cli_store(config, database_url)
    job = _job(store, job_id)
    job = ft.refresh(store, job, _backend_for(job, api_key_env, config))
    if as_json:
        click.echo(dumps(job, indent=True))
        return
    click.echo(
        f"{job['id']}  {job['status']}  {job['base_model']} on {job['dataset']}@{job['dataset_version']}"
    )
    if job.get("fine_tuned_model"):
        click.echo(f"model: {job['fine_tuned_model']}")
    settings = {k: v for k, v in (job.get("hyperparameters") or {}).items() if v is not None}
    if settings:
        click.echo("settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()))
    metrics = {k: v for k, v in (job.get("metrics") or {}).items() if k != "checkpoints"}
    if metrics:
        click.echo("metrics: " + ", ".join(f"{k}={v}" for k, v in metrics.items()))
    if job.get("error"):
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
@fail_on_errors
def watch(
    config: Path | None,
    database_url: str | None,
    job_id: str,
    api_key_env: str | None,
    interval: float,
) -> None:
    """Follow a job until it ends: new events (with losses) as they appear.

    Exits 0 when the job succeeds and 1 when it fails or is cancelled.
    """
    from distillery.curation.training import finetune as ft

    store = open_cli_store(config, database_url)
    job = _job(store, job_id)
    backend = _backend_for(job, api_key_env, config)
    seen: set[str] = set()
    while True:
        # Refresh first, then read events: the events of the final state are shown too.
        job = ft.refresh(store, job, backend)
        for event in backend.job_events(job):
            if event["id"] in seen:
                continue
            seen.add(event["id"])
            data = event.get("data") or {}
            losses = ", ".join(f"{k}={v}" for k, v in data.items() if "loss" in k or k == "step")
            click.echo(
                f"{event['level']:<5} {event['message']}" + (f"  ({losses})" if losses else "")
            )
        if job["status"] in ft.TERMINAL:
            break
        time.sleep(interval)
    click.echo(
        f"{job['id']} {job['status']}"
        + (f": {job['fine_tuned_model']}" if job.get("fine_tuned_model") else ""),
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
    from distillery.curation.training import finetune as ft

    store = open_cli_store(config, database_url)
    job = _job(store, job_id)
    status = _backend_for(job, api_key_env, config).cancel(job)
    ft.update(store, job["id"], status=status)
    click.echo(f"{job['id']}: {status}")
