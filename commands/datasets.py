"""``distillery dataset``: build, inspect, validate and export fine-tuning datasets."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import click

from distillery.commands.output import output_options, write_rows
from distillery.commands.shared import (
    Progress,
    build_filters,
    fail_on_errors,
    filter_options,
    open_cli_store,
    resolve,
    store_options,
)
from distillery.core.config import load_settings
from distillery.core.serialize import dumps
from distillery.curation.datasets import tokens
from distillery.curation.datasets.build import NAME, BuildOptions, BuildResult, Rules
from distillery.curation.datasets.build import build as run_build
from distillery.curation.datasets.export import export_openai, export_parquet
from distillery.curation.datasets.manifest import Manifest, describe
from distillery.curation.datasets.options import learnable
from distillery.curation.datasets.validate import MIN_EXAMPLES, validate_file
from distillery.store import datasets
from distillery.store.query import parse_tag

VERSION_COLUMNS = (
    "name",
    "version",
    "created_at",
    "train_examples",
    "val_examples",
    "content_hash",
)
SUMMARY_COLUMNS = (
    "examples",
    "tokens",
    "min_tokens",
    "mean_tokens",
    "max_tokens",
    "training_tokens",
)


tokenizer_option = click.option(
    "--tokenizer",
    metavar="SPEC",
    help="Count tokens with: a local model directory (the student's tokenizer), "
    "tiktoken:ENCODING, an OpenAI model name, or 'estimate'.  [default: tiktoken's "
    "o200k_base when it is in tiktoken's cache, else an estimate by script]",
)


@click.group()
def dataset() -> None:
    """Build versioned fine-tuning datasets from captured calls."""


@dataset.command()
@store_options
@click.argument("name")
@filter_options
@click.option("--incremental", is_flag=True, help="Add only calls captured since the last version.")
@click.option(
    "--val-fraction",
    type=float,
    default=0.1,
    show_default=True,
    help="Share of prompt groups for validation.",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the train/validation split."
)
@click.option(
    "--near-threshold",
    type=float,
    default=0.85,
    show_default=True,
    help="Jaccard similarity that makes two prompts near-duplicates.",
)
@click.option("--no-exact-dedupe", is_flag=True, help="Keep identical prompts.")
@click.option("--no-near-dedupe", is_flag=True, help="Keep near-identical prompts.")
@click.option(
    "--prefer",
    metavar="KEY=VALUE",
    help="Among duplicates keep the copy with this tag (else the newest).",
)
@click.option(
    "--include-failed", is_flag=True, help="Keep calls that errored (rule: successful only)."
)
@click.option(
    "--accept-finish-reason",
    "finish_reasons",
    multiple=True,
    metavar="REASON",
    help="Accepted finish reasons  [default: stop, tool_calls]; 'any' for all.",
)
@click.option("--include-refusals", is_flag=True, help="Keep answers that refuse.")
@click.option("--include-empty", is_flag=True, help="Keep empty answers.")
@click.option(
    "--min-tokens",
    type=int,
    default=1,
    show_default=True,
    help="Fewest tokens per example.",
)
@click.option(
    "--max-tokens",
    type=int,
    default=65_536,
    show_default=True,
    help="Most tokens per example.",
)
@click.option(
    "--strip-system-prompt",
    "--system-prompt-strip",
    is_flag=True,
    help="Drop system/developer messages (recorded as a pruning rule).",
)
@click.option(
    "--history-weight",
    type=click.IntRange(0, 1),
    help="Weight 0 or 1 on assistant turns before the last.",
)
@click.option(
    "--redact-pattern",
    "redact_patterns",
    multiple=True,
    metavar="NAME=REGEX",
    help="Extra redaction (repeatable).",
)
@click.option(
    "--epochs",
    type=int,
    help="For the training-token estimate  [default: --student's trainer's, else 3]",
)
@click.option(
    "--student",
    type=click.Path(exists=True, file_okay=False),
    help="A local student (model directory): estimate with the epochs its trainer will run.",
)
@tokenizer_option
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the files  [default: the data dir]",
)
@click.option(
    "--include-eval-traffic",
    is_flag=True,
    help="Also learn from calls `distillery eval` made (tagged distillery_eval=1).",
)
@click.option(
    "--include-student-answers",
    is_flag=True,
    help="Also learn from calls a route's student answered (a student learning from itself).",
)
@click.option(
    "--allow-empty",
    is_flag=True,
    help="Exit 0 when nothing new is selected (no version is written): for scheduled builds.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@fail_on_errors
def build(
    config: Path | None,
    database_url: str | None,
    name: str,
    incremental: bool,
    val_fraction: float,
    seed: int,
    near_threshold: float,
    no_exact_dedupe: bool,
    no_near_dedupe: bool,
    prefer: str | None,
    include_failed: bool,
    finish_reasons: tuple[str, ...],
    include_refusals: bool,
    include_empty: bool,
    min_tokens: int,
    max_tokens: int,
    strip_system_prompt: bool,
    history_weight: int | None,
    redact_patterns: tuple[str, ...],
    epochs: int | None,
    student: str | None,
    tokenizer: str | None,
    output: Path | None,
    include_eval_traffic: bool,
    include_student_answers: bool,
    allow_empty: bool,
    as_json: bool,
    **filters: Any,
) -> None:
    """Build a new version of dataset NAME from captured calls (nothing new: exit 1).

    \b
    Examples:
        distillery dataset build support-bot --tag app=support
        distillery dataset build support-bot --tag app=support --incremental --allow-empty  # cron
    """

    if not NAME.fullmatch(name):
        raise click.UsageError("NAME may use letters, digits, '.', '_' and '-' (e.g. support-bot).")
    patterns = _redact_patterns(redact_patterns)
    settings = load_settings(config, {"storage.database_url": database_url})
    store = open_cli_store(config, database_url)
    rules = Rules(
        successful_only=not include_failed,
        finish_reasons=_finish_reasons(finish_reasons),
        no_refusals=not include_refusals,
        non_empty=not include_empty,
        min_tokens=min_tokens,
        max_tokens=max_tokens,
    )
    options = BuildOptions(
        name=name,
        filters=learnable(
            build_filters(**filters),
            eval_traffic=include_eval_traffic,
            student_answers=include_student_answers,
        ),
        rules=rules,
        exact_dedupe=not no_exact_dedupe,
        near_dedupe=not no_near_dedupe,
        near_threshold=near_threshold,
        prefer=parse_tag(prefer) if prefer else None,
        strip_system_prompt=strip_system_prompt,
        history_weight=history_weight,
        val_fraction=val_fraction,
        seed=seed,
        incremental=incremental,
        output_dir=output,
        redact_defaults=settings.redact.defaults,
        redact_patterns=tuple((p.name, p.pattern) for p in settings.redact.patterns)
        + tuple(patterns),
        epochs=epochs or 3,
        student=student if epochs is None else None,  # --epochs given: that count
        tokenizer=tokenizer or student,
    )
    with Progress(f"Building {name}") as progress:
        data_dir = settings.storage.resolved_data_dir()
        result = run_build(store, options, data_dir, total=progress.start, progress=progress.update)
    _report(result, as_json, allow_empty)


def _finish_reasons(given: tuple[str, ...]) -> tuple[str, ...] | None:
    """``--accept-finish-reason``: the reasons kept (``any``: every one; none given: the two
    that mean a whole answer)."""
    return None if "any" in given else (given or ("stop", "tool_calls"))


def _report(result: BuildResult, as_json: bool, allow_empty: bool) -> None:
    """What the build made: its manifest in words (or as JSON), or why it made nothing
    (exit 1, unless that is allowed)."""
    if result.version is None:
        click.echo(result.message, err=True)
        if not allow_empty:
            sys.exit(1)
        return
    manifest = result.version["manifest"]
    if as_json:
        click.echo(dumps(manifest, indent=True))
        return
    click.echo(result.message, err=True)
    for line in describe(Manifest.of(result.version)):
        click.echo(line)


def _redact_patterns(given: tuple[str, ...]) -> list[tuple[str, str]]:
    """``--redact-pattern NAME=REGEX`` options, each checked: (name, regex) pairs."""
    patterns = []
    for item in given:
        label, sep, regex = item.partition("=")
        if not sep:
            raise click.UsageError(f"--redact-pattern {item!r} must look like NAME=REGEX.")
        try:
            re.compile(regex)
        except re.error as exc:
            raise click.UsageError(
                f"--redact-pattern {label}: bad regular expression: {exc}"
            ) from None
        patterns.append((label, regex))
    return patterns


@dataset.command(name="list")
@store_options
@output_options
@fail_on_errors
def list_command(config: Path | None, database_url: str | None, fmt: str) -> None:
    """List datasets with their newest version."""

    store = open_cli_store(config, database_url)
    rows = datasets.list_latest(store)
    if fmt in ("table", "csv"):
        rows = [{**row, "content_hash": row["content_hash"][:16]} for row in rows]
    write_rows(
        rows,
        fmt,
        VERSION_COLUMNS,
        empty="No datasets yet. Build one with `distillery dataset build NAME`.",
    )


@dataset.command()
@store_options
@click.argument("ref", metavar="NAME[@VERSION]")
@click.option("--json", "as_json", is_flag=True, help="The manifest as JSON.")
@fail_on_errors
def show(config: Path | None, database_url: str | None, ref: str, as_json: bool) -> None:
    """Show a version's manifest: filters, rules, counts, token stats, files."""
    store = open_cli_store(config, database_url)
    version = resolve(store, ref)
    if as_json:
        click.echo(dumps(version["manifest"], indent=True))
        return

    for line in describe(Manifest.of(version)):
        click.echo(line)
    click.echo(f"files: {version['path']}/train.jsonl, {version['path']}/val.jsonl")


