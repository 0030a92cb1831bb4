"""``distillery student create``: a small student made from scratch for one task."""

from __future__ import annotations

from pathlib import Path

import click

from distillery.commands.shared import fail_on_errors, open_cli_store, resolve, store_options
from distillery.curation.training import student as make


@click.group()
def student() -> None:
    """Make a student model to fine-tune (no hub needed)."""


@student.command()
@store_options
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--dataset",
    "dataset_ref",
    metavar="NAME[@VERSION]",
    help="Train the tokenizer on this dataset version's text.",
)
@click.option(
    "--from-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="...or on this chat fine-tuning JSONL file's text.",
)
@click.option("--hidden", type=click.IntRange(16, 8192), default=128, show_default=True)
@click.option("--layers", type=click.IntRange(1, 128), default=4, show_default=True)
@click.option("--heads", type=click.IntRange(1, 128), default=4, show_default=True)
@click.option("--vocab-size", type=click.IntRange(300, 200_000), default=1024, show_default=True)
@click.option(
    "--context", type=click.IntRange(32, 65_536), default=512, show_default=True,
    help="Longest conversation in tokens.",
)  # fmt: skip
@click.option("--seed", type=int, default=0, show_default=True)
@fail_on_errors
def create(
    config: Path | None,
    database_url: str | None,
    directory: Path,
    dataset_ref: str | None,
    from_file: Path | None,
    hidden: int,
    layers: int,
    heads: int,
    vocab_size: int,
    context: int,
    seed: int,
) -> None:
    """Make a small randomly initialised student and a tokenizer trained on a dataset.

    For narrow, high-volume tasks (extraction, routing, normalisation) where a model of a
    few million parameters answering in milliseconds on a CPU is the point, and for
    offline demos and tests.  For open-ended text, or with little data (under ~1,000
    examples), fine-tune a pretrained small model instead.  `finetune create` and
    `distill` train a student made here fully, with settings for training from scratch.

    \b
    Example:
        distillery student create ./student --dataset support-bot
        distillery distill --name support-bot --tag app=support --teacher gpt-4o \\
            --student-base ./student --grader exact
    """

    if (dataset_ref is None) == (from_file is None):
        raise click.UsageError("Give one of --dataset NAME[@VERSION] or --from-file FILE.")
    if from_file is None:
        store = open_cli_store(config, database_url)
        source = Path(resolve(store, dataset_ref or "")["path"])
    else:
        source = from_file
    made = make.create(
        directory,
        make.dataset_texts(source),
        hidden=hidden,
        layers=layers,
        heads=heads,
        vocab_size=vocab_size,
        context=context,
        seed=seed,
    )
    click.echo(
        f"Made {directory}: {made['parameters']:,} parameters, {made['layers']} layers of "
        f"{made['hidden']}, a {made['vocab_size']}-token vocabulary from {made['texts']:,} texts.",
        err=True,
    )
    click.echo(str(directory))
