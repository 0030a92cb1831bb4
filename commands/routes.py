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
    """Every route: mode (pinned or not, why and since when), its student, the evidence
    since the mode last changed (pairs, errors, score with anytime-valid bounds against
    the bar, verdict), win/tie/loss against the teacher, fallbacks, dropped shadow calls,
    latency and cost of both.

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

    Into canary or on only on the evidence since the mode last changed: at least
    min_samples pairs, errors within max_error_rate, and the score's lower bound at or
    above the bar. Every proxy on the database follows within seconds.
    """
    _move(config, database_url, name, reason, up=True)


@routes.command(name="set")
@store_options
@click.argument("name")
@click.argument("mode", type=click.Choice(online.MODES))
@click.option("--reason", default="by hand", show_default=True, help="Said in the log.")
@fail_on_errors
def set_command(
    config: Path | None, database_url: str | None, name: str, mode: str, reason: str
) -> None:
    """Put route NAME in MODE at once, evidence or not: `off` is the kill switch (the
    teacher answers everything). Every proxy on the database follows within seconds;
    the automatic policy moves it again only on new evidence.

    \b
    Example:
        distillery routes set support off --reason "answers look wrong"
    """
    settings = load_settings(config, {"storage.database_url": database_url})
    store = open_cli_store(config, database_url)
    was, now = online.set_mode(settings, store, name, mode, reason)
    click.echo(f"Route {name}: {was} -> {now}.")


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
