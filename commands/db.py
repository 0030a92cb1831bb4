"""``distillery db``: the schema's migrations."""

from __future__ import annotations

from pathlib import Path

import click
from sqlalchemy.engine import Engine

from distillery.commands.output import output_options, write_rows
from distillery.commands.shared import fail_on_errors, store_options
from distillery.core.config import load_settings
from distillery.store import Store, dashboard, open_store
from distillery.store import dead_letters as letters
from distillery.store.db import create_engine, migrate, schema_revision
from distillery.store.migrations import HEAD


def _engine(config: Path | None, database_url: str | None) -> Engine:

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

    engine = _engine(config, database_url)
    before = schema_revision(engine)
    for note in migrate(engine):
        click.echo(note, err=True)
    after = schema_revision(engine)
    click.echo(
        f"Upgraded {before or 'empty'} -> {after}." if before != after else f"Already at {after}."
    )


@db.command("dead-letters")
@store_options
@click.option(
    "--data-dir",
    envvar="DISTILLERY_DATA_DIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where the proxy keeps its spool and dead-letter/  [default: as the proxy]",
)
@click.option("--retry", is_flag=True, help="Insert them again (once the cause is fixed).")
@click.option("--purge", is_flag=True, help="Delete them.")
@output_options
@fail_on_errors
def dead_letters(
    config: Path | None,
    database_url: str | None,
    data_dir: Path | None,
    retry: bool,
    purge: bool,
    fmt: str,
) -> None:
    """List captured calls the database refused even after repair.

    \b
        distillery db dead-letters
        distillery db dead-letters --retry    # after fixing the cause
    """

    if retry and purge:
        raise click.UsageError("Cannot use --retry and --purge together: pick one.")
    settings = load_settings(
        config,
        {
            "storage.database_url": database_url,
            "storage.data_dir": str(data_dir) if data_dir else None,
        },
    )
    directory = Path(settings.storage.resolved_data_dir()) / "dead-letter"
    if purge:
        click.echo(f"Deleted {letters.purge(directory)} dead letters.")
        return
    if retry:
        store = open_store(settings.storage.resolved_database_url())
        try:
            outcome = letters.retry(directory, store)
        except Exception as exc:  # the database is unavailable: nothing moved
            raise click.ClickException(f"Database unavailable, nothing retried: {exc}") from None
        finally:
            store.close()
        click.echo(
            f"Stored {outcome.stored} dead letters; {outcome.refused} still refused"
            + (" (see their reasons: distillery db dead-letters)." if outcome.refused else ".")
        )
        return
    write_rows(
        (letter.row() for letter in letters.read(directory)),
        fmt,
        ["id", "at", "model", "status", "reason"],
        empty=f"No dead letters in {directory}.",
    )


@db.command("end-sessions")
@store_options
@click.option(
    "--tenant", metavar="FINGERPRINT", help="Only this key's (`distillery key-fingerprint`)."
)
@fail_on_errors
def end_sessions(config: Path | None, database_url: str | None, tenant: str | None) -> None:
    """Sign every dashboard user out, on every proxy of the database, at once.

    \b
        distillery db end-sessions                       # everyone
        distillery db end-sessions --tenant key-1a2b3c…  # one key's sessions
    """

    engine = _engine(config, database_url)

    ended = dashboard.end_sessions(Store(engine, migrated=True), tenant=tenant)
    click.echo(f"Ended {ended} dashboard sessions.")
