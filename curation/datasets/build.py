"""``distillery dataset build``: captured calls in, a validated, versioned dataset out.

The selected calls are cut into id ranges that worker processes read in
parallel (``scan.py``): each applies the quality rules, turns survivors into
OpenAI fine-tuning examples, redacts and validates them, and leaves a segment
of lines plus fixed-size facts on disk.  The parent then deduplicates over
those facts in priority order (an earlier version's examples, then preferred
tags, then newest first), splits by prompt group, and writes train and
validation files in record-id order.  The version directory appears
atomically (a rename) and is never written again; its manifest goes to the
database with the id of every source call.

Incremental builds start from the previous version: its examples are kept as
they are (first in priority, so new calls that duplicate them are dropped)
and only calls captured after its watermark are read.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import multiprocessing
import os
import re
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from distillery.core.errors import DistilleryError
from distillery.curation.datasets import tokens
from distillery.curation.datasets.dedupe import find_duplicates
from distillery.curation.datasets.manifest import Counts, Manifest
from distillery.curation.datasets.options import BuildOptions, Rules
from distillery.curation.datasets.scan import Segment, carry_over, scan, scan_store
from distillery.curation.datasets.validate import MIN_EXAMPLES, Report
from distillery.store import Store, datasets, query
from distillery.store.records import DatasetVersionRecord

__all__ = ["BuildError", "BuildOptions", "BuildResult", "Rules", "build"]

SPLITS = ("train", "val")
PARALLEL_FROM = 20_000  # fewer calls than this are read in-process


class BuildError(DistilleryError):
    """A dataset build cannot run as asked."""


@dataclass
class BuildResult:
    version: DatasetVersionRecord | None
    message: str


NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")


def check_name(name: str) -> None:
    """Dataset names become directory names and URL parts: keep them plain."""
    if not NAME.fullmatch(name):
        raise BuildError(
            f"Dataset name {name!r}: use letters, digits, '.', '_' and '-' (e.g. support-bot)."
        )


def build_in_process(url: str, options: BuildOptions, data_dir: Path) -> BuildResult:
    """``build`` with a store of its own: what a separate process (the dashboard's) runs."""
    from distillery.store import open_store

    store = open_store(url)
    try:
        return build(store, options, data_dir, workers=1)
    finally:
        store.close()


def build(
    store: Store,
    options: BuildOptions,
    data_dir: Path,
    progress: Callable[[int], None] | None = None,
    total: Callable[[int], None] | None = None,
    workers: int | None = None,
) -> BuildResult:
    if not 0 <= options.val_fraction < 1:
        raise BuildError("--val-fraction must be at least 0 and below 1.")
    if not 0 < options.near_threshold <= 1:
        raise BuildError("--near-threshold must be above 0 and at most 1.")
    workers = workers or min(os.cpu_count() or 1, 8)
    with datasets.build_lock(store, options.name):
        return _build_locked(store, options, data_dir, progress, total, workers)


def _build_locked(
    store: Store,
    options: BuildOptions,
    data_dir: Path,
    progress: Callable[[int], None] | None,
    total: Callable[[int], None] | None,
    workers: int,
) -> BuildResult:
    newest = datasets.latest(store, options.name)
    previous = newest if options.incremental else None
    number = (newest["version"] if newest else 0) + 1
    selection = replace(options.filters, after_id=previous["watermark"] if previous else None)
    watermark = _newest_id(store, selection)
    if previous is not None and watermark is None:
        return BuildResult(
            None,
            f"No calls captured since {options.name}@{previous['version']}: "
            f"no new version ({options.name}@{previous['version']} stands).",
        )
    selection = replace(selection, upto_id=watermark)
    # Decided once so workers and manifest agree; one that will not load fails here.
    options = replace(options, tokenizer=tokens.resolve(options.tokenizer))
    tokens.counter(options.tokenizer)
    final = options.output_dir or data_dir / "datasets" / options.name / f"v{number}"
    if final.exists() and any(final.iterdir()):
        raise BuildError(f"{final} exists and is not empty; pick another -o directory.")
    final.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{options.name}-", dir=final.parent))
    try:
        segments = _scan(store, options, selection, previous, scratch, workers, progress, total)
        manifest = _assemble(segments, options, selection, previous, scratch)
        if manifest.counts.examples == manifest.counts.carried_over:  # nothing new in it
            shutil.rmtree(scratch, ignore_errors=True)
            return BuildResult(None, _nothing_selected(options.name, manifest.counts, previous))
        manifest = manifest.model_copy(update={"version": number, "watermark": watermark})
        manifest.write(scratch / "manifest.json")
        for segment in segments:
            shutil.rmtree(segment.directory)
        (scratch / "signatures.u32").unlink(missing_ok=True)
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
        "content_hash": manifest.content_hash,
        "watermark": watermark,
        "train_examples": manifest.counts.train,
        "val_examples": manifest.counts.val,
        "path": str(final),
        "manifest": manifest.to_json(),
    }
    version = datasets.record_version(store, values, _lineage(final))
    return BuildResult(version, f"Built {options.name}@{number} in {final}")


