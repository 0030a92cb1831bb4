"""The spool: append-only JSON-lines segments, the channel from the request path to the writer.

Each proxy process owns an *instance*: a lock file ``<pid>-<hex>.lock`` it holds for
its life and segments ``<pid>-<hex>-<seq>.jsonl`` it appends to, one at a time.  A
line is one redacted capture record, written with one ``os.write`` on an ``O_APPEND``
file before the client receives the end of its answer; the page cache survives
``kill -9`` of any process, so a call a client fully received is on disk.

The writer (``writer.py``, another process) reads them: a segment is *closed* once
its instance has a newer one or its instance's lock is free (the process is gone);
only a closed segment is ever deleted, and only once every record in it is in the
database.  Only whole lines are read (a record never holds a raw newline), so the
writer can follow the segment the proxy is still appending to.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import random
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import orjson
import structlog

from distillery.store.records import CaptureRecord

log = structlog.get_logger()

ROTATE_BYTES = 8 * 1024 * 1024
ROTATE_SECONDS = 1.0
SUFFIX = ".jsonl"


def new_record_id() -> str:
    """Time-ordered, unique across processes: ``cap_`` + ns clock + 48 random bits.

    ``random``, not ``secrets``: an id is no secret (clients see it as x-request-id), and
    ``secrets`` is a system call on every request.  ``random`` is seeded from the OS in each
    process and again in a forked child, so two processes do not share a sequence.
    """
    return f"cap_{time.time_ns():016x}{random.getrandbits(48):012x}"


class Spool:
    """This process's segments under ``directory``; ``append`` is thread-safe."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.instance = f"{os.getpid()}-{secrets.token_hex(3)}"
        owner = claim(directory / f"{self.instance}.lock")
        if owner is None:  # pragma: no cover - a fresh random name cannot be held
            raise RuntimeError("could not lock a fresh spool instance")
        self._owner = owner
        self.lock = threading.Lock()
        self.seq = 1
        self.size = 0
        self.opened_at = time.monotonic()
        self._fd = self._open(self.seq)

    def path(self, seq: int) -> Path:
        return self.directory / f"{self.instance}-{seq:08d}{SUFFIX}"

    def _open(self, seq: int) -> int:
        return os.open(self.path(seq), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def append(self, line: bytes) -> None:
        """Append one line (a new segment first when this one is full or a second old).

        A write the disk could only partly take (it filled up) is cut off again,
        so the segment never holds half a line that would swallow the next one.
        """
        with self.lock:
            if self.size and (
                self.size >= ROTATE_BYTES or time.monotonic() - self.opened_at >= ROTATE_SECONDS
            ):
                self._rotate()
            try:
                written = os.write(self._fd, line)
            except OSError:
                self._truncate()
                raise
            if written != len(line):
                self._truncate()
                raise OSError(errno.ENOSPC, f"short spool write ({written} of {len(line)} bytes)")
            self.size += written

    def _truncate(self) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self.size)

    def _rotate(self) -> None:
        """Close the active segment for a new one (the lock held); when no new one can
        be created (disk full), the active one stays open."""
        try:
            fd = self._open(self.seq + 1)
        except OSError as exc:
            log.warning("cannot start a new spool segment", error=str(exc))
            return
        os.close(self._fd)
        self.seq += 1
        self._fd = fd
        self.size = 0
        self.opened_at = time.monotonic()

    def close(self) -> None:
        """Stop appending; what the segments hold stays for the writer (it sees the
        instance's lock free and takes the rest)."""
        with self.lock:
            os.close(self._fd)
            if self.size == 0:
                with contextlib.suppress(FileNotFoundError):
                    self.path(self.seq).unlink()
        release(self._owner, self.directory / f"{self.instance}.lock")


def pending_bytes(directory: Path) -> int:
    """Bytes in the segments under ``directory`` (records not yet known to be stored)."""
    total = 0
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if entry.name.endswith(SUFFIX):
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat().st_size
    return total


def segments(directory: Path) -> dict[str, list[Path]]:
    """Every instance's segments, oldest first."""
    groups: dict[str, list[Path]] = {}
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(directory):
            if entry.name.endswith(SUFFIX):
                path = Path(entry.path)
                groups.setdefault(path.stem.rsplit("-", 1)[0], []).append(path)
    for paths in groups.values():
        paths.sort()
    return groups


def claim(lock_path: Path) -> int | None:
    """Hold ``lock_path`` (an open fd), or ``None`` when a live process holds it."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def release(fd: int, lock_path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        lock_path.unlink()
    os.close(fd)


@dataclass
class Lines:
    """What one read of a segment found: records, and where the next read starts."""

    records: list[CaptureRecord]
    offset: int


def read_lines(path: Path, offset: int, closed: bool) -> Lines:
    """The whole lines of ``path`` from ``offset``.  In a ``closed`` segment a torn last
    line (a crash mid-write) is skipped; in an open one it is still being written."""
    with path.open("rb") as handle:
        handle.seek(offset)
        data = handle.read()
    end = data.rfind(b"\n") + 1
    if closed and end < len(data):
        log.warning("spool line torn by a crash, skipped", path=str(path))
    records = list(_parse(data[:end], path))
    return Lines(records, offset + (len(data) if closed else end))


def read_segment(path: Path) -> Iterator[CaptureRecord]:
    """Records in a spool segment; a torn last line (crash mid-write) is skipped."""
    yield from read_lines(path, 0, closed=True).records


def _parse(data: bytes, path: Path) -> Iterator[CaptureRecord]:
    for number, line in enumerate(data.splitlines(), 1):
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            log.warning("spool line unreadable, skipped", path=str(path), line=number)
            continue
        if isinstance(record, dict) and "id" in record:
            # Checked where it is inserted: a record that is not one is dead-lettered.
            yield cast(CaptureRecord, record)
