"""``distillery routes``: how each route's student does beside the teacher on live traffic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from distillery.commands.output import output_options, write_rows
from distillery.commands.shared import fail_on_errors, open_cli_store, store_options
from distillery.core.config import load_settings
from distillery.curation import online
from distillery.curation.online import STATUS_COLUMNS
from distillery.curation.online import status as standing


@click.group()
def routes() -> None:
    """Students shadowing the teacher on live traffic ([routes.NAME] in the config)."""


@routes.command()
@store_options
@output_options
@fail_on_errors
def status(config: Path | None, database_url: str | None, fmt: str) -> None:
    """Every route: mode, graded pairs, score with its 95% interval against the bar,
    win/tie/loss against the teacher, student errors, dropped shadow calls, latency and
    cost of both.

    \b
    Example:
        distillery routes status --json
    """

    settings = load_settings(config, {"storage.database_url": database_url})
    if not settings.routes:
        raise click.ClickException(
            "No routes in the config. Add one: [routes.NAME] with match, student, graders "
            "and bar (see 'Routes' in the README)."
        )
    store = open_cli_store(config, database_url)
    rows: list[dict[str, Any]] = standing(settings, store)
    write_rows(rows, fmt, STATUS_COLUMNS)


@routes.command()
@store_options
@click.argument("name")
@click.option("--reason", default="by hand", show_default=True, help="Said in the log.")
@fail_on_errors
def promote(config: Path | None, database_url: str | None, name: str, reason: str) -> None:
    """Move route NAME up one step: off, shadow, canary, on.

    Into canary or on only on graded evidence: the lower bound of the score over at
    least min_samples pairs clears the bar (for on, pairs graded since the canary
    began). Every proxy on the database follows within seconds.
    """
    _move(config, database_url, name, reason, up=True)


@routes.command()
@store_options
@click.argument("name")
@click.option("--reason", default="by hand", show_default=True, help="Said in the log.")
@fail_on_errors
def demote(config: Path | None, database_url: str | None, name: str, reason: str) -> None:
    """Move route NAME down one step: on, canary, shadow, off."""
    _move(config, database_url, name, reason, up=False)


def _move(config: Path | None, database_url: str | None, name: str, reason: str, up: bool) -> None:

    settings = load_settings(config, {"storage.database_url": database_url})
    store = open_cli_store(config, database_url)
    was, now = (online.promote if up else online.demote)(settings, store, name, reason)
    click.echo(f"Route {name}: {was} -> {now}.")
