"""``distillery distill``: the whole loop in one idempotent command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from distillery.commands.evals import gate, print_breakdown
from distillery.commands.output import write_rows
from distillery.commands.shared import (
    TrainingProgress,
    build_filters,
    by_tag_option,
    fail_on_errors,
    fail_under_option,
    filter_options,
    hyperparameter,
    local_method,
    local_method_options,
    max_error_rate_option,
    open_cli_store,
    store_options,
    thresholds,
)
from distillery.core.config import load_settings
from distillery.core.errors import DistilleryError
from distillery.core.serialize import dumps
from distillery.curation import distill as loop
from distillery.curation.endpoints import Endpoint
from distillery.curation.evals.evaluate import RESULT_COLUMNS, result_rows
from distillery.curation.evals.generate import Candidate
from distillery.curation.evals.graders import load_all
from distillery.curation.evals.report import render
from distillery.curation.training.backends import Hyperparameters
from distillery.store import Store, datasets, evals
from distillery.store.records import EvalRunRecord


@click.command()
@store_options
@click.option("--name", required=True, help="The dataset (and loop) name, e.g. support-bot.")
@filter_options
@click.option(
    "--teacher", required=True, help="The teacher model (the reference, re-run as a candidate)."
)
@click.option("--base-url", help="Where the teacher and judges run  [default: OPENAI_BASE_URL]")
@click.option("--api-key-env", help="Env var with their API key  [default: OPENAI_API_KEY]")
@click.option(
    "--student-base",
    required=True,
    help="local: a model directory or hub id; openai: a model name.",
)
@click.option(
    "--backend",
    default="local",
    show_default=True,
    metavar="NAME",
    help="local (train here), openai (the fine-tuning API at --base-url), or a plugin's.",
)
@click.option(
    "--grader",
    "grader_specs",
    multiple=True,
    required=True,
    metavar="NAME|FILE",
    help="As for `eval run` (repeatable).",
)
@fail_under_option("the fine-tuned student's")
@max_error_rate_option
@click.option("--no-cache", is_flag=True, help="Call every model afresh (no eval cache).")
@hyperparameter(
    "epochs",
    help="Fine-tune epochs  [default: openai auto; local: until the validation loss stops "
    "improving, keeping the best epoch]",
)
@hyperparameter("batch_size")
@hyperparameter(
    "learning_rate",
    help="local  [default: chosen for the student; see `finetune create --help`]",
)
@local_method_options
@click.option("--limit", type=int, help="Grade a seeded sample of the validation split.")
@by_tag_option
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--poll-interval",
    type=click.FloatRange(min=0.001),
    default=10.0,
    show_default=True,
    help="Seconds between fine-tune status checks.",
)
@click.option(
    "--keep-checkpoints",
    is_flag=True,
    help="local: keep the fine-tune's per-epoch checkpoints (removed once it succeeds).",
)
@click.option(
    "--allow-train-eval",
    is_flag=True,
    help="With no validation split, grade on training examples anyway (the score flatters).",
)
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the HTML report too.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="The fine-tune's events, then the eval run, as JSON lines on stdout.",
)
@fail_on_errors
def distill(
    config: Path | None,
    database_url: str | None,
    name: str,
    teacher: str,
    base_url: str | None,
    api_key_env: str | None,
    student_base: str,
    backend: str,
    grader_specs: tuple[str, ...],
    fail_under: tuple[str, ...],
    max_error_rate: float,
    no_cache: bool,
    epochs: int | None,
    batch_size: int | None,
    learning_rate: float | None,
    full: bool,
    lora: bool,
    threads: int | None,
    limit: int | None,
    by_tag: str | None,
    seed: int,
    poll_interval: float,
    keep_checkpoints: bool,
    allow_train_eval: bool,
    html_path: Path | None,
    as_json: bool,
    **filters: Any,
) -> None:
    """Build (incrementally), baseline, fine-tune, evaluate and report, in one command.

    Re-running with no new calls does nothing; an interrupted run resumes its fine-tune.
    Suitable for a cron job or systemd timer.

    \b
    Example:
        distillery distill --name support-bot --tag app=support --teacher gpt-4o \\
            --student-base ./qwen2.5-0.5b-instruct --grader rouge_l --fail-under rouge_l=0.6
    """

    settings = load_settings(config, {"storage.database_url": database_url})
    graders = load_all(grader_specs)
    limits = thresholds(fail_under, graders)
    endpoint = Endpoint.from_env("default", base_url, api_key_env)
    hyper = Hyperparameters(
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        threads=threads,
        seed=seed,
    )
    store = open_cli_store(config, database_url)
    options = loop.DistillOptions(
        name=name,
        filters=build_filters(**filters),
        teacher=Candidate(f"teacher:{teacher}", teacher, endpoint, role="teacher"),
        student_base=student_base,
        backend=backend,
        graders=graders,
        hyperparameters=hyper,
        method=local_method(full, lora),
        student_endpoint=endpoint,
        limit=limit,
        seed=seed,
        poll=poll_interval,
        prices=dict(settings.prices),
        use_cache=not no_cache,
        by_tag=by_tag[4:] if by_tag else None,
        allow_train_eval=allow_train_eval,
        keep_checkpoints=keep_checkpoints,
    )
    with TrainingProgress(as_json) as progress:  # what it says goes below the status line
        data_dir = settings.storage.resolved_data_dir()
        result = loop.run(store, options, data_dir, progress.say, progress)
    _report(store, options, result, limits, html_path, as_json)
    gate(result["summary"], limits, max_error_rate, judged="tuned")
    if not result["summary"]["candidates"]:
        raise DistilleryError("Nothing was graded.")


def _report(
    store: Store,
    options: loop.DistillOptions,
    result: EvalRunRecord,
    limits: dict[str, float],
    html_path: Path | None,
    as_json: bool = False,
) -> None:
    """The scores as a table (and by tag) and the verdict, or with ``as_json`` the run as a
    JSON line (``{"run": ..., "verdict": [...]}``, the verdict on stderr too); the HTML
    report if asked."""
    verdict = loop.verdict(result["summary"], limits)
    if as_json:
        click.echo(dumps({"run": result, "verdict": verdict}))
    else:
        write_rows(result_rows(result["summary"]), "table", RESULT_COLUMNS)
        if options.by_tag:
            print_breakdown(result["summary"])
    for line in verdict:
        click.echo(line, err=as_json)
    if html_path is not None:
        version = datasets.latest(store, options.name)
        items = (
            loop.graded_items(store, version, options.limit, options.seed, options.allow_train_eval)
            if version
            else []
        )
        html_path.write_text(render(result, evals.samples(store, result["id"]), items))
