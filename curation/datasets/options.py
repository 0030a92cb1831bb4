"""What a dataset build is asked to do (picklable: worker processes receive it)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from distillery.core.shadow import EVAL_TAG, STUDENT_ANSWERED
from distillery.curation.datasets.validate import DEFAULT_MAX_TOKENS
from distillery.store import query


@dataclass(frozen=True)
class Rules:
    """Which captured calls are good enough to learn from (each rule can be switched off)."""

    successful_only: bool = True
    finish_reasons: tuple[str, ...] | None = ("stop", "tool_calls")  # None: any
    no_refusals: bool = True
    non_empty: bool = True
    min_tokens: int = 1
    max_tokens: int = DEFAULT_MAX_TOKENS


@dataclass(frozen=True)
class BuildOptions:
    name: str
    filters: query.Filters = field(default_factory=query.Filters)
    rules: Rules = field(default_factory=Rules)
    exact_dedupe: bool = True
    near_dedupe: bool = True
    near_threshold: float = 0.85
    prefer: tuple[str, str] | None = None  # copies with this tag win over newer ones
    strip_system_prompt: bool = False
    history_weight: int | None = None
    val_fraction: float = 0.1
    seed: int = 0
    incremental: bool = False
    output_dir: Path | None = None
    redact_defaults: bool = True
    redact_patterns: tuple[tuple[str, str], ...] = ()
    epochs: int = 3  # for the training-token estimate, unless a local student is named
    student: str | None = None  # a local student (model directory): its trainer's epochs
    tokenizer: str | None = None  # a local model directory: count with its tokenizer


def learnable(
    filters: query.Filters, *, eval_traffic: bool = False, student_answers: bool = False
) -> query.Filters:
    """The calls of ``filters`` a dataset may learn from: never the evals' own calls (the
    candidates' answers, made to be graded) nor the calls a route's student answered (a
    student learning from itself), unless asked for.  The one place this rule lives: the
    CLI's build, the dashboard's Distill and ``distill`` all select through it."""
    excluded = list(filters.exclude_tags)
    if not eval_traffic:
        excluded.append(EVAL_TAG)
    if not student_answers:
        excluded.append(STUDENT_ANSWERED)
    return replace(filters, exclude_tags=tuple(dict.fromkeys(excluded)))
