"""The ``distillery`` command's groups, one module each, and what they share
(``shared.py``: options, the store; ``output.py``: tables, JSON, CSV).  Only ``cli.py``
imports this package.

A command's module is imported when that command runs, not before: ``distillery --help``
lists them from ``COMMANDS`` (a test keeps each line equal to the command's own help), so
it starts without the store, the proxy or the model libraries, while each module imports
what it needs at its top.
"""

from __future__ import annotations

import importlib
from typing import Any

import click

# name: (module in commands/, the click command in it, its one-line help)
COMMANDS = {
    "proxy": (
        "proxy",
        "proxy",
        "Run the capture proxy: point your OpenAI client's base_url at it.",
    ),
    "key-fingerprint": (
        "proxy",
        "key_fingerprint_command",
        "Print the fingerprint of an API key read from stdin (for [apps] and [auth] keys).",
    ),
    "completions": (
        "completions",
        "completions",
        "Find, read, label and prune captured calls (`list` when no subcommand is given).",
    ),
    "dataset": ("datasets", "dataset", "Build versioned fine-tuning datasets from captured calls."),
    "eval": ("evals", "eval_group", "Grade candidate models against the teacher's stored answers."),
    "db": ("db", "db", "Database schema: where it is, and bringing it up to date."),
    "finetune": (
        "finetune",
        "finetune",
        "Fine-tune a student model on a dataset version (OpenAI's fine-tuning API).",
    ),
    "serve": (
        "serve",
        "serve",
        "Serve a (fine-tuned) model directory at /v1/chat/completions, streaming too.",
    ),
    "distill": (
        "distill",
        "distill",
        "Build (incrementally), baseline, fine-tune, evaluate and report, in one command.",
    ),
    "student": ("student", "student", "Make a student model to fine-tune (no hub needed)."),
    "ui": (
        "ui",
        "ui",
        "Serve the dashboard at http://HOST:PORT/ui/ (for when the proxy runs elsewhere).",
    ),
    "routes": (
        "routes",
        "routes",
        "Students shadowing the teacher on live traffic ([routes.NAME] in the config).",
    ),
}


class LazyGroup(click.Group):
    """A group whose commands are imported when they run (see the module's docstring)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute, _ = COMMANDS[name]
        command: Any = getattr(importlib.import_module(f"distillery.commands.{module}"), attribute)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)
