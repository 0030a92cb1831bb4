"""``distillery dataset build``: captured calls in, a validated, versioned dataset out.

One streaming pass reads the selected calls (preferred tags first, then newest
first), applies the quality rules, turns each survivor into an OpenAI
fine-tuning example, redacts it, validates it and appends it to a scratch
file, remembering only fixed-size facts per example (offsets, keys, tokens,
a MinHash signature on disk).  Deduplication then runs over those facts; the
survivors are written in record-id order into train and validation files
split by prompt group.  The version directory appears atomically (a rename)
and is never written again; its manifest goes to the database with the id of
every source call.

Incremental builds start from the previous version: its examples are kept as
they are (first in priority, so new calls that duplicate them are dropped)
and only calls captured after its watermark are read.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import shutil
import tempfile
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from distillery.curation import examples as ex
from distillery.curation.dedupe import Deduplicator
from distillery.curation.validate import DEFAULT_MAX_TOKENS, MIN_EXAMPLES, Report, check_example
from distillery.errors import DistilleryError
from distillery.redact import Redactor
from distillery.store import Store, datasets, query
from distillery.store.db import COMPLETIONS

C = COMPLETIONS.c
COLUMNS = (C.id, C.status, C.error, C.request, C.response, C.metadata)
SPLITS = ("train", "val")


class BuildError(DistilleryError):
    """A dataset build cannot run as asked."""


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
    epochs: int = 3


@dataclass
class BuildResult:
    version: dict[str, Any] | None
    message: str


class _Examples:
    """Fixed-size facts about every example, in priority order; the lines live on disk."""

    def __init__(self, directory: Path, threshold: float) -> None:
        self.lines = (directory / "examples.jsonl").open("wb")
        self.offsets = array("q")
        self.lengths = array("q")
        self.tokens = array("q")
        self.ids: list[str] = []
        self.carried: list[str] = []  # split of each carried-over example
        self.dedupe = Deduplicator(threshold, directory)
        self._position = 0
        self._keys: list[bytes] = []
        self._shingles: list[list[str] | None] = []

    def add(self, record_id: str, example: dict[str, Any], line: bytes, tokens: int) -> None:
        self.ids.append(record_id)
        self.offsets.append(self._position)
        self.lengths.append(len(line))
        self._position += len(line)
        self.lines.write(line)
        self.tokens.append(tokens)
        varying = ex.varying_text(example)
        self._keys.append(ex.exact_key(example))
        self._shingles.append(ex.shingles(varying) if varying.strip() else None)
        if len(self._keys) >= 5000:
            self.flush()

    def flush(self) -> None:
        if self._keys:
            self.dedupe.add(self._keys, self._shingles)
            self._keys, self._shingles = [], []

    def __len__(self) -> int:
        return len(self.ids)


def _split(group: str, seed: int, fraction: float) -> str:
    digest = hashlib.blake2b(f"{seed}:{group}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(digest, "big") / 2**64 < fraction else "train"


def build(
    store: Store,
    options: BuildOptions,
    data_dir: Path,
    progress: Callable[[int], None] | None = None,
    total: Callable[[int], None] | None = None,
) -> BuildResult:
    if not 0 <= options.val_fraction < 1:
        raise BuildError("--val-fraction must be at least 0 and below 1.")
    if not 0 < options.near_threshold <= 1:
        raise BuildError("--near-threshold must be above 0 and at most 1.")
    with datasets.build_lock(store, options.name):
        return _build_locked(store, options, data_dir, progress, total)


def _build_locked(
    store: Store,
    options: BuildOptions,
    data_dir: Path,
    progress: Callable[[int], None] | None,
    total: Callable[[int], None] | None,
) -> BuildResult:
    newest = datasets.latest(store, options.name)
    previous = newest if options.incremental else None
    if options.incremental and previous is None:
        previous = None  # the first incremental build is a full one
    number = (newest["version"] if newest else 0) + 1
    selection = replace(options.filters, after_id=previous["watermark"] if previous else None)
    watermark = _newest_id(store, selection)
    if previous is not None and watermark is None:
        return BuildResult(
            None,
            f"No completions captured since {options.name}@{previous['version']}; nothing to do.",
        )
    selection = replace(selection, upto_id=watermark)
    final = options.output_dir or data_dir / "datasets" / options.name / f"v{number}"
    if final.exists() and any(final.iterdir()):
        raise BuildError(f"{final} exists and is not empty; pick another -o directory.")
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{options.name}-", dir=final.parent))
    try:
        manifest = _run(store, options, selection, previous, scratch, final, progress, total)
        manifest.update(name=options.name, version=number, watermark=watermark)
        (scratch / "manifest.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
        for name in ("examples.jsonl",):
            (scratch / name).unlink(missing_ok=True)
        for leftover in scratch.glob("signatures-*"):
            leftover.unlink()
        if final.exists():
            final.rmdir()
        os.replace(scratch, final)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    values = {
        "name": options.name,
        "version": number,
        "created_at": datetime.now(UTC),
        "content_hash": manifest["content_hash"],
        "watermark": watermark,
        "train_examples": manifest["counts"]["train"],
        "val_examples": manifest["counts"]["val"],
        "path": str(final),
        "manifest": manifest,
    }
    version_id = datasets.record_version(store, values, _lineage(final))
    return BuildResult({**values, "id": version_id}, f"Built {options.name}@{number} in {final}")


def _newest_id(store: Store, filters: query.Filters) -> str | None:
    rows = query.find(store, filters, order="desc", limit=1)
    return rows[0]["id"] if rows else None


def _lineage(directory: Path) -> Any:
    for split in SPLITS:
        with (directory / f"{split}.ids").open() as handle:
            for line in handle:
                yield line.strip(), split


def _run(
    store: Store,
    options: BuildOptions,
    selection: query.Filters,
    previous: dict[str, Any] | None,
    scratch: Path,
    final: Path,
    progress: Callable[[int], None] | None,
    total: Callable[[int], None] | None,
) -> dict[str, Any]:
    items = _Examples(scratch, options.near_threshold)
    dropped: Counter[str] = Counter()
    system_prompts: Counter[str] = Counter()
    redactor = Redactor.from_settings(options.redact_defaults, options.redact_patterns)
    if previous is not None:
        _carry_over(Path(previous["path"]), items)
    protected = len(items)
    passes = [selection]
    if options.prefer:
        passes = [
            replace(selection, tags=(*selection.tags, options.prefer)),
            replace(selection, exclude_tags=(*selection.exclude_tags, options.prefer)),
        ]
    if total is not None:
        total(query.count(store, selection))
    considered = 0
    for filters in passes:
        for record in query.iterate(store, filters, order="desc", columns=COLUMNS):
            considered += 1
            if progress is not None and considered % 1000 == 0:
                progress(1000)
            reason = _admit(record, options, items, redactor, system_prompts)
            if reason:
                dropped[reason] += 1
    if progress is not None:
        progress(considered % 1000)
    items.flush()
    exact, near, groups = items.dedupe.duplicates(protected, exact_first=options.exact_dedupe)
    items.dedupe.close()
    if not options.near_dedupe:
        near[:] = False
    for reason, mask in (("exact duplicate", exact), ("near duplicate", near)):
        if mask[protected:].any():
            dropped[reason] += int(mask[protected:].sum())
    keep = ~(exact | near)
    counts, content_hash, tokens = _write(items, keep, groups, protected, options, scratch)
    train_report = Report(examples=counts["train"])
    warnings = []
    if counts["train"] < MIN_EXAMPLES:
        warnings.append(
            f"fewer than {MIN_EXAMPLES} training examples: OpenAI's API will refuse the file"
        )
    if options.val_fraction and not counts["val"]:
        warnings.append("no validation examples: too few prompt groups for --val-fraction")
    train_report.tokens = tokens
    summary = train_report.summary(options.epochs)
    summary.pop("errors"), summary.pop("warnings")
    return {
        "created_at": datetime.now(UTC).isoformat(),
        "previous_version": previous["version"] if previous else None,
        "filters": _describe(selection),
        "rules": asdict(options.rules),
        "dedupe": {
            "exact": options.exact_dedupe,
            "near": options.near_dedupe,
            "near_threshold": options.near_threshold,
            "prefer": "=".join(options.prefer) if options.prefer else None,
            "compared": "prompt messages other than system/developer (word 3-gram MinHash)",
        },
        "split": {"val_fraction": options.val_fraction, "seed": options.seed, "by": "prompt group"},
        "pruning": {
            "strip_system_prompt": options.strip_system_prompt,
            "system_prompts": [
                {"text": text, "examples": n} for text, n in system_prompts.most_common(5)
            ],
        },
        "history_weight": options.history_weight,
        "redaction": {
            "defaults": options.redact_defaults,
            "patterns": [name for name, _ in options.redact_patterns],
        },
        "counts": {
            "considered": considered,
            "carried_over": protected,
            "dropped": dict(sorted(dropped.items())),
            **counts,
        },
        "tokens": summary,
        "warnings": warnings,
        "content_hash": content_hash,
        "files": {"train": "train.jsonl", "val": "val.jsonl"},
    }


def _describe(filters: query.Filters) -> dict[str, Any]:
    described: dict[str, Any] = {}
    for key, value in asdict(filters).items():
        if value in (None, (), []) or (value is False and key == "completions_only"):
            continue
        described[key] = value.isoformat() if isinstance(value, datetime) else value
    return described


def _carry_over(directory: Path, items: _Examples) -> None:
    for split in SPLITS:
        with (
            (directory / f"{split}.jsonl").open("rb") as lines,
            (directory / f"{split}.ids").open() as ids,
        ):
            for line, record_id in zip(lines, ids, strict=True):
                example = orjson.loads(line)
                items.add(record_id.strip(), example, line, ex.estimate_tokens(example))
                items.carried.append(split)


def _admit(
    record: dict[str, Any],
    options: BuildOptions,
    items: _Examples,
    redactor: Redactor,
    system_prompts: Counter[str],
) -> str | None:
    """Add the record's example, or say why not."""
    rules = options.rules
    if rules.successful_only and (record["status"] >= 400 or record["error"] is not None):
        return "failed call"
    candidate = ex.to_example(record, strip_system=options.strip_system_prompt)
    if candidate is None:
        return "no output"
    if rules.finish_reasons is not None and candidate.finish_reason not in rules.finish_reasons:
        return f"finish_reason {candidate.finish_reason}"
    if rules.no_refusals and ex.is_refusal(candidate.output):
        return "refusal"
    final = candidate.example["messages"][-1]
    if rules.non_empty and not final.get("content") and not final.get("tool_calls"):
        return "empty output"
    example = redactor(candidate.example)
    if options.history_weight is not None:
        for message in example["messages"][:-1]:
            if message.get("role") == "assistant":
                message["weight"] = options.history_weight
    tokens = ex.estimate_tokens(example)
    if tokens < rules.min_tokens:
        return "too short"
    if tokens > rules.max_tokens:
        return "too long"
    report = Report()
    check_example(example, 1, report, rules.max_tokens)
    if report.errors:
        return f"invalid: {next(iter(report.errors))}"
    if options.strip_system_prompt and len(system_prompts) < 1000:
        for text in ex.system_prompts(record):
            system_prompts[text] += 1
    items.add(record["id"], example, orjson.dumps(example) + b"\n", tokens)
    return None


