"""One streaming pass over a slice of the captured calls, in a worker process.

A slice is a range of record ids; each worker reads its own from the database
(newest first), applies the quality rules, turns survivors into examples,
redacts and validates them and writes them to a segment directory:

    lines.jsonl      the examples, one per line
    signatures.u32   their MinHash signatures (num_perm uint32 each)
    ids.txt          the source record id of each line
    facts.npz        offsets, lengths, tokens, exact keys, near-dedupe eligibility

Only these fixed-size facts come back to the parent, which deduplicates and
writes the version; memory stays flat however many calls are read.
"""

from __future__ import annotations

from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from distillery.core.redact import Redactor
from distillery.curation.datasets import examples as ex
from distillery.curation.datasets import tokens
from distillery.curation.datasets.dedupe import SignatureWriter
from distillery.curation.datasets.options import BuildOptions
from distillery.curation.datasets.validate import Report, check_example
from distillery.store import Store, open_store, query
from distillery.store.db import COMPLETIONS

C = COMPLETIONS.c
COLUMNS = (C.id, C.status, C.error, C.request, C.response, C.metadata)
BATCH = 5000


@dataclass
class Segment:
    directory: Path
    count: int = 0
    considered: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    system_prompts: Counter[str] = field(default_factory=Counter)
    splits: list[str] | None = None  # carried-over examples keep their split

    def facts(self) -> Any:
        return np.load(self.directory / "facts.npz")

    def ids(self) -> list[str]:
        return (self.directory / "ids.txt").read_text().split()


class SegmentWriter:
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.segment = Segment(directory)
        self.lines = (directory / "lines.jsonl").open("wb")
        self.ids = (directory / "ids.txt").open("w")
        self.signatures = SignatureWriter(directory / "signatures.u32")
        self.offsets = array("q")
        self.lengths = array("q")
        self.tokens = array("q")
        self._position = 0
        self._keys: list[bytes] = []
        self._shingles: list[list[str] | None] = []

    def add(self, record_id: str, example: dict[str, Any], line: bytes, tokens: int) -> None:
        self.ids.write(record_id + "\n")
        self.offsets.append(self._position)
        self.lengths.append(len(line))
        self.tokens.append(tokens)
        self._position += len(line)
        self.lines.write(line)
        varying = ex.varying_text(example)
        self._keys.append(ex.exact_key(example))
        self._shingles.append(ex.shingles(varying) if varying.strip() else None)
        self.segment.count += 1
        if len(self._keys) >= BATCH:
            self._flush()

    def _flush(self) -> None:
        if self._keys:
            self.signatures.add(self._keys, self._shingles)
            self._keys, self._shingles = [], []

    def finish(self) -> Segment:
        self._flush()
        keys, eligible = self.signatures.finish()
        self.lines.close()
        self.ids.close()
        np.savez(
            self.segment.directory / "facts.npz",
            offsets=np.frombuffer(self.offsets, dtype=np.int64),
            lengths=np.frombuffer(self.lengths, dtype=np.int64),
            tokens=np.frombuffer(self.tokens, dtype=np.int64),
            keys=keys,
            eligible=eligible,
        )
        return self.segment


def scan(url: str, filters: query.Filters, options: BuildOptions, directory: Path) -> Segment:
    """Read one slice of calls into a segment (the body of a worker process)."""
    store = open_store(url)
    try:
        return scan_store(store, filters, options, directory)
    finally:
        store.close()


def scan_store(
    store: Store, filters: query.Filters, options: BuildOptions, directory: Path
) -> Segment:
    count = tokens.counter(options.tokenizer)  # loaded once per worker, before any file
    writer = SegmentWriter(directory)
    segment = writer.segment
    redactor = Redactor.from_settings(options.redact_defaults, options.redact_patterns)
    for record in query.iterate(store, filters, order="desc", columns=COLUMNS):
        segment.considered += 1
        reason = admit(record, options, writer, redactor, segment.system_prompts, count)
        if reason:
            segment.dropped[reason] += 1
    return writer.finish()


def carry_over(
    previous: Path, directory: Path, count: Callable[[dict[str, Any]], int] = tokens.estimate_tokens
) -> Segment:
    """The previous version's examples, as a segment that keeps their split."""
    writer = SegmentWriter(directory)
    splits: list[str] = []
    for split in ("train", "val"):
        with (
            (previous / f"{split}.jsonl").open("rb") as lines,
            (previous / f"{split}.ids").open() as ids,
        ):
            for line, record_id in zip(lines, ids, strict=True):
                example = orjson.loads(line)
                writer.add(record_id.strip(), example, line, count(example))
                splits.append(split)
    segment = writer.finish()
    segment.splits = splits
    return segment


def admit(
    record: dict[str, Any],
    options: BuildOptions,
    writer: SegmentWriter,
    redactor: Redactor,
    system_prompts: Counter[str],
    count: Callable[[dict[str, Any]], int] = tokens.estimate_tokens,
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
    size = count(example)
    if size < rules.min_tokens:
        return "too short"
    if size > rules.max_tokens:
        return "too long"
    report = Report()
    check_example(example, 1, report, rules.max_tokens, size)
    if report.errors:
        return f"invalid: {next(iter(report.errors))}"
    if options.strip_system_prompt and len(system_prompts) < 1000:
        for text in ex.system_prompts(record):
            system_prompts[text] += 1
    writer.add(record["id"], example, orjson.dumps(example) + b"\n", size)
    return None