@dataset.command()
@click.argument("path", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--max-tokens",
    type=int,
    default=65_536,
    show_default=True,
    help="Per-example limit in tokens.",
)
@tokenizer_option
@click.option(
    "--min-examples",
    type=int,
    help="Fewest examples  [default: 10 (OpenAI's minimum for training); 0 for a validation "
    "file: val.jsonl, *_val.jsonl, *validation.jsonl]",
)
@click.option("--epochs", type=int, default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="The report as JSON.")
def validate(
    path: Path,
    max_tokens: int,
    tokenizer: str | None,
    min_examples: int | None,
    epochs: int,
    as_json: bool,
) -> None:
    """Check any chat fine-tuning JSONL file against OpenAI's format rules.

    Exits non-zero when the file has errors.
    """

    if min_examples is None:
        # The 10-example minimum is a training-file rule; a validation file may be small.
        validation = re.search(r"(^|[-_.])(val|valid|validation)$", path.stem) is not None
        min_examples = 0 if validation else MIN_EXAMPLES

    tokenizer = tokens.resolve(tokenizer)
    report = validate_file(path, max_tokens, min_examples, tokens.counter(tokenizer))
    summary = report.summary(epochs) | {"method": tokens.method(tokenizer)}
    if as_json:
        click.echo(dumps(summary, indent=True))
    else:
        write_rows([summary], "table", SUMMARY_COLUMNS)
        click.echo(f"tokens {summary['method']}")
        for message, n in report.errors.items():
            line = report.first_error_line.get(message)
            where = f" (first on line {line})" if line else ""
            click.echo(f"error: {message}: {n}{where}")
        for message, n in report.warnings.items():
            click.echo(f"warning: {message}: {n}")
    if not report.ok:
        sys.exit(1)


