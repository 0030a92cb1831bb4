"""The capture writer: spool segments into the database, in a process of its own.

The request path only appends redacted records to the spool (``spool.py``); every
database write happens here, so inserts, the daily aggregates, repairs and retries
never take the proxy's interpreter.  The proxy starts one writer process (with
``--workers N`` the supervisor starts one for all of them) and starts it again when
it dies; a writer that finds another one holding ``writer.lock`` in the spool waits
as its stand-in.  In tests a writer runs as a thread of the proxy.

Every round it follows each instance's segments from where it stopped and inserts the
new whole lines in batches with ``INSERT ... ON CONFLICT DO NOTHING`` keyed by the
record id minted on the request path, so a record read twice (a writer killed
between insert and delete starts again from the segment's start) is stored once.  A
closed segment (``spool.py``) is deleted once every record in it is stored.

* The database down or locked: nothing advances; the writer backs off (up to 5 s)
  and the segments wait on disk.
* A batch the database *refuses* (``store/repair.py``) is split until the refused
  records are found; each is repaired and stored, or written to the dead-letter file
  (``<data dir>/dead-letter/``) with the reason.  A dead-letter file that cannot be
  written holds the record back: its segment stays and is read again every 5 s.
* The proxy gone (``kill -9``): its instance's lock is free, so its segments are
  closed; they are stored and deleted like any other.  A writer whose proxy died
  stores what it can and exits.

What the writer knows (database reachable, records stored, repaired, dead-lettered)
goes to ``writer.json`` in the spool twice a second, where ``/healthz`` and
``/metrics`` read it; its counters carry on across writer restarts.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

import structlog

from distillery.core.config import CaptureSettings, Settings
from distillery.core.records import Record, RecordError
from distillery.proxy import spool
from distillery.store import Store, dead_letters
from distillery.store.records import CaptureRecord
from distillery.store.repair import RecordRefused, repair

log = structlog.get_logger()

MAX_BACKOFF = 5.0
DEAD_LETTER_RETRY_S = 5.0  # how often a held-back record tries its dead-letter file again
STATUS_FILE = "writer.json"
LOCK_FILE = "writer.lock"
STATUS_EVERY_S = 0.5
STALE_AFTER_S = 5.0  # a status older than this: no writer is running


class WriterStatus(Record):
    """What the writer last said about itself (``writer.json`` in the spool)."""

    pid: int
    updated_at: float
    database_ok: bool
    pending_segments: int = 0
    held_back: int = 0
    dead_letter_error: str | None = None
    stored: int = 0
    write_errors: int = 0
    repaired: int = 0
    dead_lettered: int = 0

    @classmethod
    def of(cls, directory: Path) -> WriterStatus | None:
        """The status in ``directory``, or ``None`` when there is none (yet) to read."""
        try:
            return cls.read(directory / STATUS_FILE)
        except RecordError:
            return None

    def fresh(self) -> bool:
        return time.time() - self.updated_at < STALE_AFTER_S


@dataclass
class _Segment:
    offset: int = 0
    complete: bool = True  # every record read so far is stored (or dead-lettered)


COUNTERS = ("stored", "write_errors", "repaired", "dead_lettered")


class Stop(Protocol):
    """A ``threading.Event``, or, in the writer process, :class:`_Told`."""

    def is_set(self) -> bool: ...
    def wait(self, timeout: float | None = None) -> bool: ...


class _Told:
    """Set once the proxy closes its end of a pipe.  Not a ``multiprocessing.Event``: a
    writer killed inside ``Event.wait`` (it waits there between rounds) leaves the event's
    lock taken, and the proxy's ``set()`` then waits for ever at its stop."""

    def __init__(self, pipe: Connection) -> None:
        self.pipe = pipe
        self.told = False

    def is_set(self) -> bool:
        return self.wait(0)

    def wait(self, timeout: float | None = None) -> bool:
        self.told = self.told or self.pipe.poll(timeout)
        return self.told


