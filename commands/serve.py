"""``distillery serve``: the fine-tuned student behind an OpenAI-compatible API."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import click

from distillery.curation.serve import serve as run


@click.command()
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8788, show_default=True)
@click.option(
    "--name", "model_name", help="The model name clients ask for  [default: the directory's name]"
)
def serve(model_dir: Path, host: str, port: int, model_name: str | None) -> None:
    """Serve a (fine-tuned) model directory at /v1/chat/completions, streaming too.

    Uses vLLM when it is installed, else transformers (pip install 'distillery[train]').

    \b
    Example:
        distillery serve ~/.local/share/distillery/finetunes/ftjob_.../merged --port 8788
        distillery eval run --dataset support-bot --model merged --base-url http://127.0.0.1:8788/v1 ...
    """

    if (
        importlib.util.find_spec("vllm") is None
        and importlib.util.find_spec("transformers") is None
    ):
        raise click.ClickException(
            "Serving needs vLLM or transformers: pip install torch==2.13.0 'distillery[train]'"
        )
    if not (model_dir / "config.json").exists():
        raise click.ClickException(
            f"{model_dir} holds no model (no config.json). A LoRA job's adapter is in model/; "
            "serve its merged/ directory (finetune create --merge)."
        )

    run(model_dir, host, port, model_name or model_dir.name)
