"""``distillery ui``: the dashboard alone, against the same store as the proxy."""

from __future__ import annotations

from pathlib import Path

import click
from aiohttp import web

from distillery.commands.shared import fail_on_errors, store_options
from distillery.core.config import load_settings
from distillery.store import open_store
from distillery.ui.app import mount


@click.command()
@store_options
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8789, show_default=True)
@fail_on_errors
def ui(config: Path | None, database_url: str | None, host: str, port: int) -> None:
    """Serve the dashboard at http://HOST:PORT/ui/ (for when the proxy runs elsewhere).

    It reads the same config as the proxy: [auth] keys decide who may sign in, [ui] how.

    \b
    Example:
        distillery ui --database-url postgresql://distillery@db/distillery --port 8789
    """

    settings = load_settings(
        config,
        {"storage.database_url": database_url, "proxy.host": host, "ui.enabled": True},
    )
    store = open_store(settings.storage.resolved_database_url())
    app = web.Application()
    mount(app, settings, store)

    async def to_dashboard(_request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/ui/")

    app.router.add_get("/", to_dashboard)
    click.echo(f"Dashboard on http://{host}:{port}/ui/", err=True)
    try:
        web.run_app(app, host=host, port=port, print=None, access_log=None)
    finally:
        store.close()