class Writer:
    """Moves records from the spool in ``directory`` into ``store``."""

    def __init__(self, store: Store, directory: Path, settings: CaptureSettings) -> None:
        self.store = store
        self.directory = directory
        self.settings = settings
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.dead_letter_dir = directory.parent / "dead-letter"
        self.name = f"writer-{os.getpid()}"
        # Not known until the first look (a store not yet migrated is asked first).
        self.db_ok = store.migrated
        self._said_down = False
        self.stored = self.write_errors = self.repaired = self.dead_lettered = 0
        previous = WriterStatus.of(directory)
        if previous is not None:  # counters carry on: Prometheus sees no reset
            for name in COUNTERS:
                setattr(self, name, getattr(previous, name))
        self.held_back: set[str] = set()
        self.dead_letter_error: str | None = None
        self._dead_letter_retry_at = 0.0
        self._segments: dict[str, _Segment] = {}
        self._dead: dict[str, int] = {}  # instances whose process is gone: their claimed locks
        self._pending = 0
        self._backoff = 0.25
        self._next_try = 0.0
        self._status_at = 0.0
        self._said: tuple[Any, ...] = ()

    # -- one round -------------------------------------------------------------

    def step(self) -> bool:
        """Store what the spool holds now; True when every record in it is stored."""
        groups = spool.segments(self.directory)
        if not self._database_reachable():
            self._pending = sum(len(paths) for paths in groups.values())
            return False
        pending = 0
        for instance, paths in groups.items():
            alive = instance not in self._dead and self._alive(instance)
            for index, path in enumerate(paths):
                if not self._follow(path, closed=not alive or index < len(paths) - 1):
                    pending += 1
                    if not self.db_ok:  # the rest waits too
                        self._pending = sum(len(paths) for paths in groups.values())
                        return False
            if not alive and not any(path.exists() for path in paths):
                spool.release(self._dead.pop(instance), self.directory / f"{instance}.lock")
        self._pending = pending
        return pending == 0

    def _alive(self, instance: str) -> bool:
        """Whether ``instance``'s process still appends; a dead one's lock is now ours."""
        fd = spool.claim(self.directory / f"{instance}.lock")
        if fd is None:
            return True
        self._dead[instance] = fd
        return False

    def _follow(self, path: Path, closed: bool) -> bool:
        """Store the new lines of one segment (deleted once closed and stored); whether
        every record in it is stored now (False: the database is down, a record is held
        back)."""
        state = self._segments.setdefault(path.name, _Segment())
        if not state.complete and time.monotonic() >= self._dead_letter_retry_at:
            # A record in it was held back: read it again from the start (what is stored
            # already is keyed by id), whether or not the proxy still appends to it.
            state = self._segments[path.name] = _Segment()
        try:
            lines = spool.read_lines(path, state.offset, closed)
        except FileNotFoundError:
            self._segments.pop(path.name, None)
            return True
        except OSError as exc:
            self._failed(exc)
            return False
        for start in range(0, len(lines.records), self.settings.batch_size):
            stored = self._store(lines.records[start : start + self.settings.batch_size])
            if not self.db_ok:
                return False  # from this segment's offset again, once it is back
            if not stored:
                state.complete = False
        state.offset = lines.offset
        if not state.complete:
            return False
        if closed:
            path.unlink(missing_ok=True)
            self._segments.pop(path.name, None)
        return True

    # -- inserting -------------------------------------------------------------

    def _store(self, records: list[CaptureRecord]) -> bool:
        """Insert ``records``; False when the database is unavailable, or a refused
        record could not be dead-lettered.  A batch the database refuses is split until
        each refused record is found, so one bad record never holds back the rest."""
        try:
            self._count("stored", self.store.insert(records))  # new ones: a re-read counts 0
            self._ok()
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
            return False
        right = self._store(records[middle:])
        return left and right

    def _store_refused(self, record: CaptureRecord, refusal: RecordRefused) -> bool:
        """Repair a refused record and store it, or move it to the dead-letter file."""
        try:
            fixed, changes = repair(record)
            new = self.store.insert([fixed])
        except RecordRefused as exc:
            return self._dead_letter(record, f"{refusal}; after repair: {exc}")
        except Exception as exc:
            self._failed(exc)
            return False
        self._count("repaired", new)
        self._count("stored", new)
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
        try:
            path = dead_letters.append(self.dead_letter_dir, self.name, record, reason)
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

    def _count(self, name: str, count: int = 1) -> None:
        setattr(self, name, getattr(self, name) + count)

    def _failed(self, exc: Exception) -> None:
        self._count("write_errors")
        if not self._said_down:
            log.error("database write failed; spooling until it is back", error=str(exc))
            self._said_down = True
        self.db_ok = False
        self._next_try = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, MAX_BACKOFF)

    def _ok(self) -> None:
        if self._said_down:
            log.info("database is back; storing the spool")
            self._said_down = False
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

    # -- what it says ----------------------------------------------------------

    def status(self) -> WriterStatus:
        return WriterStatus(
            pid=os.getpid(),
            updated_at=time.time(),
            database_ok=self.db_ok,
            pending_segments=self._pending,
            held_back=len(self.held_back),
            dead_letter_error=self.dead_letter_error,
            **{name: getattr(self, name) for name in COUNTERS},
        )

    def publish(self, force: bool = False) -> None:
        """Write ``writer.json`` when something changed, and twice a second anyway."""
        status = self.status()
        said = (status.database_ok, status.pending_segments, status.held_back)
        said += tuple(getattr(status, name) for name in COUNTERS)
        now = time.monotonic()
        if not force and said == self._said and now < self._status_at:
            return
        self._said, self._status_at = said, now + STATUS_EVERY_S
        try:
            status.write(self.directory / STATUS_FILE, private=True)
        except OSError as exc:  # a full disk: said on /healthz by the spool's own state
            log.debug("cannot write the writer's status", error=str(exc))

    # -- running ---------------------------------------------------------------

    def run(self, stop: Stop, orphaned: Callable[[], bool] = lambda: False) -> None:
        """Rounds every ``flush_interval`` until ``stop``; then one last pass over what
        is left (the proxy closed its spool first) for up to ``drain_s``."""
        while not stop.is_set() and not orphaned():
            self._round()
            stop.wait(self.settings.flush_interval)
        self.drain()

    def drain(self, seconds: float = 30.0) -> None:
        """Store what is left, until the spool is empty, the database is down or time is up."""
        deadline = time.monotonic() + seconds
        self._next_try = 0.0  # one last try, whatever the backoff says
        while time.monotonic() < deadline:
            if self._round() or not self.db_ok or self.held_back:
                break
        self.publish(force=True)
        for fd in self._dead.values():
            os.close(fd)  # left for the next writer (the lock file stays)
        self._dead.clear()
        if any(spool.segments(self.directory).values()):
            log.warning("records left in the spool; the next writer stores them")

    def _round(self) -> bool:
        try:
            return self.step()
        except Exception:  # pragma: no cover - a bug; the spool still holds every record
            log.exception("capture writer error; retrying")
            time.sleep(0.5)
            return False
        finally:
            self.publish()


