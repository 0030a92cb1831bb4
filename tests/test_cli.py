"""The command line: configuration layering, clean errors, help everywhere."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from distillery.cli import cli
from distillery.core.config import key_fingerprint

from fake_openai import FakeOpenAI

README = Path(__file__).parent.parent / "README.md"


def run(*args: str, **kwargs: Any) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False, **kwargs)
    return result.exit_code, result.output


def test_defaults_are_safe(tmp_path: Path) -> None:
    _, out = run("proxy", "--check-config")  # the probes' verdicts depend on the network
    assert "listening on 127.0.0.1:8787" in out
    assert "forwarding to https://api.openai.com/v1" in out
    assert f"sqlite:///{tmp_path / 'data' / 'distillery.db'}" in out


def test_flags_beat_env_beat_file_beat_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "d.toml"
    config.write_text(
        '[proxy]\nport = 9000\nhost = "127.0.0.2"\n[upstream]\nurl = "http://file:1/v1"\n'
    )
    _, out = run("proxy", "-c", str(config), "--check-config")
    assert "127.0.0.2:9000" in out and "http://file:1/v1" in out
    monkeypatch.setenv("DISTILLERY_PORT", "9100")
    monkeypatch.setenv("DISTILLERY_UPSTREAM", "http://env:2/v1")
    _, out = run("proxy", "-c", str(config), "--check-config")
    assert "127.0.0.2:9100" in out and "http://env:2/v1" in out
    _, out = run("proxy", "-c", str(config), "--port", "9200", "--check-config")
    assert "127.0.0.2:9200" in out
    monkeypatch.setenv("DISTILLERY_CONFIG", str(config))
    _, out = run("proxy", "--check-config")
    assert "127.0.0.2:9100" in out and f"config file: {config}" in out


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[proxy]\nprot = 1\n", "proxy.prot: Extra inputs are not permitted"),
        ("[upstream]\nurl = 'api.openai.com'\n", "must be an http(s) URL"),
        ("[[rules]]\ntext = '(unclosed'\nset = {a = 'b'}\n", "bad regular expression"),
        ("[[rules]]\nset = {a = 'b'}\n", "a rule needs `model` or `text`"),
        ("[upstream]\napi_key = 'sk-x'\n", "auth.keys is empty"),
        ("[proxy\n", "Cannot read config file"),
    ],
)
def test_bad_config_names_the_problem(tmp_path: Path, toml: Any, message: Any) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    result = CliRunner().invoke(cli, ["proxy", "-c", str(config), "--check-config"])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["proxy", "-c", str(tmp_path / "nope.toml"), "--check-config"])
    assert result.exit_code == 1 and "does not exist" in result.output


def test_key_fingerprint_reads_stdin() -> None:
    code, out = run("key-fingerprint", input="sk-secret\n")
    assert code == 0 and out.strip() == key_fingerprint("sk-secret")
    assert "sk-secret" not in out
    result = CliRunner().invoke(cli, ["key-fingerprint"], input="")
    assert result.exit_code == 1 and "No API key on stdin" in result.output


def _commands(
    group: click.Group, prefix: str = "distillery"
) -> Iterator[tuple[str, click.Command]]:
    context = click.Context(group)
    for name in group.list_commands(context):  # the lazy top group imports each here
        command = group.get_command(context, name)
        assert command is not None, name
        yield f"{prefix} {name}", command
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix} {name}")


def test_every_command_has_help_and_is_documented() -> None:
    readme = README.read_text()
    for name, command in _commands(cli):
        assert command.help and command.help.strip(), f"{name} has no help text"
        assert re.search(rf"`{re.escape(name)}\b", readme), f"{name} is not in the README"


def test_the_command_list_says_what_each_command_says() -> None:
    """`distillery --help` lists the commands without importing them: each line it shows
    is the command's own first line of help."""
    from distillery.commands import COMMANDS

    context = click.Context(cli)
    for name, (_, _, line) in COMMANDS.items():
        command = cli.get_command(context, name)
        assert command is not None and command.name == name
        assert command.get_short_help_str(limit=300) == line, name


