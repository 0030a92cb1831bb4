"""``distillery eval``: baseline the teacher against students, and score fine-tunes."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import click

from distillery.commands.output import output_options, write_rows
from distillery.commands.shared import (
    Progress,
    build_filters,
    by_tag_option,
    count_option,
    fail_on_errors,
    fail_under_option,
    filter_options,
    max_error_rate_option,
    open_cli_store,
    resolve,
    store_options,
    thresholds,
)
from distillery.core.config import load_settings
from distillery.core.errors import DistilleryError
from distillery.core.serialize import dumps
from distillery.curation.datasets.options import learnable
from distillery.curation.endpoints import Endpoint, configured
from distillery.curation.evals import evaluate
from distillery.curation.evals.evaluate import RESULT_COLUMNS, result_rows
from distillery.curation.evals.generate import parse_candidates
from distillery.curation.evals.graders import load_all
from distillery.curation.evals.report import render
from distillery.curation.evals.request import Calls, EvalRequest, EvalResult, Source
from distillery.curation.evals.request import run as run_eval
from distillery.store import Store, evals
from distillery.store.records import EvalRunRecord, Role, Summary


def gate(
    summary: Summary,
    limits: dict[str, float],
    max_error_rate: float,
    judged: Role | None = None,
) -> None:
    """Exit 1, saying why, when a candidate failed too many items or a mean is below its limit.

    ``judged`` limits ``--fail-under`` to the candidates in that role (distill: the fine-tuned
    student); errors count for every candidate, since a failed call is never a score.
    """

    problems = evaluate.erroring(summary, max_error_rate)
    misses = [
        str(m) for m in evaluate.failing(summary, limits) if judged is None or m.role == judged
    ]
    if misses:
        problems.append("Below --fail-under: " + "; ".join(misses))
    if problems:
        for problem in problems:
            click.echo(problem, err=True)
        sys.exit(1)


@click.group(name="eval")
def eval_group() -> None:
    """Grade candidate models against the teacher's stored answers."""


@eval_group.command(name="run")
@store_options
@click.option(
    "--dataset",
    "dataset_ref",
    metavar="NAME[@VERSION]",
    help="Grade a dataset version's validation split (the default input).",
)
@click.option("--split", type=click.Choice(["val", "train"]), default="val", show_default=True)
@click.option(
    "--file",
    "jsonl",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Grade any OpenAI-format JSONL file.",
)
@click.option("--where", is_flag=True, help="Grade stored calls selected by the filter options.")
@functools.partial(filter_options, model_flags=("--where-model",))
@click.option(
    "--model",
    "models",
    multiple=True,
    required=True,
    metavar="MODEL[@ENDPOINT]",
    help="A candidate (repeatable); @ENDPOINT names an [endpoints] entry.",
)
@click.option(
    "--base-url",
    envvar="DISTILLERY_EVAL_BASE_URL",
    help="OpenAI-compatible URL for candidates without @ENDPOINT  [default: OPENAI_BASE_URL]",
)
@click.option(
    "--api-key-env",
    help="Env var with the API key for --base-url (must be set: no other key is sent)  [default: OPENAI_API_KEY]",
)
@click.option(
    "--grader",
    "grader_specs",
    multiple=True,
    required=True,
    metavar="NAME|FILE",
    help="exact, fuzzy_match, bleu, rouge_1, rouge_2, rouge_l, cosine, json, tool_call, or a .toml/.yaml/.py file.",
)
@click.option("--limit", type=int, help="Grade a seeded sample of this many items.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--concurrency", type=click.IntRange(1, 256), default=8, show_default=True)
@click.option(
    "--timeout", type=float, default=120.0, show_default=True, help="Seconds per request."
)
@click.option(
    "--retries",
    type=click.IntRange(0, 20),
    default=4,
    show_default=True,
    help="Retries with backoff on 429/5xx.",
)
@by_tag_option
@click.option(
    "--html",
    "html_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write a self-contained HTML report.",
)
@fail_under_option("any candidate's")
@max_error_rate_option
@click.option(
    "--no-cache",
    is_flag=True,
    help="Call every model afresh (answers are not read from or kept in the cache).",
)
@click.option(
    "--allow-train-eval",
    is_flag=True,
    help="Grade a fine-tune on examples it was trained on (refused by default: the score "
    "flatters).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the run as JSON.")
