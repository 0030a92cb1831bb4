"""``distillery proxy`` (run the capture proxy) and ``distillery key-fingerprint``."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import click

from distillery.core import logs
from distillery.core.config import Settings, config_file, key_fingerprint, load_settings
from distillery.core.errors import DistilleryError
from distillery.curation.judge import install as judge_routes
from distillery.curation.judge import problem as route_problem
from distillery.proxy.app import Extension
from distillery.proxy.preflight import Check, missing_upstream_key, run_checks
from distillery.proxy.server import serve
from distillery.ui.app import mount as dashboard


def _settings(config: Path | None, overrides: dict[str, Any]) -> Settings:
    try:
        return load_settings(config, overrides)
    except DistilleryError as exc:
        raise click.ClickException(str(exc)) from None


@click.command()
@click.option("--host", envvar="DISTILLERY_HOST", help="Address to bind  [default: 127.0.0.1]")
@click.option(
    "--port", type=int, envvar="DISTILLERY_PORT", help="Port to listen on  [default: 8787]"
)
@click.option(
    "--upstream",
    envvar="DISTILLERY_UPSTREAM",
    help="OpenAI-compatible base URL to forward to  [default: https://api.openai.com/v1]",
)
@click.option(
    "--upstream-api-key-env",
    envvar="DISTILLERY_UPSTREAM_API_KEY_ENV",
    help="Name of an env var holding the upstream key; clients then need a proxy key.",
)
@click.option(
    "--upstream-timeout",
    type=click.FloatRange(min=0, min_open=True),
    envvar="DISTILLERY_UPSTREAM_TIMEOUT",
    help="Seconds to wait for the upstream's next byte before answering 504  [default: 600]",
)
@click.option(
    "--database-url",
    envvar="DISTILLERY_DATABASE_URL",
    help="sqlite:///path.db or postgresql://...  [default: SQLite in the data dir]",
)
@click.option(
    "--data-dir",
    envvar="DISTILLERY_DATA_DIR",
    type=click.Path(file_okay=False),
    help="Where the SQLite file and the spool live.",
)
@click.option(
    "-c",
    "--config",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="DISTILLERY_CONFIG",
    help="TOML config file.",
)
@click.option(
    "--workers",
    type=click.IntRange(1, 64),
    envvar="DISTILLERY_WORKERS",
    default=1,
    show_default=True,
    help="Processes sharing the port (SO_REUSEPORT), each with its own writer and spool.",
)
@click.option("--no-capture", is_flag=True, help="Forward and tag, but record nothing locally.")
@click.option("--access-log/--no-access-log", default=None, help="One log line per request.")
@click.option(
    "--log-level",
    envvar="DISTILLERY_LOG_LEVEL",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)
@click.option(
    "--log-json/--log-console", default=None, help="Log format  [default: JSON unless a TTY]"
)
@click.option("--check-config", is_flag=True, help="Validate the configuration and exit.")
def proxy(
    host: str | None,
    port: int | None,
    upstream: str | None,
    upstream_api_key_env: str | None,
    upstream_timeout: float | None,
    database_url: str | None,
    data_dir: str | None,
    config: Path | None,
    workers: int,
    no_capture: bool,
    access_log: bool | None,
    log_level: str,
    log_json: bool | None,
    check_config: bool,
) -> None:
    """Run the capture proxy: point your OpenAI client's base_url at it.

    \b
    Example:
        distillery proxy --port 8787
        export OPENAI_BASE_URL=http://127.0.0.1:8787/v1
    """
    overrides = {
        "proxy.host": host,
        "proxy.port": port,
        "proxy.access_log": access_log,
        "upstream.url": upstream,
        "upstream.api_key_env": upstream_api_key_env,
        "upstream.timeout": upstream_timeout,
        "storage.database_url": database_url,
        "storage.data_dir": data_dir,
        "capture.enabled": False if no_capture else None,
    }
    settings = _settings(config, overrides)

    if check_config:
        click.echo(
            f"Configuration OK: listening on {settings.proxy.host}:{settings.proxy.port}, "
            f"forwarding to {settings.upstream.url}, "
            f"storing in {settings.storage.resolved_database_url()}"
        )
        checks = run_checks(settings, config_file(config))
        if settings.routes:
            trouble = route_problem(settings)
            detail = trouble or f"{len(settings.routes)}: graders and student endpoints load"
            checks.append(Check("routes", trouble is None, detail))
        for check in checks:
            click.echo(f"  {'ok' if check.ok else 'FAIL':4}  {check.name}: {check.detail}")
        if not all(check.ok for check in checks):
            sys.exit(1)
        return
    problem = missing_upstream_key(settings)
    if problem:
        raise click.ClickException(problem)

    extensions: list[Extension] = [dashboard, judge_routes]
    logs.configure(log_level, json=log_json)
    try:
        # SIGHUP reads the same file with the same flags again (for its routes).
        reload = functools.partial(load_settings, config, overrides)
        serve(settings, workers, {"level": log_level, "json": log_json}, extensions, reload)
    except DistilleryError as exc:
        raise click.ClickException(str(exc)) from None


@click.command("key-fingerprint")
def key_fingerprint_command() -> None:
    """Print the fingerprint of an API key read from stdin (for [apps] and [auth] keys).

    \b
    Example:
        printenv OPENAI_API_KEY | distillery key-fingerprint
    """
    key = click.prompt("API key", hide_input=True) if sys.stdin.isatty() else sys.stdin.readline()
    key = key.strip()
    if not key:
        raise click.ClickException(
            "No API key on stdin. Pipe one in: printenv OPENAI_API_KEY | ..."
        )
    click.echo(key_fingerprint(key))
