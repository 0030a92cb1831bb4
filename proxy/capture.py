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
* A batch the database *refuses* (as opposed to a database that is down; see
  ``store/repair.py``) is split until the refused records are found; each is
  repaired and stored, or, if even that is refused, written to a dead-letter
  file (``<data dir>/dead-letter/``) with the reason.  A bad record never
  holds back the ones after it.
* When the spool itself cannot be written (disk full), the record waits in a
  bounded memory buffer (``capture.memory_buffer_mb``) and goes to the
  database, or back to the spool, as soon as either takes it.  When that
  buffer is full too the record is dropped -- logged at error level with its
  id and counted -- and the client's call is still answered: the proxy never
  fails a call because it cannot record it.

Duplicates are impossible because every path into the database is keyed by the
record id minted on the request path.  What can still lose a record: losing
the disk, a machine crash before the page cache reaches it (no fsync per
request), or a full disk that outlasts the memory buffer.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import orjson
import structlog

from distillery.core.config import CaptureSettings
from distillery.core.redact import Redactor
from distillery.store import Store, dead_letters
from distillery.store.records import CaptureRecord
from distillery.store.repair import RecordRefused, repair

log = structlog.get_logger()

ROTATE_BYTES = 8 * 1024 * 1024
ROTATE_SECONDS = 1.0
MAX_BACKOFF = 5.0
DEAD_LETTER_RETRY_S = 5.0  # how often a held-back record tries its dead-letter file again
SPOOL_ROOM = 1024 * 1024  # free bytes that count as "the spool can be written again"


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
        """Append one line to the active segment; the caller holds ``self.lock``.

        A write the disk could only partly take (it filled up) is cut off again,
        so the segment never holds half a line that would swallow the next one.
        """
        try:
            written = os.write(self._fd, line)
        except OSError:
            self._truncate()
            raise
        if written != len(line):
            self._truncate()
            raise OSError(errno.ENOSPC, f"short spool write ({written} of {len(line)} bytes)")
        self.size += written
        return self.seq

    def _truncate(self) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self.size)

    def rotate(self) -> int | None:
        """Close the active segment (if it holds anything) and return its number.

        When no new segment can be created (disk full), the active one stays open.
        """
        with self.lock:
            if self.size == 0:
                return None
            try:
                fd = self._open(self.seq + 1)
            except OSError as exc:
                log.warning("cannot start a new spool segment", error=str(exc))
                return None
            os.close(self._fd)
            closed = self.seq
            self.seq += 1
            self._fd = fd
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


def read_segment(path: Path) -> Iterator[CaptureRecord]:
    """Records in a spool segment; a torn last line (crash mid-write) is skipped."""
    with path.open("rb") as handle:
        for number, line in enumerate(handle, 1):
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                log.warning("spool line unreadable, skipped", path=str(path), line=number)
                continue
            if isinstance(record, dict) and "id" in record:
                # Checked where it is inserted: a record that is not one is dead-lettered.
                yield cast(CaptureRecord, record)


