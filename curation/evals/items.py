"""What an eval grades: prompts with the teacher's stored answer as the reference.

Items come from a dataset version's validation split (the default), from a
filter over stored calls, or from any OpenAI-format JSONL file.  The final
assistant message of each example is the reference; everything before it is
the prompt.  Request parameters of the original call (tools, tool_choice,
response_format, temperature, ...) are replayed when the store knows them.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from distillery.core.errors import DistilleryError
from distillery.core.shapes import message_text
from distillery.curation.datasets.examples import to_example
from distillery.store import Store, query
from distillery.store.records import DatasetVersionRecord

REPLAYED = (
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "temperature",
    "top_p",
    "max_tokens",
    "max_completion_tokens",
    "seed",
)


@dataclass
class Item:
    index: int
    messages: list[dict[str, Any]]
    reference: dict[str, Any]
    params: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    source: str | None = None

    @property
    def key(self) -> str:
        return hashlib.blake2b(
            orjson.dumps([self.messages, self.params.get("tools")]), digest_size=16
        ).hexdigest()

    @property
    def input_text(self) -> str:
        return "\n".join(f"{m.get('role')}: {message_text(m)}" for m in self.messages)

    @property
    def reference_text(self) -> str:
        return message_text(self.reference)


def _item(index: int, example: dict[str, Any], request: dict[str, Any] | None, tags: Any) -> Item:
    messages = list(example["messages"])
    reference = messages.pop()
    params = {key: (request or {})[key] for key in REPLAYED if key in (request or {})}
    for key in ("tools", "parallel_tool_calls"):
        if key in example:
            params[key] = example[key]
    return Item(index, messages, reference, params, dict(tags or {}))


def from_records(records: Iterable[dict[str, Any]]) -> list[Item]:
    items: list[Item] = []
    for record in records:
        candidate = to_example(record)
        if candidate is None:
            continue
        item = _item(len(items), candidate.example, record.get("request"), record.get("metadata"))
        item.source = record["id"]
        items.append(item)
    return items


def from_filters(store: Store, filters: query.Filters) -> list[Item]:
    ok = query.with_filters(filters, status="ok")
    return from_records(query.iterate(store, ok, order="asc"))


def from_jsonl(path: Path) -> list[Item]:
    items: list[Item] = []
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                example = orjson.loads(line)
            except orjson.JSONDecodeError:
                raise DistilleryError(f"{path}:{number} is not JSON.") from None
            messages = example.get("messages") if isinstance(example, dict) else None
            if not messages or messages[-1].get("role") != "assistant":
                raise DistilleryError(
                    f"{path}:{number} needs a final assistant message to grade against. "
                    "Check the file with `distillery dataset validate`."
                )
            items.append(_item(len(items), example, None, None))
    return items


def from_dataset(store: Store, version: DatasetVersionRecord, split: str = "val") -> list[Item]:
    """A dataset version's split; tags and request parameters come from the source calls."""
    directory = Path(version["path"])
    with (
        (directory / f"{split}.jsonl").open("rb") as lines,
        (directory / f"{split}.ids").open() as ids,
    ):
        pairs = [
            (orjson.loads(line), record_id.strip())
            for line, record_id in zip(lines, ids, strict=True)
        ]
    sources = {}
    for start in range(0, len(pairs), 500):
        chunk = tuple(record_id for _, record_id in pairs[start : start + 500])
        for record in query.find(store, query.Filters(ids=chunk), limit=None):
            sources[record["id"]] = record
    items: list[Item] = []
    for example, record_id in pairs:
        found = sources.get(record_id)
        item = _item(
            len(items),
            example,
            found["request"] if found else None,
            found["metadata"] if found else None,
        )
        item.source = record_id
        items.append(item)
    return items


def sample(items: list[Item], limit: int | None, seed: int) -> list[Item]:
    """A seeded sample of ``limit`` items, kept in their original order and renumbered."""
    if limit and limit < len(items):
        chosen = sorted(random.Random(seed).sample(range(len(items)), limit))
        items = [items[i] for i in chosen]
    for index, item in enumerate(items):
        item.index = index
    return items
