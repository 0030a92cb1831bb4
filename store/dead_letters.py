"""Dead letters: captured calls the database refused even after repair.

The capture writer never lets one bad record hold back the others: a record the
database refuses is repaired (``repair.py``), and if even the repair is refused it is
appended, with the reason, to ``<data dir>/dead-letter/<process>.jsonl``.  Nothing is
lost and nothing is retried by itself: the cause is usually a database limit or a
schema problem that someone has to fix.  ``distillery db dead-letters`` lists them,
``--retry`` inserts them once the cause is fixed, ``--purge`` deletes them.

Each process appends whole lines with ``O_APPEND`` to its own file, so a reader can
take the files while proxies run: a file is renamed before it is rewritten, and a
proxy's next dead letter simply starts a new file.
"""

from __future__ import annotations

import errno
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from distillery.store.db import Store
from distillery.store.records import CaptureRecord
from distillery.store.repair import RecordRefused, repair

SUFFIX = ".jsonl"
TAKEN = ".retrying"  # a file a retry has taken; back to SUFFIX with what is left


@dataclass(frozen=True)
class DeadLetter:
    id: str
    at: float
    reason: str
    record: dict[str, Any]
    file: Path

    def row(self) -> dict[str, Any]:
        """What a listing shows: never the record's text, which can be large."""
        record = self.record
        return {
            "id": self.id,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at)),
            "model": record.get("model_requested"),
            "status": record.get("status"),
            "tenant": record.get("tenant"),
            "reason": self.reason,
            "file": str(self.file),
        }


def append(directory: Path, instance: str, record: CaptureRecord, reason: str) -> Path:
    """Append one dead letter (``OSError`` when the file cannot be written)."""
    line = orjson.dumps(
        {"id": record.get("id"), "at": time.time(), "reason": reason, "record": record},
        default=str,
    )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / f"{instance}{SUFFIX}"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        if os.write(fd, line + b"\n") != len(line) + 1:
            raise OSError(errno.ENOSPC, "short write")
    finally:
        os.close(fd)
    return path


def read(directory: Path) -> Iterator[DeadLetter]:
    """Every dead letter, oldest file first (lines that are not whole are skipped)."""
    if not directory.is_dir():
        return
    files = sorted(
        (p for p in directory.iterdir() if p.suffix in (SUFFIX, TAKEN)),
        key=lambda p: p.stat().st_mtime,
    )
    for path in files:
        yield from _entries(path)


def _entries(path: Path) -> Iterator[DeadLetter]:
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:  # taken by a retry meanwhile
        return
    for line in lines:
        try:
            entry = orjson.loads(line)
            yield DeadLetter(
                str(entry["id"]), float(entry["at"]), str(entry["reason"]), entry["record"], path
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue


@dataclass
class Retried:
    stored: int = 0
    refused: int = 0


def retry(directory: Path, store: Store) -> Retried:
    """Insert every dead letter again (repaired if the database still refuses it as it
    is); the ones still refused stay.  Raises what the store raises when the database
    is unavailable, leaving every dead letter where it was."""
    outcome = Retried()
    if not directory.is_dir():
        return outcome
    for path in sorted(p for p in directory.iterdir() if p.suffix == SUFFIX):
        taken = path.with_suffix(TAKEN)
        os.replace(path, taken)  # a proxy's next dead letter starts a new file
        left: list[DeadLetter] = []
        entries = list(_entries(taken))
        try:
            for number, entry in enumerate(entries):
                try:
                    _insert(store, entry.record)
                    outcome.stored += 1
                except RecordRefused as exc:
                    outcome.refused += 1
                    left.append(DeadLetter(entry.id, entry.at, str(exc), entry.record, path))
                except BaseException:
                    left.extend(entries[number:])
                    raise
        finally:
            for entry in left:
                record: Any = entry.record
                append(directory, path.stem, record, entry.reason)
            taken.unlink()
    return outcome


def _insert(store: Store, record: Any) -> None:
    try:
        store.insert([record])
    except RecordRefused:
        fixed, _ = repair(record)
        store.insert([fixed])


def purge(directory: Path) -> int:
    """Delete every dead letter; how many there were."""
    count = 0
    if not directory.is_dir():
        return count
    for path in directory.iterdir():
        if path.suffix in (SUFFIX, TAKEN):
            count += sum(1 for _ in _entries(path))
            path.unlink(missing_ok=True)
    return count
