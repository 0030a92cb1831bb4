"""Getting every captured call to storage without slowing the request.

The request path does the least that keeps the no-loss promise: the record is
redacted (nothing unredacted is ever written to disk), serialised once and appended
to this process's spool segment (``spool.py``: one ``os.write`` on an ``O_APPEND``
file) *before* the last bytes of the response go to the client.  The page cache
survives ``kill -9``, so any response a client has fully received is on disk.
Everything else -- inserts, the daily aggregates, repairs, dead letters, retries --
is the writer's (``writer.py``), which runs in a process of its own and reads the
spool: the proxy's interpreter never waits on the database.

When the spool itself cannot be written (disk full), the record waits in a bounded
memory buffer (``capture.memory_buffer_mb``) and goes back to the spool as soon as it
takes writes again (tried twice a second).  When that buffer is full too the record
is dropped -- logged at error level with its id and counted -- and the client's call
is still answered: the proxy never fails a call because it cannot record it.

Duplicates are impossible because every path into the database is keyed by the
record id minted on the request path.  What can still lose a record: losing the
disk, a machine crash before the page cache reaches it (no fsync per request), or a
full disk that outlasts the memory buffer.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import structlog

from distillery.core.config import CaptureSettings
from distillery.core.redact import Redactor
from distillery.proxy.spool import Spool, pending_bytes
from distillery.proxy.writer import STALE_AFTER_S, Writer, WriterStatus, WriterThread
from distillery.store import Store
from distillery.store.records import CaptureRecord
from distillery.store.repair import repair

log = structlog.get_logger()

SPOOL_ROOM = 1024 * 1024  # free bytes that count as "the spool can be written again"
RETRY_S = 0.5  # how often records held in memory try the spool again


class Capture:
    """The request path's handle on storage: ``submit()`` is all it calls.

    With a ``store`` the writer runs here, as a thread (tests); without one, the
    writer process started beside the proxy reads the spool (``writer.py``).
    """

    def __init__(
        self,
        store: Store | None,
        spool_dir: Path,
        settings: CaptureSettings,
        redactor: Redactor,
        database: str | None = None,
        database_ok: bool = True,
    ) -> None:
        self.settings = settings
        self.redactor = redactor
        self.directory = spool_dir
        self.spool = Spool(spool_dir)
        self.writer = WriterThread(Writer(store, spool_dir, settings)) if store else None
        self.database = database or (store.url if store is not None else None)
        self.database_ok_at_start = database_ok
        self.started_at = time.monotonic()
        # Records no spool segment holds (the disk refused the write), in order, with
        # their line; guarded by _lock.  Bounded by memory_buffer_mb.
        self.unspooled: dict[str, bytes] = {}
        self.unspooled_bytes = 0
        self._lock = threading.Lock()
        self.spool_error: str | None = None
        self.spool_write_errors = 0
        self.dropped = 0
        self.repaired = 0
        self._retrying = threading.Event()
        self._retry_thread = threading.Thread(
            target=self._retry, name="distillery-spool-retry", daemon=True
        )
        # Where counts and the buffer's level go besides this object (the app's metrics).
        self.on_event: Callable[[str, int], None] = lambda _name, _count: None
        self.on_buffered: Callable[[int], None] = lambda _count: None

    def _count(self, name: str, count: int = 1) -> None:
        setattr(self, name, getattr(self, name) + count)
        self.on_event(name, count)

    def start(self) -> None:
        if self.writer is not None:
            self.writer.start()
        self._retry_thread.start()

    def submit(self, record: CaptureRecord) -> str:
        """Redact and spool one record; never raises.

        Returns the outcome: ``spooled``; ``buffered`` (the spool write failed, the
        record waits in memory); ``dropped`` (that memory buffer is full too).
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
        if self.unspooled:  # in order: the spool takes nothing new before them
            return self._hold(record["id"], line, None)
        try:
            self.spool.append(line)
        except OSError as exc:
            return self._hold(record["id"], line, exc)
        if self.spool_error is not None:
            self.spool_error = None
        return "spooled"

    def _hold(self, record_id: str, line: bytes, exc: OSError | None) -> str:
        """Keep a line the spool refused in memory, if there is room."""
        if exc is not None:
            self._count("spool_write_errors")
            if self.spool_error is None:
                log.error("spool write failed; holding records in memory", error=str(exc))
            self.spool_error = str(exc)
        with self._lock:
            if self.unspooled_bytes + len(line) > self.settings.memory_buffer_mb * 1024 * 1024:
                self._count("dropped")
                log.error(
                    "capture dropped: spool unwritable and memory buffer full",
                    record_id=record_id,
                    buffered=len(self.unspooled),
                )
                return "dropped"
            self.unspooled[record_id] = line
            self.unspooled_bytes += len(line)
        return "buffered"

    def _retry(self) -> None:
        """Records held in memory go back to the spool once its disk takes writes."""
        while not self._retrying.wait(RETRY_S):
            self.flush_memory()
            self.on_buffered(len(self.unspooled))

    def flush_memory(self) -> None:
        if not self.unspooled:
            if self.spool_error is not None and self._room():
                self.spool_error = None
                log.info("spool writable again")
            return
        with self._lock:
            for record_id, line in list(self.unspooled.items()):
                try:
                    self.spool.append(line)
                except OSError:
                    return
                del self.unspooled[record_id]
                self.unspooled_bytes -= len(line)
        self.spool_error = None
        log.info("spool writable again; records held in memory spooled")

    def _room(self) -> bool:
        try:
            stats = os.statvfs(self.directory)
        except OSError:
            return False
        return stats.f_bavail * stats.f_frsize >= SPOOL_ROOM

    def writer_status(self) -> WriterStatus | None:
        return WriterStatus.of(self.directory)

    def health(self) -> dict[str, Any]:
        status = self.writer_status()
        running = status is not None and status.fresh()
        # A writer process takes a second or two to start: not yet a problem.
        starting = not running and time.monotonic() - self.started_at < STALE_AFTER_S
        if running and status is not None:
            database = "ok" if status.database_ok else "unavailable"
        else:  # what this process found at its start, until the writer says
            database = "unknown" if self.database_ok_at_start else "unavailable"
        problems = []
        if not running and not starting:
            problems.append("capture writer not running: records wait in the spool")
        if database == "unavailable":
            problems.append("database unavailable: records wait in the spool")
        if self.spool_error is not None:
            problems.append(f"spool not writable ({self.spool_error}): records wait in memory")
        if status is not None and status.held_back:
            problems.append(
                f"dead-letter file not writable ({status.dead_letter_error}): "
                f"{status.held_back} refused records held back in the spool"
            )
        return {
            "database": database,
            "writer": "running" if running else ("starting" if starting else "not running"),
            "writer_pid": status.pid if status is not None and running else None,
            "spool": "ok" if self.spool_error is None else "failing",
            "problems": problems,
            "spool_bytes": pending_bytes(self.directory),
            "spool_dirty_segments": status.pending_segments if status else 0,
            "memory_buffered": len(self.unspooled),
            "stored": status.stored if status else 0,
            "write_errors": status.write_errors if status else 0,
            "spool_write_errors": self.spool_write_errors,
            "repaired": self.repaired + (status.repaired if status else 0),
            "dead_lettered": status.dead_lettered if status else 0,
            "held_back": status.held_back if status else 0,
            "dropped": self.dropped,
        }

    def close(self, timeout: float = 30.0) -> None:
        """Stop spooling; the writer (here, or the process) stores what is left."""
        self._retrying.set()
        with contextlib.suppress(RuntimeError):
            self._retry_thread.join(timeout)
        self.flush_memory()
        self.spool.close()
        if self.writer is not None:
            self.writer.stop(timeout)
        if self.unspooled:
            log.error(
                "records lost at shutdown: the spool could not take them",
                record_ids=list(self.unspooled)[:100],
                count=len(self.unspooled),
            )
