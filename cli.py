"""The ``distillery`` command: the click group, its commands (``commands/``), ``main``."""

from __future__ import annotations

import click

from distillery import __version__
from distillery.commands.completions import completions
from distillery.commands.datasets import dataset
from distillery.commands.db import db
from distillery.commands.distill import distill
from distillery.commands.evals import eval_group
from distillery.commands.finetune import finetune
from distillery.commands.proxy import key_fingerprint_command, proxy
from distillery.commands.routes import routes
from distillery.commands.serve import serve
from distillery.commands.student import student
from distillery.commands.ui import ui


@click.group()
@click.version_option(__version__, prog_name="distillery")
def cli() -> None:
    """Capture OpenAI traffic, curate it, and distil a cheaper student model."""


for command in (
    proxy,
    key_fingerprint_command,
    completions,
    dataset,
    eval_group,
    db,
    finetune,
    serve,
    distill,
    student,
    ui,
    routes,
):
    cli.add_command(command)


def main() -> None:
    cli(prog_name="distillery")
