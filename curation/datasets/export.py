"""Writing a dataset version out for a trainer: OpenAI JSONL as is, or Parquet for HF.

The Parquet files hold one row per example with a ``messages`` column that
Hugging Face ``datasets`` and TRL read directly (a list of ``{role, content}``
plus those of ``name, tool_calls, tool_call_id, weight`` that the version
uses; content parts are joined into text) and ``tools`` as a JSON string,
because tool schemas differ from row to row and Parquet needs one schema per
column.  An empty split gets no file: ``load_dataset`` refuses an empty one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import orjson

from distillery.core.errors import DistilleryError
from distillery.core.shapes import message_text

PARQUET_NAMES = {"train": "train.parquet", "val": "validation.parquet"}


def _empty(path: Path) -> bool:
    return not path.exists() or path.stat().st_size == 0


def export_openai(source: Path, target: Path) -> tuple[list[Path], list[str]]:
    """Copy the JSONL files; returns the files written and the splits left out (empty)."""
    target.mkdir(parents=True, exist_ok=True)
    written, empty = [], []
    for split in ("train", "val"):
        if _empty(source / f"{split}.jsonl"):
            empty.append(split)
            continue
        destination = target / f"{split}.jsonl"
        shutil.copyfile(source / f"{split}.jsonl", destination)
        written.append(destination)
    return written, empty


# Optional keys of a message, and their Arrow types (tool calls are built in the writer).
MESSAGE_KEYS = ("name", "tool_calls", "tool_call_id", "weight")


def _row(example: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    messages = []
    for message in example["messages"]:
        row = {
            "role": message["role"],
            "content": message_text(message) if "content" in message else None,
        }
        row.update({key: message.get(key) for key in MESSAGE_KEYS if key in keys})
        messages.append(row)
    out: dict[str, Any] = {"messages": messages}
    if "tools" in keys:
        tools = example.get("tools")
        out["tools"] = orjson.dumps(tools).decode() if tools else None
    if "parallel_tool_calls" in keys:
        out["parallel_tool_calls"] = example.get("parallel_tool_calls")
    return out


def _present_keys(paths: list[Path]) -> set[str]:
    """Optional keys that some example of the version uses: only those become columns.

    Arrow gives every row of a struct column every field, so a key present in
    one message would appear (as null) in all of them; chat templates that test
    ``'tool_calls' in message`` then break on every row.  A version without tool
    calls gets no such field at all, as it would from the JSONL.
    """
    keys: set[str] = set()
    for path in paths:
        with path.open("rb") as lines:
            for line in lines:
                example = orjson.loads(line)
                keys.update(k for k in ("tools", "parallel_tool_calls") if k in example)
                for message in example["messages"]:
                    keys.update(k for k in MESSAGE_KEYS if k in message)
    return keys


def export_parquet(source: Path, target: Path) -> tuple[list[Path], list[str]]:
    """Parquet per non-empty split; returns the files written and the splits left out."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DistilleryError(
            "Parquet export needs pyarrow: pip install 'distillery[hf]'"
        ) from None
    splits = [split for split in PARQUET_NAMES if not _empty(source / f"{split}.jsonl")]
    empty = [split for split in PARQUET_NAMES if split not in splits]
    keys = _present_keys([source / f"{split}.jsonl" for split in splits])
    call = pa.struct(
        [
            ("id", pa.string()),
            ("type", pa.string()),
            ("function", pa.struct([("name", pa.string()), ("arguments", pa.string())])),
        ]
    )
    types = {
        "name": pa.string(),
        "tool_calls": pa.list_(call),
        "tool_call_id": pa.string(),
        "weight": pa.int8(),
    }
    message = pa.struct(
        [("role", pa.string()), ("content", pa.string())]
        + [(key, types[key]) for key in MESSAGE_KEYS if key in keys]
    )
    columns = [("messages", pa.list_(message))]
    if "tools" in keys:
        columns.append(("tools", pa.string()))
    if "parallel_tool_calls" in keys:
        columns.append(("parallel_tool_calls", pa.bool_()))
    schema = pa.schema(columns)
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for split in splits:
        destination = target / PARQUET_NAMES[split]
        with (
            pq.ParquetWriter(destination, schema) as writer,
            (source / f"{split}.jsonl").open("rb") as lines,
        ):
            batch: list[dict[str, Any]] = []
            for line in lines:
                batch.append(_row(orjson.loads(line), keys))
                if len(batch) >= 10_000:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                    batch = []
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        written.append(destination)
    return written, empty