def _epochs(options: BuildOptions, examples: int, has_validation: bool) -> tuple[int, int]:
    """The epochs the estimate counts: ``--epochs``, or what the local trainer will run
    for ``options.student`` (the same settings a job would choose)."""
    if options.student is None:
        return options.epochs, options.epochs
    try:
        from distillery.curation.training.trainer import estimate_epochs

        return estimate_epochs(options.student, examples, has_validation)
    except ImportError:
        raise BuildError(
            "--student needs the training extra: pip install torch==2.13.0 'distillery[train]'."
        ) from None
    except (OSError, ValueError) as exc:
        raise BuildError(f"--student {options.student}: not a model directory ({exc}).") from None


def _nothing_selected(name: str, counts: Counts, previous: DatasetVersionRecord | None) -> str:
    """Why a build made no new examples, in words: no calls, or what left each one out."""
    if previous is None:
        since, outcome = "", f"no version of {name} written"
    else:
        ref = f"{name}@{previous['version']}"
        since, outcome = f" since {ref}", f"no new version ({ref} stands)"
    if not counts.considered:
        return f"No calls match the filters{since}: {outcome}."
    reasons = ", ".join(f"{count} {reason}" for reason, count in counts.dropped.items())
    return (
        f"All {counts.considered} matching calls{since} were left out "
        f"({reasons or 'by the rules'}): {outcome}."
    )


def _newest_id(store: Store, filters: query.Filters) -> str | None:
    rows = query.find(store, filters, order="desc", limit=1)
    return rows[0]["id"] if rows else None


def _lineage(directory: Path) -> Iterator[tuple[str, str]]:
    for split in SPLITS:
        with (directory / f"{split}.ids").open() as handle:
            for line in handle:
                yield line.strip(), split