@dataset.command()
@store_options
@click.argument("ref", metavar="NAME[@VERSION]")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["openai", "hf-parquet"]),
    default="openai",
    show_default=True,
)
@click.option(
    "-o",
    "--output",
    type=click.Path(file_okay=False, path_type=Path),
    required=True,
    help="Directory to write.",
)
@fail_on_errors
def export(config: Path | None, database_url: str | None, ref: str, fmt: str, output: Path) -> None:
    """Write a version for a trainer: OpenAI JSONL, or Parquet that HF `datasets` reads."""

    store = open_cli_store(config, database_url)
    version = resolve(store, ref)
    writer = export_openai if fmt == "openai" else export_parquet
    written, empty = writer(Path(version["path"]), output)
    for path in written:
        click.echo(str(path))
    for split in empty:
        click.echo(f"The {split} split is empty: no file written for it.", err=True)


@dataset.command()
@store_options
@click.argument("old", metavar="A")
@click.argument("new", metavar="B")
@output_options
@fail_on_errors
def diff(config: Path | None, database_url: str | None, old: str, new: str, fmt: str) -> None:
    """Examples added and removed between two versions (NAME@1 NAME@2)."""

    store = open_cli_store(config, database_url)
    a, b = resolve(store, old), resolve(store, new)
    before, after = datasets.example_ids(store, a["id"]), datasets.example_ids(store, b["id"])
    rows = [
        {"change": "added", "completion_id": cid, "split": after[cid]}
        for cid in sorted(after.keys() - before.keys())
    ]
    rows += [
        {"change": "removed", "completion_id": cid, "split": before[cid]}
        for cid in sorted(before.keys() - after.keys())
    ]
    rows += [
        {"change": "moved", "completion_id": cid, "split": f"{before[cid]} -> {after[cid]}"}
        for cid in sorted(before.keys() & after.keys())
        if before[cid] != after[cid]
    ]
    if fmt == "table":
        click.echo(
            f"{len(after.keys() - before.keys())} added, {len(before.keys() - after.keys())} removed",
            err=True,
        )
    write_rows(rows, fmt, ("change", "completion_id", "split"))