def test_cli_start_up_stays_light(tmp_path: Path) -> None:
    """`distillery --help` and `completions list` import no proxy or model libraries."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from distillery.cli import cli\n"
        "CliRunner().invoke(cli, ['--help'])\n"
        "print(sorted(m for m in ('aiohttp', 'openai', 'torch', 'sqlalchemy') if m in sys.modules))\n"
        f"CliRunner().invoke(cli, ['completions', '--database-url', 'sqlite:///{tmp_path}/x.db'])\n"
        "print(sorted(m for m in ('aiohttp', 'openai', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["[]", "[]"]


def test_check_config_probes_what_the_proxy_will_meet(tmp_path: Path, upstream: FakeOpenAI) -> None:
    """Env var, port, database and upstream are checked for real, each on its own line."""
    config = tmp_path / "good.toml"
    config.write_text(
        f'[upstream]\nurl = "{upstream.url}/v1"\n[storage]\n'
        f'database_url = "sqlite:///{tmp_path / "db.sqlite"}"\n[proxy]\nport = 0\n'
    )
    code, out = run("proxy", "-c", str(config), "--check-config")
    assert code == 0, out
    assert f"  ok    config file: {config}" in out
    assert "  ok    upstream key: none: each client's own key is forwarded" in out
    assert "  ok    database: " in out and "empty: the proxy creates the schema at start" in out
    assert "  ok    upstream: " in out and "(HTTP 200 to GET /models)" in out
    assert upstream.requests[-1]["headers"].get("Authorization") is None  # no key sent


@pytest.mark.parametrize(
    ("toml", "failing"),
    [
        (
            '[storage]\ndatabase_url = "mysql://root@localhost/test"\n',
            "FAIL  database: Unsupported database 'mysql'",
        ),
        (
            '[storage]\ndatabase_url = "postgresql://nobody@127.0.0.1:1/none"\n',
            "FAIL  database: cannot open",
        ),
        (
            '[upstream]\napi_key_env = "DISTILLERY_TEST_UNSET"\n[auth]\nkeys = ["sk-a"]\n',
            "FAIL  upstream key: upstream.api_key_env names $DISTILLERY_TEST_UNSET, which is not set",
        ),
        ('[upstream]\nurl = "http://127.0.0.1:9/v1"\n', "FAIL  upstream: cannot reach"),
    ],
)
def test_check_config_fails_on_what_would_fail(tmp_path: Path, toml: Any, failing: Any) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    result = CliRunner().invoke(cli, ["proxy", "-c", str(config), "--check-config"])
    assert result.exit_code == 1
    assert failing in result.output and "Traceback" not in result.output


def test_check_config_sees_a_taken_port(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["proxy", "--port", str(port), "--check-config"])
    assert (
        f"FAIL  listen: cannot listen on 127.0.0.1:{port}: Address already in use" in result.output
    )


def test_the_proxy_refuses_to_start_with_an_unset_key_variable(tmp_path: Path) -> None:
    config = tmp_path / "k.toml"
    config.write_text(
        '[upstream]\napi_key_env = "DISTILLERY_TEST_UNSET"\n[auth]\nkeys = ["sk-a"]\n'
    )
    result = CliRunner().invoke(cli, ["proxy", "-c", str(config)])
    assert result.exit_code == 1
    assert "$DISTILLERY_TEST_UNSET, which is not set" in result.output


def test_the_readmes_configuration_example_is_valid() -> None:
    """Every setting the README shows loads: the example cannot drift from the code."""
    import tomllib

    from distillery.core.config import Settings

    from helpers import readme_code

    [example] = readme_code("Configuration", "toml")
    settings = Settings.model_validate(tomllib.loads(example))
    assert settings.ui.enabled and not settings.ui.open
    assert settings.prices["my-model"].training == 3.0
