"""Getting every captured call into the database without slowing the request.

The design is a write-ahead spool plus a background writer:

* On the request path the record is redacted, serialised once and appended to
  the current spool segment (one ``os.write`` on an ``O_APPEND`` file) *before*
  the last bytes of the response go to the client, then put on a bounded
  in-memory queue.  The page cache survives ``kill -9``, so any response a
  client has fully received is on disk and is replayed at the next start.
* A writer thread drains the queue in batches into the database with
  ``INSERT ... ON CONFLICT DO NOTHING`` keyed by the record id.
* The spool rotates into a new segment every second or so; a segment is
  deleted once every record in it is known to be in the database.  When an
  insert fails (database down) or the queue is full, the affected segments are
  marked dirty and replayed from disk once the database answers again.
* At start, segments left by a dead process (its lock file is not held) are
  replayed, then deleted.  Each process owns its own segments, so several
  workers can share a spool directory.

Duplicates are impossible because every path into the database is keyed by the
record id minted on the request path; losses are impossible short of losing
the disk itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import queue
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import structlog

from distillery.config import CaptureSettings
from distillery.redact import Redactor
from distillery.store import Store

log = structlog.get_logger()

ROTATE_BYTES = 8 * 1024 * 1024
ROTATE_SECONDS = 1.0
MAX_BACKOFF = 5.0


def new_record_id() -> str:
    """Time-ordered, unique across processes: ``cap_`` + ns clock + randomness."""
    return f"cap_{time.time_ns():016x}{secrets.token_hex(6)}"


class Spool:
    """This process's append-only JSON-lines segments under ``directory``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.instance = f"{os.getpid()}-{secrets.token_hex(3)}"
        owner = _claim(directory / f"{self.instance}.lock")
        if owner is None:  # pragma: no cover - a fresh random name cannot be held
            raise RuntimeError("could not lock a fresh spool instance")
        self._owner = owner
        self.lock = threading.Lock()
        self.seq = 1
        self.size = 0
        self.opened_at = time.monotonic()
        self._fd = self._open(self.seq)

    def path(self, seq: int, instance: str | None = None) -> Path:
        return self.directory / f"{instance or self.instance}-{seq:08d}.jsonl"

    def _open(self, seq: int) -> int:
        return os.open(self.path(seq), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def append(self, line: bytes) -> int:
        """Append one line to the active segment; the caller holds ``self.lock``."""
        os.write(self._fd, line)
        self.size += len(line)
        return self.seq

    def rotate(self) -> int | None:
        """Close the active segment (if it holds anything) and return its number."""
        with self.lock:
            if self.size == 0:
                return None
            os.close(self._fd)
            closed = self.seq
            self.seq += 1
            self._fd = self._open(self.seq)
            self.size = 0
            self.opened_at = time.monotonic()
            return closed

    def discard(self, seq: int) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(seq).unlink()

    def orphans(self) -> list[tuple[int, Path, list[Path]]]:
        """Segments of processes that are gone, each group with its claimed lock."""
        groups: dict[str, list[Path]] = {}
        for path in self.directory.glob("*.jsonl"):
            instance = path.stem.rsplit("-", 1)[0]
            if instance != self.instance:
                groups.setdefault(instance, []).append(path)
        found = []
        for instance, paths in groups.items():
            lock_path = self.directory / f"{instance}.lock"
            fd = _claim(lock_path)
            if fd is not None:
                found.append((fd, lock_path, sorted(paths)))
        return found

    def pending_bytes(self) -> int:
        total = 0
        for entry in os.scandir(self.directory):
            if entry.name.endswith(".jsonl"):
                with contextlib.suppress(FileNotFoundError):
                    total += entry.stat().st_size
        return total

    def close(self) -> None:
        with self.lock:
            os.close(self._fd)
            if self.size == 0:
                self.discard(self.seq)
        _release(self._owner, self.directory / f"{self.instance}.lock")


def _claim(lock_path: Path) -> int | None:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _release(fd: int, lock_path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        lock_path.unlink()
    os.close(fd)


def read_segment(path: Path) -> Iterator[dict[str, Any]]:
    """Records in a spool segment; a torn last line (crash mid-write) is skipped."""
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                log.warning("spool line unreadable, skipped", path=str(path), line=number)
                continue
            if isinstance(record, dict) and "id" in record:
                yield record


class Capture:
    """The request path's handle on storage: ``submit()`` is all it calls."""

    def __init__(
        self, store: Store, spool_dir: Path, settings: CaptureSettings, redactor: Redactor
    ) -> None:
        self.store = store
        self.settings = settings
        self.redactor = redactor
        self.spool = Spool(spool_dir)
        self.queue: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue(settings.queue_size)
        self.dirty: set[int] = set()
        self.db_ok = True
        self.stored = 0
        self.write_errors = 0
        self.spool_errors = 0
        self._closed: list[int] = []
        self._orphans: list[tuple[int, Path, list[Path]]] = []
        self._last_seq = 0
        self._backoff = 0.25
        self._next_try = 0.0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distillery-writer", daemon=True)

    def start(self) -> None:
        self._orphans = self.spool.orphans()
        self._thread.start()

    def submit(self, record: dict[str, Any]) -> str:
        """Redact, spool and enqueue one record; returns ``"queued"`` or ``"spooled"``."""
        redact = self.redactor
        for key in ("request", "response", "error", "metadata"):
            if record.get(key) is not None:
                record[key] = redact(record[key])
        line = orjson.dumps(record) + b"\n"
        with self.spool.lock:
            try:
                seq = self.spool.append(line)
            except OSError as exc:
                # Disk full or similar: keep serving, keep the record in memory.
                self.spool_errors += 1
                log.error("spool write failed", error=str(exc))
                seq = self.spool.seq
            try:
                self.queue.put_nowait((seq, record))
            except queue.Full:
                self.dirty.add(seq)
                return "spooled"
        return "queued"

    def health(self) -> dict[str, Any]:
        return {
            "database": "ok" if self.db_ok else "unavailable",
            "queue_depth": self.queue.qsize(),
            "spool_bytes": self.spool.pending_bytes(),
            "spool_dirty_segments": len(self.dirty) + sum(len(g[2]) for g in self._orphans),
            "stored": self.stored,
            "write_errors": self.write_errors,
        }

    def close(self, timeout: float = 30.0) -> None:
        """Flush everything queued, then release the spool (pending segments stay on disk)."""
        self._stopping.set()
        self._thread.join(timeout)

    # -- the writer thread ---------------------------------------------------

    def _run(self) -> None:
        try:
            while not (self._stopping.is_set() and self.queue.empty()):
                batch = self._take_batch()
                if batch:
                    self._write(batch)
                self._maintain()
            self._rotate()
            self._next_try = 0.0  # one last try, whatever the backoff says
            self._maintain()
        except Exception:  # pragma: no cover - a bug; the spool still holds every record
            log.exception("capture writer crashed")
        finally:
            for fd, _lock_path, _ in self._orphans:
                os.close(fd)
            self.spool.close()
            if self._closed or self.dirty:
                log.warning(
                    "records left in the spool; they are replayed at next start",
                    spool=str(self.spool.directory),
                )

    def _take_batch(self) -> list[tuple[int, dict[str, Any]]]:
        """Up to ``batch_size`` records, after sleeping ``flush_interval`` unless one is full.

        Sleeping instead of waking on every record keeps the writer off the GIL
        between batches; the event loop on the request path would feel every
        wake-up as added latency.
        """
        if self.queue.qsize() < self.settings.batch_size:
            self._stopping.wait(self.settings.flush_interval)
        batch: list[tuple[int, dict[str, Any]]] = []
        with contextlib.suppress(queue.Empty):
            while len(batch) < self.settings.batch_size:
                batch.append(self.queue.get_nowait())
        return batch

    def _write(self, batch: list[tuple[int, dict[str, Any]]]) -> None:
        seqs = {seq for seq, _ in batch}
        self._last_seq = max(seqs)
        if not self.db_ok and time.monotonic() < self._next_try:
            self._mark_dirty(seqs)
            return
        try:
            self.store.insert(record for _, record in batch)
        except Exception as exc:
            self._failed(exc)
            self._mark_dirty(seqs)
            return
        self._ok()
        self.stored += len(batch)

    def _mark_dirty(self, seqs: set[int]) -> None:
        with self.spool.lock:
            self.dirty.update(seqs)

    def _failed(self, exc: Exception) -> None:
        self.write_errors += 1
        if self.db_ok:
            log.error("database write failed; spooling until it is back", error=str(exc))
        self.db_ok = False
        self._next_try = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    def _ok(self) -> None:
        if not self.db_ok:
            log.info("database is back; replaying the spool")
        self.db_ok = True
        self._backoff = 0.25

    def _database_reachable(self) -> bool:
        if self.db_ok:
            return True
        if time.monotonic() < self._next_try:
            return False
        try:
            self.store.ping()
        except Exception as exc:
            self._failed(exc)
            return False
        self._ok()
        return True

    def _rotate(self) -> None:
        closed = self.spool.rotate()
        if closed is not None:
            self._closed.append(closed)

    def _maintain(self) -> None:
        spool = self.spool
        if spool.size and (
            spool.size >= ROTATE_BYTES
            or time.monotonic() - spool.opened_at >= ROTATE_SECONDS
            or spool.seq in self.dirty
        ):
            self._rotate()
        # Every record of a closed segment has been through _write once the
        # writer has moved past it or the queue is empty (FIFO, and rotation
        # happens under the lock that submit() appends and enqueues under).
        drained = self.queue.empty()
        for seq in list(self._closed):
            if not (drained or seq < self._last_seq):
                break
            if seq in self.dirty:
                if not self._database_reachable() or not self._replay([spool.path(seq)]):
                    break
                with spool.lock:
                    self.dirty.discard(seq)
            spool.discard(seq)
            self._closed.remove(seq)
        while self._orphans and self._database_reachable():
            fd, lock_path, paths = self._orphans[0]
            if not self._replay(paths):
                break
            for path in paths:
                path.unlink(missing_ok=True)
            _release(fd, lock_path)
            self._orphans.pop(0)

    def _replay(self, paths: list[Path]) -> bool:
        """Insert every record of these segments; True when all are in the database."""
        replayed = 0
        try:
            for path in paths:
                batch: list[dict[str, Any]] = []
                for record in read_segment(path):
                    batch.append(record)
                    if len(batch) >= self.settings.batch_size:
                        self.store.insert(batch)
                        replayed += len(batch)
                        batch = []
                self.store.insert(batch)
                replayed += len(batch)
        except Exception as exc:
            self._failed(exc)
            return False
        if replayed:
            log.info("spool replayed", records=replayed, segments=len(paths))
        return True