class Capture:
    """The request path's handle on storage: ``submit()`` is all it calls."""

    def __init__(
        self, store: Store, spool_dir: Path, settings: CaptureSettings, redactor: Redactor
    ) -> None:
        self.store = store
        self.settings = settings
        self.redactor = redactor
        self.spool = Spool(spool_dir)
        self.dead_letter_dir = spool_dir.parent / "dead-letter"
        self.queue: queue.Queue[tuple[int, CaptureRecord]] = queue.Queue(settings.queue_size)
        self.dirty: set[int] = set()
        # Records no spool segment holds (the disk refused the write), by id,
        # with their size; guarded by spool.lock.  Bounded by memory_buffer_mb.
        self.unspooled: dict[str, tuple[CaptureRecord, int]] = {}
        self.unspooled_bytes = 0
        # A store the proxy could not migrate at start had no database: said so on /healthz
        # until the writer reaches it.
        self.db_ok = store.migrated
        # Refused records whose dead-letter write failed: they wait in the spool.
        self.held_back: set[str] = set()
        self.dead_letter_error: str | None = None
        self._dead_letter_retry_at = 0.0
        self.spool_error: str | None = None
        self.stored = 0
        self.write_errors = 0
        self.spool_write_errors = 0
        self.dropped = 0
        self.repaired = 0
        self.dead_lettered = 0
        self._closed: list[int] = []
        self._orphans: list[tuple[int, Path, list[Path]]] = []
        self._last_seq = 0
        self._backoff = 0.25
        self._next_try = 0.0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="distillery-writer", daemon=True)
        # Where counts and levels go besides this object's attributes (the app's metrics).
        self.on_event: Callable[[str, int], None] = lambda _name, _count: None
        self.on_levels: Callable[[int, int, int], None] = lambda _q, _s, _m: None
        self._levels_at = 0.0

    def _count(self, name: str, count: int = 1) -> None:
        setattr(self, name, getattr(self, name) + count)
        self.on_event(name, count)

    def start(self) -> None:
        self._orphans = self.spool.orphans()
        self._thread.start()

    def submit(self, record: CaptureRecord) -> str:
        """Redact, spool and enqueue one record; never raises.

        Returns the outcome: ``queued``; ``spooled`` (queue full, the writer
        replays it from disk); ``buffered`` (the spool write failed, the record
        waits in memory); ``dropped`` (that memory buffer is full too).
        """
        redact = self.redactor
        record["request"] = redact(record["request"])
        if record["response"] is not None:
            record["response"] = redact(record["response"])
        if record["error"] is not None:
            record["error"] = redact(record["error"])
        record["metadata"] = redact(record["metadata"])
        try:
            line = orjson.dumps(record) + b"\n"
        except (orjson.JSONEncodeError, TypeError):
            # JSON nested deeper than orjson writes: keep that part as text.
            record, changes = repair(record)
            line = orjson.dumps(record) + b"\n"
            self._count("repaired")
            log.warning("capture record repaired", record_id=record["id"], changes=changes)
        with self.spool.lock:
            try:
                seq = self.spool.append(line)
            except OSError as exc:
                return self._hold(record, len(line), exc)
            self.spool_error = None
            try:
                self.queue.put_nowait((seq, record))
            except queue.Full:
                self.dirty.add(seq)
                return "spooled"
        return "queued"

    def _hold(self, record: CaptureRecord, size: int, exc: OSError) -> str:
        """Keep a record the spool refused in memory, if there is room (spool.lock held)."""
        self._count("spool_write_errors")
        if self.spool_error is None:
            log.error("spool write failed; holding records in memory", error=str(exc))
        self.spool_error = str(exc)
        if self.unspooled_bytes + size > self.settings.memory_buffer_mb * 1024 * 1024:
            self._count("dropped")
            log.error(
                "capture dropped: spool unwritable and memory buffer full",
                record_id=record["id"],
                buffered=len(self.unspooled),
            )
            return "dropped"
        self.unspooled[record["id"]] = (record, size)
        self.unspooled_bytes += size
        with contextlib.suppress(queue.Full):
            self.queue.put_nowait((0, record))
        return "buffered"

    def health(self) -> dict[str, Any]:
        problems = []
        if not self.db_ok:
            problems.append("database unavailable: records wait in the spool")
        if self.spool_error is not None:
            problems.append(f"spool not writable ({self.spool_error}): records wait in memory")
        if self.held_back:
            problems.append(
                f"dead-letter file not writable ({self.dead_letter_error}): "
                f"{len(self.held_back)} refused records held back in the spool"
            )
        return {
            "database": "ok" if self.db_ok else "unavailable",
            "spool": "ok" if self.spool_error is None else "failing",
            "problems": problems,
            "queue_depth": self.queue.qsize(),
            "spool_bytes": self.spool.pending_bytes(),
            "spool_dirty_segments": len(self.dirty) + sum(len(g[2]) for g in self._orphans),
            "memory_buffered": len(self.unspooled),
            "stored": self.stored,
            "write_errors": self.write_errors,
            "spool_write_errors": self.spool_write_errors,
            "repaired": self.repaired,
            "dead_lettered": self.dead_lettered,
            "held_back": len(self.held_back),
            "dropped": self.dropped,
        }

    def close(self, timeout: float = 30.0) -> None:
        """Flush everything queued, then release the spool (pending segments stay on disk)."""
        self._stopping.set()
        self._thread.join(timeout)

    # -- the writer thread ---------------------------------------------------

    def _run(self) -> None:
        try:
            while not (self._stopping.is_set() and self.queue.empty()):
                self._step()
            self._rotate()
            self._next_try = 0.0  # one last try, whatever the backoff says
            self._step(final=True)
        finally:
            for fd, _lock_path, _ in self._orphans:
                os.close(fd)
            self.spool.close()
            if self._closed or self.dirty:
                log.warning(
                    "records left in the spool; they are replayed at next start",
                    spool=str(self.spool.directory),
                )
            if self.unspooled:
                log.error(
                    "records lost at shutdown: neither the spool nor the database took them",
                    record_ids=list(self.unspooled)[:100],
                    count=len(self.unspooled),
                )

    def _step(self, final: bool = False) -> None:
        """One round of the writer; a bug here is logged and the writer goes on."""
        try:
            if not final:
                batch = self._take_batch()
                if batch:
                    self._write(batch)
            self._maintain()
            if time.monotonic() >= self._levels_at:  # metrics' gauges, twice a second
                self._levels_at = time.monotonic() + 0.5
                self.on_levels(self.queue.qsize(), self.spool.pending_bytes(), len(self.unspooled))
        except Exception:  # pragma: no cover - a bug; the spool still holds every record
            log.exception("capture writer error; retrying")
            self._stopping.wait(0.5)

    def _take_batch(self) -> list[tuple[int, CaptureRecord]]:
        """Up to ``batch_size`` records, after sleeping ``flush_interval`` unless one is full.

        Sleeping instead of waking on every record keeps the writer off the GIL
        between batches; the event loop on the request path would feel every
        wake-up as added latency.
        """
        if self.queue.qsize() < self.settings.batch_size:
            self._stopping.wait(self.settings.flush_interval)
        batch: list[tuple[int, CaptureRecord]] = []
        with contextlib.suppress(queue.Empty):
            while len(batch) < self.settings.batch_size:
                batch.append(self.queue.get_nowait())
        return batch

    def _write(self, batch: list[tuple[int, CaptureRecord]]) -> None:
        seqs = {seq for seq, _ in batch if seq}
        self._last_seq = max(seqs, default=self._last_seq)
        if (self.db_ok or time.monotonic() >= self._next_try) and self._store(
            [record for _, record in batch]
        ):
            self._ok()
            spooled = sum(1 for seq, _ in batch if seq)
            self._count("stored", spooled + self._forget([r for seq, r in batch if not seq]))
            return
        self._mark_dirty(seqs)

    def _store(self, records: list[CaptureRecord]) -> bool:
        """Insert ``records``; False when the database is unavailable (they stay spooled).

        A batch the database refuses is split until each refused record is
        found, so one bad record never holds back the good ones around it.
        """
        try:
            self.store.insert(records)
            return True
        except RecordRefused as exc:
            if len(records) == 1:
                return self._store_refused(records[0], exc)
        except Exception as exc:
            self._failed(exc)
            return False
        middle = len(records) // 2
        left = self._store(records[:middle])
        if not left and not self.db_ok:
            return False  # the database went away: the rest waits in the spool too
        # A record held back (its dead-letter file unwritable) must not hold back the rest.
        right = self._store(records[middle:])
        return left and right

    def _store_refused(self, record: CaptureRecord, refusal: RecordRefused) -> bool:
        """Repair a refused record and store it, or move it to the dead-letter file."""
        try:
            fixed, changes = repair(record)
            self.store.insert([fixed])
        except RecordRefused as exc:
            return self._dead_letter(record, f"{refusal}; after repair: {exc}")
        except Exception as exc:
            self._failed(exc)
            return False
        self._count("repaired")
        log.warning(
            "capture record repaired",
            record_id=record.get("id"),
            changes=changes,
            refused=str(refusal)[:300],
        )
        return True

    def _dead_letter(self, record: CaptureRecord, reason: str) -> bool:
        """Move a record the database refuses to the dead-letter file; False (the record
        stays in the spool, held back, and /healthz says so) when that cannot be written."""
        record_id = str(record.get("id"))
        if record_id in self.held_back and time.monotonic() < self._dead_letter_retry_at:
            return False
        try:
            path = dead_letters.append(self.dead_letter_dir, self.spool.instance, record, reason)
        except OSError as exc:
            if self.dead_letter_error is None:
                log.error("cannot write the dead-letter file; record stays spooled", error=str(exc))
            self.dead_letter_error = str(exc)
            self.held_back.add(record_id)
            self._dead_letter_retry_at = time.monotonic() + DEAD_LETTER_RETRY_S
            return False
        self.held_back.discard(record_id)
        if not self.held_back:
            self.dead_letter_error = None
        self._count("dead_lettered")
        log.error(
            "capture record dead-lettered",
            record_id=record.get("id"),
            reason=reason[:300],
            file=str(path),
        )
        return True

    def _forget(self, records: list[CaptureRecord]) -> int:
        """Drop records that are now in the database from the memory buffer; how many were."""
        forgotten = 0
        if not records:
            return forgotten
        with self.spool.lock:
            for record in records:
                entry = self.unspooled.pop(record["id"], None)
                if entry is not None:
                    self.unspooled_bytes -= entry[1]
                    forgotten += 1
        return forgotten

    def _mark_dirty(self, seqs: set[int]) -> None:
        with self.spool.lock:
            self.dirty.update(seqs)

    def _failed(self, exc: Exception) -> None:
        self._count("write_errors")
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
        self._drain_memory()
        # Every record of a closed segment has been through _write once the
        # writer has moved past it or the queue is empty (FIFO, and rotation
        # happens under the lock that submit() appends and enqueues under).
        drained = self.queue.empty()
        for seq in list(self._closed):
            if not (drained or seq < self._last_seq):
                break
            if seq in self.dirty:
                if self.held_back and time.monotonic() < self._dead_letter_retry_at:
                    break  # not every 50 ms: the segment is inserted again each time
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

    def _spool_recovered(self) -> None:
        """Clear the spool's failure once its disk has room again.

        Only a write clears it on the request path, and with the database
        taking the buffered records there may be no write for a while.
        """
        if self.spool_error is None:
            return
        try:
            stats = os.statvfs(self.spool.directory)
        except OSError:
            return
        if stats.f_bavail * stats.f_frsize >= SPOOL_ROOM:
            with self.spool.lock:
                self.spool_error = None
            log.info("spool writable again")

    def _drain_memory(self) -> None:
        """Records held in memory go to the database, or back to the spool once it takes them."""
        self._spool_recovered()
        if not self.unspooled:
            return
        with self.spool.lock:
            records = [record for record, _ in self.unspooled.values()]
        if self._database_reachable():
            for start in range(0, len(records), self.settings.batch_size):
                chunk = records[start : start + self.settings.batch_size]
                if not self._store(chunk):
                    return
                self._count("stored", self._forget(chunk))
            return
        with self.spool.lock:
            for record in records:
                size = self.unspooled[record["id"]][1]
                try:
                    seq = self.spool.append(orjson.dumps(record) + b"\n")
                except OSError:
                    return
                self.spool_error = None
                self.dirty.add(seq)
                del self.unspooled[record["id"]]
                self.unspooled_bytes -= size

    def _replay(self, paths: list[Path]) -> bool:
        """Insert every record of these segments; True when all are in the database (or
        dead-lettered).  A record held back does not stop the records after it."""
        replayed = 0
        complete = True
        for path in paths:
            batch: list[CaptureRecord] = []
            try:
                for record in read_segment(path):
                    batch.append(record)
                    if len(batch) >= self.settings.batch_size:
                        complete = self._store(batch) and complete
                        if not self.db_ok:
                            return False
                        replayed += len(batch)
                        batch = []
            except OSError as exc:
                self._failed(exc)
                return False
            complete = self._store(batch) and complete
            if not self.db_ok:
                return False
            replayed += len(batch)
        if replayed and complete:
            log.info("spool replayed", records=replayed, segments=len(paths))
        return complete
