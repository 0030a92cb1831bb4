"""The ``distillery`` command: the click group of ``commands/`` and ``main``."""

from __future__ import annotations

import click

from distillery import __version__
from distillery.commands import LazyGroup


@click.group(cls=LazyGroup)
@click.version_option(__version__, prog_name="distillery")
def cli() -> None:
    """Capture OpenAI traffic, curate it, and distil a cheaper student model."""


def main() -> None:
    cli(prog_name="distillery")