class WriterThread:
    """A writer as a thread of this process (tests, and ``make_app`` given a store)."""

    def __init__(self, writer: Writer) -> None:
        self.writer = writer
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=writer.run, args=(self._stop,), name="distillery-writer", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)


# -- the process ---------------------------------------------------------------


def _main(settings: Settings, logging: dict[str, Any], parent: int, pipe: Connection) -> None:
    """A writer process: stand by until ``writer.lock`` is free, then write until ``stop``
    is set or the proxy that started it is gone."""
    from distillery.core import logs
    from distillery.store.db import create_engine

    logs.configure(**logging)
    # A stop for the whole group (Ctrl-C, systemd's SIGTERM to every process of the unit) is
    # the proxy's to act on: it finishes its calls, closes its spool, then says stop.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    directory = spool_dir(settings)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    stop = _Told(pipe)

    def orphaned() -> bool:
        return os.getppid() != parent

    lock = None
    while lock is None:
        lock = spool.claim(directory / LOCK_FILE)
        if lock is None and (stop.wait(0.5) or orphaned()):
            return
    # Not migrated here: the proxy did at its start, or the store does at its first insert
    # (a database down now must not keep the writer from saying so).
    store = Store(create_engine(settings.storage.resolved_database_url()))
    try:
        Writer(store, directory, settings.capture).run(stop, orphaned)
    finally:
        store.close()
        os.close(lock)


def spool_dir(settings: Settings) -> Path:
    return Path(settings.storage.resolved_data_dir()) / "spool"


class WriterProcess:
    """The writer process a proxy (or the supervisor of its workers) starts, watches and
    starts again when it dies."""

    def __init__(self, settings: Settings, logging: dict[str, Any]) -> None:
        self.settings = settings
        self.logging = logging
        self._context = multiprocessing.get_context("spawn")
        self.process: Any = None
        self._stop: Any = None

    def start(self) -> None:
        # A pipe, not a signal: the writer ignores the group's signals (see _main), and one
        # still starting would die of a signal before it could ignore it.
        if self._stop is not None:
            self._stop.close()  # the last writer's, dead
        told, self._stop = self._context.Pipe(duplex=False)
        self.process = self._context.Process(
            target=_main,
            args=(self.settings, self.logging, os.getpid(), told),
            name="distillery-writer",
            daemon=False,
        )
        self.process.start()
        told.close()  # the writer's end is the writer's

    def check(self) -> bool:
        """Start the writer again if it died; whether it had to be."""
        if self.process is None or self.process.exitcode is None:
            return False
        log.warning(
            "capture writer died; starting another",
            pid=self.process.pid,
            code=self.process.exitcode,
        )
        self.start()
        return True

    def stop(self, timeout: float = 35.0) -> None:
        """Ask it to store what is left and exit; killed if it takes longer than ``timeout``."""
        if self.process is None:
            return
        self.check()  # one that died just now is started again: it stores what is left
        process = self.process
        self._stop.close()  # end of file at the writer: it stores what is left and exits
        process.join(timeout)
        if process.is_alive():
            log.error("capture writer did not stop; killed (the spool keeps its records)")
            process.kill()
            process.join(5)