def _write(
    items: _Examples, keep: Any, groups: Any, protected: int, options: BuildOptions, scratch: Path
) -> tuple[dict[str, int], str, list[int]]:
    items.lines.close()
    digest = {split: hashlib.sha256() for split in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    tokens: list[int] = []
    files = {split: (scratch / f"{split}.jsonl").open("wb") for split in SPLITS}
    id_files = {split: (scratch / f"{split}.ids").open("w") for split in SPLITS}
    order = list(range(protected)) + sorted(
        (i for i in range(protected, len(items)) if keep[i]), key=items.ids.__getitem__
    )
    path = scratch / "examples.jsonl"
    with path.open("rb") as handle:
        source: mmap.mmap | bytes = (
            mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else b""
        )
        for i in order:
            leader = int(groups[i])
            if leader < protected:  # carried over, or grouped with an example that was
                split = items.carried[leader]
            else:
                split = _split(items.ids[leader], options.seed, options.val_fraction)
            line = source[items.offsets[i] : items.offsets[i] + items.lengths[i]]
            files[split].write(line)
            digest[split].update(line)
            id_files[split].write(items.ids[i] + "\n")
            counts[split] += 1
            if split == "train":
                tokens.append(items.tokens[i])
        if isinstance(source, mmap.mmap):
            source.close()
    for output in files.values():
        output.close()
    for ids in id_files.values():
        ids.close()
    content = hashlib.sha256(
        digest["train"].hexdigest().encode() + digest["val"].hexdigest().encode()
    ).hexdigest()
    counts["examples"] = counts["train"] + counts["val"]
    return counts, content, tokens