@fail_on_errors
def run_command(
    config: Path | None,
    database_url: str | None,
    dataset_ref: str | None,
    split: str,
    jsonl: Path | None,
    where: bool,
    models: tuple[str, ...],
    base_url: str | None,
    api_key_env: str | None,
    grader_specs: tuple[str, ...],
    limit: int | None,
    seed: int,
    concurrency: int,
    timeout: float,
    retries: int,
    by_tag: str | None,
    html_path: Path | None,
    fail_under: tuple[str, ...],
    max_error_rate: float,
    no_cache: bool,
    allow_train_eval: bool,
    as_json: bool,
    **filters: Any,
) -> None:
    """Generate with each --model and grade against the teacher's stored answers.

    \b
    Examples:
        distillery eval run --dataset support-bot --model gpt-4o --model gpt-4o-mini \\
            --grader fuzzy_match --grader judge.toml --html report.html
        distillery eval run --where --tag app=support --limit 200 --model my-student@local --grader rouge_l
    """

    if sum([bool(dataset_ref), bool(jsonl), where]) > 1:
        raise click.UsageError("Use one input: --dataset, --file or --where with filters.")
    if not (dataset_ref or jsonl or where):
        raise click.UsageError(
            "Name what to grade: --dataset NAME, --file FILE.jsonl, or --where with filters."
        )
    settings = load_settings(config, {"storage.database_url": database_url})
    graders = load_all(grader_specs)
    limits = thresholds(fail_under, graders)
    default = Endpoint.from_env("default", base_url, api_key_env)
    endpoints = configured(settings)
    # A JSONL file needs no captured calls; the database still keeps the run and the cache.
    store = open_cli_store(config, database_url, must_exist=jsonl is None)
    request = EvalRequest(
        source=Source(
            dataset=resolve(store, dataset_ref) if dataset_ref else None,
            split="train" if split == "train" else "val",
            file=jsonl,
            # References are the teacher's: never a student's answer, nor an eval's own.
            filters=learnable(build_filters(**filters)) if where else None,
        ),
        candidates=parse_candidates(models, endpoints, default),
        graders=graders,
        endpoints=endpoints,
        default=default,
        prices=settings.prices,
        limit=limit,
        seed=seed,
        by_tag=by_tag,
        calls=Calls(concurrency, timeout, retries, use_cache=not no_cache),
        allow_train_eval=allow_train_eval,
    )
    with Progress("Evaluating") as progress:
        done = run_eval(store, request, start=progress.start, progress=progress.update)
    _report(store, request, done, html_path, as_json)
    gate(done.run["summary"], limits, max_error_rate)


def print_breakdown(summary: Summary) -> None:
    rows = [
        {
            "candidate": label,
            "grader": name,
            "tag": value,
            "mean": s["mean"],
            "ci_95": f"[{s['ci_low']:.3f}, {s['ci_high']:.3f}]",
            "n": s["n"],
        }
        for label, entry in summary["candidates"].items()
        for name, stats in entry["graders"].items()
        for value, s in stats.get("by_tag", {}).items()
    ]
    click.echo("")
    write_rows(rows, "table", ("candidate", "grader", "tag", "mean", "ci_95", "n"))


@eval_group.command(name="list")
@store_options
@count_option
@output_options
@fail_on_errors
def list_command(config: Path | None, database_url: str | None, limit: int, fmt: str) -> None:
    """List stored eval runs, newest first."""

    store = open_cli_store(config, database_url)
    rows = [
        {
            "id": r["id"],
            "created_at": r["created_at"],
            "source": r["config"].get("source"),
            "items": r["summary"]["items"],
            "candidates": ", ".join(r["summary"]["candidates"]),
            "graders": ", ".join(g["name"] for g in r["config"].get("graders", [])),
        }
        for r in evals.list_runs(store, limit or None)
    ]
    write_rows(
        rows,
        fmt,
        ("id", "created_at", "source", "items", "candidates", "graders"),
        empty="No eval runs yet.",
    )


