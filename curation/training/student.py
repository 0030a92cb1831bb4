"""A small student made from scratch for one task: ``distillery student create``.

A model config plus a tokenizer trained on the dataset's own text, nothing
downloaded.  Worth it for a narrow, high-volume task (extraction, routing,
normalisation) where a model of a few million parameters answers in
milliseconds on a CPU, for offline demos and for tests; for open-ended text,
or with little data, start from a pretrained small model instead.

The tokenizer is byte-level BPE (any text encodes) that splits digits one by
one: order numbers, dates and amounts are copied digit by digit instead of
through merges the model would have to learn one at a time.  The chat template
marks the assistant's turns with ``{% generation %}`` so the trainer's loss
counts the answer only.  ``distillery.json`` beside the weights says the model
is randomly initialised, which is how the trainer knows to train it fully with
a learning rate for training from scratch.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from distillery.core.errors import DistilleryError
from distillery.core.shapes import message_text

MARKER = "distillery.json"
SPECIAL_TOKENS = ["<unk>", "<s>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>"
    "{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def dataset_texts(path: Path) -> Iterator[str]:
    """Every message's text in a chat fine-tuning JSONL file (or a directory's
    train.jsonl and val.jsonl)."""
    files = [path / "train.jsonl", path / "val.jsonl"] if path.is_dir() else [path]
    for file in files:
        if not file.exists():
            continue
        with file.open() as handle:
            for line in handle:
                if line.strip():
                    for message in json.loads(line).get("messages") or ():
                        yield message_text(message)


def create(
    directory: Path,
    texts: Iterable[str],
    *,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    vocab_size: int = 1024,
    context: int = 512,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the tokenizer on ``texts``, make the model, save both; returns what was made."""
    try:
        import torch
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
        from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    except ImportError:
        raise DistilleryError(
            "Making a student needs the training extra: pip install 'distillery[train]'"
        ) from None
    if hidden % heads:
        raise DistilleryError(f"--hidden {hidden} must be a multiple of --heads {heads}.")
    if directory.exists() and any(directory.iterdir()):
        raise DistilleryError(f"{directory} exists and is not empty; pick another directory.")
    corpus = [text for text in texts if text]
    if not corpus:
        raise DistilleryError("No text to train a tokenizer on: is the dataset empty?")

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(
        corpus,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=context,
    )
    fast.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=context,
        tie_word_embeddings=True,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    from transformers import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    if not sys.stderr.isatty():  # its "Writing model shards" bar: for terminals only
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        model.save_pretrained(directory)
    finally:
        if shown:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
    fast.save_pretrained(directory)
    made = {
        "initialised": "random",
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": len(fast),
        "hidden": hidden,
        "layers": layers,
        "heads": heads,
        "context": context,
        "seed": seed,
        "texts": len(corpus),
    }
    (directory / MARKER).write_text(json.dumps(made, indent=2))
    return made


def from_scratch(model_dir: str | Path) -> bool:
    """Whether ``student create`` made this model and nothing has trained it since."""
    marker = Path(model_dir) / MARKER
    if not marker.is_file():
        return False
    try:
        return bool(json.loads(marker.read_text()).get("initialised") == "random")
    except (OSError, ValueError):
        return False
