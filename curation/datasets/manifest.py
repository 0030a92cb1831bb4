"""A dataset version's manifest: what a build records about itself, as a typed record, and in
words (what `dataset show` and the dashboard print).

The build writes it to the version's ``manifest.json`` and the database keeps it with the
version; everything that reads one goes through :meth:`Manifest.of`, so a field this version
does not know is an error naming it.
"""

from __future__ import annotations

from typing import Any

from distillery.core.records import Record
from distillery.store.records import DatasetVersionRecord


class Counts(Record):
    considered: int
    carried_over: int  # examples the previous version contributed (incremental builds)
    dropped: dict[str, int] = {}  # rule or dedupe reason -> examples
    train: int
    val: int
    examples: int  # train + val


class Tokens(Record):
    """The train split's token counts and the training estimate made from them."""

    examples: int
    tokens: int
    min_tokens: int
    mean_tokens: float
    max_tokens: int
    epochs: int  # the most epochs the estimate counts (training_tokens is for these)
    training_tokens: int
    method: str = "estimated"  # how the counts were made (manifests before it was recorded)
    min_epochs: int | None = None  # the fewest, where the trainer stops early
    epochs_from: str = "--epochs"  # where the epochs came from (a local student's trainer)


class Manifest(Record):
    name: str
    version: int
    watermark: str | None  # the newest call the version read
    created_at: str
    previous_version: int | None
    filters: dict[str, Any]
    rules: dict[str, Any]
    dedupe: dict[str, Any]
    split: dict[str, Any]
    pruning: dict[str, Any]
    history_weight: float | None
    redaction: dict[str, Any]
    counts: Counts
    tokens: Tokens
    warnings: list[str] = []
    content_hash: str
    files: dict[str, str]

    @classmethod
    def of(cls, version: DatasetVersionRecord) -> Manifest:
        """The manifest the database keeps for ``version``."""
        return cls.parse(
            version["manifest"], f"the manifest of {version['name']}@{version['version']}"
        )


def describe(manifest: Manifest) -> list[str]:
    """Counts, what each rule dropped, token totals and warnings, a line each."""
    counts = manifest.counts
    tokens = manifest.tokens
    lines = [
        f"{manifest.name}@{manifest.version}  content {manifest.content_hash[:16]}  "
        f"watermark {manifest.watermark}",
        f"considered {counts.considered}, carried over {counts.carried_over}, "
        f"train {counts.train}, validation {counts.val}",
    ]
    if counts.dropped:
        lines.append(
            "dropped: " + ", ".join(f"{reason} {n}" for reason, n in counts.dropped.items())
        )
    lines.append(
        f"train tokens: {tokens.tokens} total, min {tokens.min_tokens}, "
        f"mean {tokens.mean_tokens}, max {tokens.max_tokens}; "
        f"x {_epochs(tokens)} = {tokens.training_tokens} training tokens "
        f"({tokens.method})"
    )
    lines.extend(f"warning: {warning}" for warning in manifest.warnings)
    return lines


def _epochs(tokens: Tokens) -> str:
    """``3 epochs``, or ``45-60 epochs (the local trainer's, for this student; at most)``."""
    if tokens.min_epochs is None or tokens.min_epochs == tokens.epochs:
        text = f"{tokens.epochs} epochs"
    else:
        text = f"{tokens.min_epochs}-{tokens.epochs} epochs, at most"
    return text if tokens.epochs_from == "--epochs" else f"{text} ({tokens.epochs_from})"