def _run(store: Any, run_id: str) -> EvalRunRecord:

    found = evals.get_run(store, run_id)
    if found is None:
        raise DistilleryError(f"No eval run {run_id!r}. Run `distillery eval list` to see ids.")
    return found


@eval_group.command()
@store_options
@click.argument("run_id", metavar="RUN")
@click.option("--json", "as_json", is_flag=True, help="The run and every sample as JSON.")
@fail_on_errors
def show(config: Path | None, database_url: str | None, run_id: str, as_json: bool) -> None:
    """Show a run's results (and with --json every per-item output and grade)."""

    store = open_cli_store(config, database_url)
    found = _run(store, run_id)
    if as_json:
        click.echo(dumps({**found, "samples": evals.samples(store, run_id)}, indent=True))
        return
    click.echo(
        f"Run {found['id']}: {found['summary']['items']} items from {found['config'].get('source')}"
    )

    write_rows(result_rows(found["summary"]), "table", RESULT_COLUMNS)


@eval_group.command()
@store_options
@click.argument("run_a", metavar="RUN_A")
@click.argument("run_b", metavar="RUN_B")
@click.option("--candidate-a", help="Candidate of RUN_A  [default: its first]")
@click.option("--candidate-b", help="Candidate of RUN_B  [default: its first]")
@output_options
@fail_on_errors
def compare(
    config: Path | None,
    database_url: str | None,
    run_a: str,
    run_b: str,
    candidate_a: str | None,
    candidate_b: str | None,
    fmt: str,
) -> None:
    """Per-item wins and losses of RUN_B over RUN_A, with the mean difference's 95% CI."""

    store = open_cli_store(config, database_url)
    a, b = _run(store, run_a), _run(store, run_b)
    label_a = candidate_a or next(iter(a["summary"]["candidates"]))
    label_b = candidate_b or next(iter(b["summary"]["candidates"]))
    for run, label in ((a, label_a), (b, label_b)):
        if label not in run["summary"]["candidates"]:
            raise DistilleryError(
                f"Run {run['id']} has no candidate {label!r}; it has {', '.join(run['summary']['candidates'])}."
            )
    graders = [
        g
        for g in a["summary"]["candidates"][label_a]["graders"]
        if g in b["summary"]["candidates"][label_b]["graders"]
    ]
    if not graders:
        raise DistilleryError("The two runs share no grader to compare.")
    samples_a, samples_b = evals.samples(store, run_a), evals.samples(store, run_b)
    rows = [evaluate.compare(samples_a, samples_b, label_a, label_b, g) for g in graders]
    for row in rows:
        row["ci_95"] = f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]"
    write_rows(
        rows,
        fmt,
        ("grader", "a", "b", "items", "b_wins", "a_wins", "ties", "mean_difference", "ci_95"),
    )


def _report(
    store: Store, request: EvalRequest, done: EvalResult, html_path: Path | None, as_json: bool
) -> None:
    """The run as JSON or a table (and by tag), what could not be cached, the HTML report."""
    result, items = done.run, done.items
    if html_path is not None:
        html_path.write_text(render(result, evals.samples(store, result["id"]), items))
    for model in sorted(done.uncached):
        click.echo(
            f"Not cached: {model} (its endpoint's GET /models does not list it, so what "
            "model answers cannot be told apart from another under that name).",
            err=True,
        )
    if as_json:
        click.echo(dumps(result, indent=True))
    else:
        click.echo(
            f"Run {result['id']}: {len(items)} items from {request.source.label}; "
            f"{result['summary']['calls']['made']} calls, {result['summary']['calls']['cached']} from cache.",
            err=True,
        )
        write_rows(result_rows(result["summary"]), "table", RESULT_COLUMNS)
        if request.by_tag:
            print_breakdown(result["summary"])
        for line in evaluate.few_graded(result["summary"]):
            click.echo(line, err=True)