def _slices(store: Store, filters: query.Filters, parts: int) -> list[query.Filters]:
    """``filters`` cut into ``parts`` id ranges of about equal size, newest first."""
    count = query.count(store, filters)
    if parts <= 1 or count < PARALLEL_FROM:
        return [filters]
    bounds = query.id_quantiles(store, filters, [count * part // parts for part in range(1, parts)])
    edges = [filters.after_id, *bounds, filters.upto_id]
    # (low, high]: after_id is exclusive and upto_id inclusive, so ranges never overlap.
    slices = [replace(filters, after_id=low, upto_id=high) for low, high in pairwise(edges)]
    return slices[::-1]


def _scan(
    store: Store,
    options: BuildOptions,
    selection: query.Filters,
    previous: DatasetVersionRecord | None,
    scratch: Path,
    workers: int,
    progress: Callable[[int], None] | None,
    total: Callable[[int], None] | None,
) -> list[Segment]:
    segments: list[Segment] = []
    if previous is not None:
        counter = tokens.counter(options.tokenizer)
        segments.append(carry_over(Path(previous["path"]), scratch / "carried", counter))
    passes = [selection]
    if options.prefer:
        passes = [
            replace(selection, tags=(*selection.tags, options.prefer)),
            replace(selection, exclude_tags=(*selection.exclude_tags, options.prefer)),
        ]
    if total is not None:
        total(query.count(store, selection))
    slices = [part for each in passes for part in _slices(store, each, workers * 2)]
    directories = [scratch / f"segment-{i:03d}" for i in range(len(slices))]
    if len(slices) == len(passes) and all(
        query.count(store, part) < PARALLEL_FROM for part in slices
    ):
        for part, directory in zip(slices, directories, strict=True):
            segment = scan_store(store, part, options, directory)
            segments.append(segment)
            if progress is not None:
                progress(segment.considered)
        return segments
    url = store.connect_url
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [
            pool.submit(scan, url, part, options, directory)
            for part, directory in zip(slices, directories, strict=True)
        ]
        if progress is not None:
            for future in concurrent.futures.as_completed(futures):
                progress(future.result().considered)
        segments.extend(future.result() for future in futures)
    return segments


def _assemble(
    segments: list[Segment],
    options: BuildOptions,
    selection: query.Filters,
    previous: DatasetVersionRecord | None,
    scratch: Path,
) -> Manifest:
    """The version's manifest; its number and watermark are set once the files are in place."""
    facts = [segment.facts() for segment in segments]
    keys = np.concatenate([f["keys"] for f in facts])
    eligible = np.concatenate([f["eligible"] for f in facts])
    signatures = scratch / "signatures.u32"
    with signatures.open("wb") as out:
        for segment in segments:
            with (segment.directory / "signatures.u32").open("rb") as source:
                shutil.copyfileobj(source, out, 1 << 20)
    protected = segments[0].count if previous is not None else 0
    exact, near, groups = find_duplicates(
        keys,
        eligible,
        signatures,
        options.near_threshold,
        protected=protected,
        exact_first=options.exact_dedupe,
    )
    if not options.near_dedupe:
        near[:] = False
    dropped: Counter[str] = Counter()
    system_prompts: Counter[str] = Counter()
    for segment in segments:
        dropped.update(segment.dropped)
        system_prompts.update(segment.system_prompts)
    for reason, mask in (("exact duplicate", exact), ("near duplicate", near)):
        if mask[protected:].any():
            dropped[reason] += int(mask[protected:].sum())
    counts, content_hash, train_tokens = _write(
        segments, facts, ~(exact | near), groups, protected, options, scratch
    )
    warnings = []
    if counts["train"] < MIN_EXAMPLES:
        warnings.append(
            f"fewer than {MIN_EXAMPLES} training examples: OpenAI's API will refuse the file"
        )
    if options.val_fraction and not counts["val"]:
        warnings.append("no validation examples: too few prompt groups for --val-fraction")
    fewest, most = _epochs(options, counts["train"], counts["val"] > 0)
    summary = Report(examples=counts["train"], tokens=train_tokens).summary(most)
    summary.pop("errors"), summary.pop("warnings")
    if options.student is not None:
        summary.update(min_epochs=fewest, epochs_from="the local trainer's, for this student")
    summary["method"] = tokens.method(options.tokenizer)  # how the counts were made
    considered = sum(segment.considered for segment in segments)
    fields = {
        "name": options.name,
        "version": 0,
        "watermark": None,
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
    return Manifest.parse(fields, f"the manifest of {options.name}")


def _describe(filters: query.Filters) -> dict[str, Any]:
    described: dict[str, Any] = {}
    for key, value in asdict(filters).items():
        if value in (None, (), []) or (value is False and key == "completions_only"):
            continue
        described[key] = value.isoformat() if isinstance(value, datetime) else value
    return described


def _split(leader: bytes, options: BuildOptions) -> str:
    """A group's side, from its leading example's content and the seed: the same calls split
    the same way in every build and on every machine (record ids come from the clock, so a
    split on them changed with every capture of the same traffic)."""
    digest = hashlib.blake2b(leader, digest_size=8, key=str(options.seed).encode()).digest()
    return "val" if int.from_bytes(digest, "big") / 2**64 < options.val_fraction else "train"


def _line(
    sources: Sequence[BinaryIO],
    segment_of: np.ndarray,
    offsets: np.ndarray,
    lengths: np.ndarray,
    i: int,
) -> bytes:
    source = sources[int(segment_of[i])]
    source.seek(int(offsets[i]))
    return source.read(int(lengths[i]))


def _write(
    segments: list[Segment],
    facts: list[Any],
    keep: np.ndarray,
    groups: np.ndarray,
    protected: int,
    options: BuildOptions,
    scratch: Path,
) -> tuple[dict[str, int], str, list[int]]:
    """Write the kept examples: carried ones first, then new ones in record-id order."""
    ids = np.array([i for segment in segments for i in segment.ids()], dtype="S40")
    segment_of = np.concatenate(
        [np.full(segment.count, n, dtype=np.int32) for n, segment in enumerate(segments)]
    )
    offsets = np.concatenate([f["offsets"] for f in facts])
    lengths = np.concatenate([f["lengths"] for f in facts])
    example_tokens = np.concatenate([f["tokens"] for f in facts])
    carried_splits = segments[0].splits if protected else None
    fresh = np.flatnonzero(keep[protected:]) + protected
    order = np.concatenate([np.arange(protected), fresh[np.argsort(ids[fresh], kind="stable")]])
    digest = {split: hashlib.sha256() for split in SPLITS}
    counts = dict.fromkeys(SPLITS, 0)
    train_tokens: list[int] = []
    sources = [(segment.directory / "lines.jsonl").open("rb") for segment in segments]
    files = {split: (scratch / f"{split}.jsonl").open("wb") for split in SPLITS}
    id_files = {split: (scratch / f"{split}.ids").open("w") for split in SPLITS}
    try:
        for i in order.tolist():
            leader = int(groups[i])
            if i < protected and carried_splits is not None:
                # A carried example keeps its split, even when a new call joins its group
                # to another carried group on the other side.
                split = carried_splits[i]
            elif leader < protected and carried_splits is not None:
                split = carried_splits[leader]  # a new example joins the one it resembles
            else:
                split = _split(_line(sources, segment_of, offsets, lengths, leader), options)
            line = _line(sources, segment_of, offsets, lengths, i)
            files[split].write(line)
            digest[split].update(line)
            id_files[split].write(ids[i].decode() + "\n")
            counts[split] += 1
            if split == "train":
                train_tokens.append(int(example_tokens[i]))
    finally:
        for handle in (*sources, *files.values()):
            handle.close()
        for ids_file in id_files.values():
            ids_file.close()
    content = hashlib.sha256(
        digest["train"].hexdigest().encode() + digest["val"].hexdigest().encode()
    ).hexdigest()
    counts["examples"] = counts["train"] + counts["val"]
    return counts, content, train_tokens
