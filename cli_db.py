"""``distillery db``: the schema's migrations."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from distillery.cli_shared import fail_on_errors, store_options

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine


def _engine(config: Path | None, database_url: str | None) -> Engine:
    from distillery.config import load_settings
    from distillery.store.db import create_engine

    settings = load_settings(config, {"storage.database_url": database_url})
    engine = create_engine(settings.storage.resolved_database_url())
    click.get_current_context().call_on_close(engine.dispose)
    return engine


@click.group()
def db() -> None:
    """Database schema: where it is, and bringing it up to date."""


@db.command()
@store_options
@fail_on_errors
def status(config: Path | None, database_url: str | None) -> None:
    """Show the database's schema revision and the newest one this version knows."""
    from distillery.store.db import schema_revision
    from distillery.store.migrations import HEAD

    engine = _engine(config, database_url)
    current = schema_revision(engine)
    click.echo(f"database: {engine.url.render_as_string(hide_password=True)}")
    click.echo(f"revision: {current or 'empty'}")
    click.echo(
        f"newest:   {HEAD}"
        + ("  (up to date)" if current == HEAD else "  (run `distillery db upgrade`)")
    )


@db.command()
@store_options
@fail_on_errors
def upgrade(config: Path | None, database_url: str | None) -> None:
    """Apply every pending migration (the proxy also does this when it starts)."""
    from distillery.store.db import migrate, schema_revision

    engine = _engine(config, database_url)
    before = schema_revision(engine)
    for note in migrate(engine):
        click.echo(note, err=True)
    after = schema_revision(engine)
    click.echo(
        f"Upgraded {before or 'empty'} -> {after}." if before != after else f"Already at {after}."
    )
