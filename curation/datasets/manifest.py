"""A dataset version's manifest, in words: what `dataset show` and the dashboard print."""

from __future__ import annotations

from typing import Any


def describe(manifest: dict[str, Any]) -> list[str]:
    """Counts, what each rule dropped, token totals and warnings, a line each."""
    counts = manifest["counts"]
    tokens = manifest["tokens"]
    lines = [
        f"{manifest['name']}@{manifest['version']}  content {manifest['content_hash'][:16]}  "
        f"watermark {manifest.get('watermark')}",
        f"considered {counts['considered']}, carried over {counts['carried_over']}, "
        f"train {counts['train']}, validation {counts['val']}",
    ]
    dropped = counts.get("dropped") or {}
    if dropped:
        lines.append("dropped: " + ", ".join(f"{reason} {n}" for reason, n in dropped.items()))
    lines.append(
        f"train tokens: {tokens['tokens']} total, min {tokens['min_tokens']}, "
        f"mean {tokens['mean_tokens']}, max {tokens['max_tokens']}; "
        f"x {tokens['epochs']} epochs = {tokens['training_tokens']} training tokens "
        f"({tokens.get('method', 'estimated')})"
    )
    for warning in manifest.get("warnings") or ():
        lines.append(f"warning: {warning}")
    return lines
