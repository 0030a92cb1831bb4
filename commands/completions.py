"""``distillery completions``: find, read, label and prune captured calls."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import click

from distillery.commands.output import output_options, write_rows
from distillery.commands.shared import (
    DefaultGroup,
    build_filters,
    count_option,
    fail_on_errors,
    filter_options,
    open_cli_store,
    store_options,
)
from distillery.core.errors import DistilleryError
from distillery.core.serialize import dumps
from distillery.core.shapes import message_text, output_messages
from distillery.store import query
from distillery.store import stats as compute
from distillery.store.query import (
    LIST_COLUMNS,
    Filters,
    find,
    get,
    iterate,
    matching_ids,
    parse_tag,
    relabel,
    summary,
)


def _select_ids(
    store: Any, ids: tuple[str, ...], where: bool, filters: Any, verb: str
) -> list[str]:

    if ids and where:
        raise click.UsageError(f"Give IDs or --where with filters to {verb}, not both.")
    if not ids and not where:
        raise click.UsageError(
            f"Name the completions to {verb}: IDs, or --where with filters (e.g. --where --tag app=x)."
        )
    if where:
        if filters == Filters():
            raise click.UsageError(
                f"--where needs at least one filter; to {verb} everything use --since 100y."
            )
        return matching_ids(store, filters)
    selected = []
    for ref in ids:
        record = get(store, ref)
        if record is None:
            raise DistilleryError(
                f"No completion {ref!r}. Run `distillery completions list` to see ids."
            )
        selected.append(record["id"])
    return selected


@click.group(cls=DefaultGroup)
def completions() -> None:
    """Find, read, label and prune captured calls (`list` when no subcommand is given)."""


@completions.command(name="list")
@store_options
@filter_options
@count_option
@click.option("--order", type=click.Choice(["desc", "asc"]), default="desc", show_default=True)
@output_options
@fail_on_errors
def list_command(
    config: Path | None, database_url: str | None, limit: int, order: str, fmt: str, **filters: Any
) -> None:
    """List captured calls, newest first.

    \b
    Examples:
        distillery completions --tag app=support -n 5
        distillery completions -q "refund" --since 7d --json
    """

    if limit < 0:
        raise click.UsageError("-n/--count must be 0 (all) or more.")
    store = open_cli_store(config, database_url)
    selected = build_filters(**filters)
    if limit:
        rows: Iterable[Mapping[str, Any]] = find(store, selected, order=order, limit=limit)  # type: ignore[arg-type]
    else:
        rows = iterate(store, selected, order=order)  # type: ignore[arg-type]
    if fmt in ("table", "csv"):
        rows = (summary(r) for r in rows)
    write_rows(rows, fmt, LIST_COLUMNS, empty="No completions match.")


@completions.command()
@store_options
@click.argument("ref", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="The whole record as JSON.")
@fail_on_errors
def show(config: Path | None, database_url: str | None, ref: str, as_json: bool) -> None:
    """Show one call whole: messages, output, tool calls, metadata, usage, latency.

    ID is the record id (cap_...) or the upstream completion id (chatcmpl-...).
    """

    store = open_cli_store(config, database_url)
    record = get(store, ref)
    if record is None:
        raise DistilleryError(
            f"No completion {ref!r}. Run `distillery completions list` to see ids."
        )
    if as_json:
        click.echo(dumps(record, indent=True))
        return
    for line in render(record):
        click.echo(line)


def render(record: Mapping[str, Any]) -> Iterator[str]:

    fields = [
        ("id", record["id"]),
        ("completion", record.get("completion_id")),
        ("created", record["created_at"]),
        ("tenant", record["tenant"]),
        (
            "model",
            f"{_or_dash(record.get('model_requested'))} -> {_or_dash(record.get('model_served'))}",
        ),
        ("status", record["status"]),
        ("stream", bool(record["stream"])),
        ("finish", record.get("finish_reason")),
        (
            "tokens",
            f"{_or_dash(record.get('prompt_tokens'))} in, {_or_dash(record.get('completion_tokens'))} out, {_or_dash(record.get('total_tokens'))} total",
        ),
        (
            "latency",
            f"{record['latency_ms']:.1f} ms"
            + (
                f" (first byte {record['ttft_ms']:.1f} ms)"
                if record.get("ttft_ms") is not None
                else ""
            ),
        ),
        ("request id", record.get("upstream_request_id")),
        ("fingerprint", record.get("prompt_fingerprint")),
    ]
    for name, value in fields:
        yield f"{name + ':':<13}{'-' if value is None else value}"
    metadata = record.get("metadata") or {}
    yield "metadata:    " + (", ".join(f"{k}={v}" for k, v in metadata.items()) or "-")
    yield ""
    yield "Messages"
    for message in (record.get("request") or {}).get("messages") or []:
        if isinstance(message, dict):
            yield from _message(message, message_text(message))
    yield ""
    yield "Output"
    outputs = output_messages(record.get("response"))
    for message in outputs:
        yield from _message(message, message_text(message))
    if not outputs:
        yield "  (none)"
    if record.get("error") is not None:
        yield ""
        yield "Error"
        yield "  " + dumps(record["error"])


def _or_dash(value: object) -> object:
    return "-" if value is None else value


def _message(message: dict[str, Any], text: str) -> Iterator[str]:
    role = message.get("role", "?")
    lines = text.splitlines() or [""]
    yield f"  [{role}] {lines[0]}"
    for line in lines[1:]:
        yield f"  {' ' * (len(role) + 2)} {line}"
    for call in message.get("tool_calls") or ():
        function = call.get("function") or {}
        yield f"  [{role}] -> {function.get('name')}({function.get('arguments') or ''})  {call.get('id') or ''}".rstrip()
    if message.get("refusal"):
        yield f"  [{role}] refused: {message['refusal']}"


@completions.command()
@store_options
@filter_options
@click.option(
    "--by",
    "group_by",
    default="model",
    show_default=True,
    metavar="model|day|fingerprint|tag:KEY",
    help="What to group by.",
)
@click.option(
    "--exact",
    is_flag=True,
    help="Scan the calls for exact latency percentiles instead of reading the aggregates.",
)
@output_options
@fail_on_errors
def stats(
    config: Path | None,
    database_url: str | None,
    group_by: str,
    exact: bool,
    fmt: str,
    **filters: Any,
) -> None:
    """Counts, tokens, latency percentiles and error rate, grouped.

    The table also lists the most frequent prompt fingerprints: the tasks in
    your traffic, found without anyone tagging them.

    Filtered by time, --tenant and --tag app=..., and grouped by model, day,
    fingerprint or tag:app, the numbers come from the daily aggregates the
    store keeps (fast on millions of calls): the latency percentiles are then
    the bucket edge each lies under (p50_under_ms). --exact, or any other
    filter, scans the calls and gives exact percentiles (p50_ms).

    \b
    Example:
        distillery completions stats --by tag:app --since 30d
    """

    store = open_cli_store(config, database_url)
    selected = build_filters(**filters)
    if not exact and compute.aggregated(selected, group_by):
        rows = compute.aggregate_stats(store, selected, group_by)
        columns = compute.AGGREGATE_COLUMNS
    else:
        rows, columns = compute.group_stats(store, selected, group_by), compute.STAT_COLUMNS
    write_rows(rows, fmt, columns, empty="No completions match.")
    if fmt == "table" and group_by != "fingerprint" and rows:
        click.echo("\nTop prompt fingerprints (calls sharing a system prompt or tool set):")
        write_rows(
            compute.top_fingerprints(store, selected, exact=exact),
            fmt,
            ("fingerprint", "calls", "share", "example"),
        )
    if fmt == "table" and columns is compute.AGGREGATE_COLUMNS and rows:
        click.echo(
            "\nLatency: the edge of the histogram bucket each percentile lies under; "
            "--exact scans the calls for exact values.",
            err=True,
        )


def selection_options(command: Callable[..., Any]) -> Callable[..., Any]:
    command = filter_options(command)
    return click.option(
        "--where", is_flag=True, help="Select by the filter options instead of IDs."
    )(command)


@completions.command()
@store_options
@click.argument("args", nargs=-1, required=True, metavar="[ID]... KEY=VALUE...")
@selection_options
@fail_on_errors
def tag(
    config: Path | None,
    database_url: str | None,
    args: tuple[str, ...],
    where: bool,
    **filters: Any,
) -> None:
    """Label calls, e.g. quality=approved (within OpenAI's metadata limits).

    \b
    Examples:
        distillery completions tag cap_18ec... quality=approved
        distillery completions tag --where --tag app=support -q refund task=refunds
    """

    labels = dict(parse_tag(a) for a in args if "=" in a)
    ids = tuple(a for a in args if "=" not in a)
    if not labels:
        raise click.UsageError("Give at least one KEY=VALUE to set.")
    store = open_cli_store(config, database_url)
    selected = _select_ids(store, ids, where, build_filters(**filters), "tag")
    changed = relabel(store, selected, set_tags=labels)
    click.echo(f"Tagged {changed} of {len(selected)} completions.", err=True)


@completions.command()
@store_options
@click.argument("args", nargs=-1, required=True, metavar="[ID]... KEY")
@selection_options
@fail_on_errors
def untag(
    config: Path | None,
    database_url: str | None,
    args: tuple[str, ...],
    where: bool,
    **filters: Any,
) -> None:
    """Remove a label (a metadata key) from calls."""

    *ids, key = args
    store = open_cli_store(config, database_url)
    selected = _select_ids(store, tuple(ids), where, build_filters(**filters), "untag")
    changed = relabel(store, selected, remove=[key])
    click.echo(f"Removed {key!r} from {changed} of {len(selected)} completions.", err=True)


@completions.command()
@store_options
@click.argument("ids", nargs=-1, metavar="[ID]...")
@selection_options
@click.option(
    "--older-than",
    metavar="AGE",
    help="Only calls captured more than AGE ago (30d, 12h); implies --where.",
)
@click.option("--yes", is_flag=True, help="Delete without showing what goes first.")
@fail_on_errors
def delete(
    config: Path | None,
    database_url: str | None,
    ids: tuple[str, ...],
    where: bool,
    older_than: str | None,
    yes: bool,
    **filters: Any,
) -> None:
    """Delete calls (retention: --older-than 30d); shows what goes unless --yes.

    \b
    Examples:
        distillery completions delete --older-than 90d --yes
        distillery completions delete --where --tag env=staging
    """

    selected_filters = build_filters(**filters)
    if older_than:
        where = True
        selected_filters = query.with_filters(selected_filters, until=query.parse_when(older_than))
    store = open_cli_store(config, database_url)
    selected = _select_ids(store, ids, where, selected_filters, "delete")
    if not selected:
        click.echo("Nothing to delete.", err=True)
        return
    if not yes:
        click.echo(f"This deletes {len(selected)} completions:", err=True)
        for record_id in selected[:10]:
            click.echo(f"  {record_id}", err=True)
        if len(selected) > 10:
            click.echo(f"  ... and {len(selected) - 10} more", err=True)
        if not sys.stdin.isatty():
            raise click.ClickException("Nothing deleted. Re-run with --yes to delete them.")
        click.confirm("Delete them?", abort=True, err=True)
    deleted = query.delete(store, selected)
    click.echo(f"Deleted {deleted} completions.", err=True)


@completions.command()
@store_options
@click.argument("ids", nargs=-1, metavar="[ID]...")
@selection_options
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, allow_dash=True),
    default="-",
    show_default=True,
    help="JSONL file to write.",
)
@fail_on_errors
def export(
    config: Path | None,
    database_url: str | None,
    ids: tuple[str, ...],
    where: bool,
    output: str,
    **filters: Any,
) -> None:
    """Write raw records as JSON lines, oldest first (all of them without IDs or --where).

    \b
    Example:
        distillery completions export --where --tag app=support -o support.jsonl
    """

    if ids and where:
        raise click.UsageError("Give IDs or --where with filters to export, not both.")
    store = open_cli_store(config, database_url)
    selected = build_filters(**filters) if not ids else query.Filters(ids=ids)
    total = query.count(store, selected)
    with click.open_file(output, "w") as handle:
        rows = query.iterate(store, selected, order="asc")
        bar: contextlib.AbstractContextManager[Iterable[dict[str, Any]]] = (
            click.progressbar(rows, length=total, label="Exporting", file=sys.stderr)
            if output != "-" and sys.stderr.isatty()
            else contextlib.nullcontext(rows)
        )
        with bar as progress:
            written = write_rows(progress, "nl", (), out=handle)
    if output != "-":
        click.echo(f"Exported {written} completions to {output}.", err=True)
