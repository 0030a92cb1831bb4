"""Writing a dataset version out for a trainer: OpenAI JSONL as is, or Parquet for HF.

The Parquet files hold one row per example with a ``messages`` column that
Hugging Face ``datasets`` and TRL read directly (a list of
``{role, content, name, tool_calls, tool_call_id, weight}``; content parts
are joined into text) and ``tools`` as a JSON string, because tool schemas
differ from row to row and Parquet needs one schema per column.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import orjson

from distillery.errors import DistilleryError
from distillery.store.records import message_text

PARQUET_NAMES = {"train": "train.parquet", "val": "validation.parquet"}


def export_openai(source: Path, target: Path) -> list[Path]:
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for split in ("train", "val"):
        destination = target / f"{split}.jsonl"
        shutil.copyfile(source / f"{split}.jsonl", destination)
        written.append(destination)
    return written


def _row(example: dict[str, Any]) -> dict[str, Any]:
    messages = []
    for message in example["messages"]:
        calls = message.get("tool_calls")
        messages.append(
            {
                "role": message["role"],
                "content": message_text(message) if "content" in message else None,
                "name": message.get("name"),
                "tool_calls": calls,
                "tool_call_id": message.get("tool_call_id"),
                "weight": message.get("weight"),
            }
        )
    tools = example.get("tools")
    return {
        "messages": messages,
        "tools": orjson.dumps(tools).decode() if tools else None,
        "parallel_tool_calls": example.get("parallel_tool_calls"),
    }


def export_parquet(source: Path, target: Path) -> list[Path]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DistilleryError(
            "Parquet export needs pyarrow: pip install 'distillery[hf]'"
        ) from None
    call = pa.struct(
        [
            ("id", pa.string()),
            ("type", pa.string()),
            ("function", pa.struct([("name", pa.string()), ("arguments", pa.string())])),
        ]
    )
    schema = pa.schema(
        [
            (
                "messages",
                pa.list_(
                    pa.struct(
                        [
                            ("role", pa.string()),
                            ("content", pa.string()),
                            ("name", pa.string()),
                            ("tool_calls", pa.list_(call)),
                            ("tool_call_id", pa.string()),
                            ("weight", pa.int8()),
                        ]
                    )
                ),
            ),
            ("tools", pa.string()),
            ("parallel_tool_calls", pa.bool_()),
        ]
    )
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for split, name in PARQUET_NAMES.items():
        destination = target / name
        with (
            pq.ParquetWriter(destination, schema) as writer,
            (source / f"{split}.jsonl").open("rb") as lines,
        ):
            batch: list[dict[str, Any]] = []
            for line in lines:
                batch.append(_row(orjson.loads(line)))
                if len(batch) >= 10_000:
                    writer.write_table(pa.Table.from_pylist(batch, schema=schema))
                    batch = []
            writer.write_table(pa.Table.from_pylist(batch, schema=schema))
        written.append(destination)
    return written
