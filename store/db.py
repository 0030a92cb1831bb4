"""Opening the database, creating its schema, and the idempotent batch insert.

SQLite is the default (one file in the data dir, WAL mode so readers never
block the proxy's writer); Postgres is selected by a ``postgresql://`` URL and
driven through psycopg 3.  Both take the same code path: SQLAlchemy Core
``INSERT ... ON CONFLICT DO NOTHING`` in batches, which is what makes spool
replay safe to repeat.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from distillery.core.errors import StoreError
from distillery.core.shapes import search_text
from distillery.store import rollups, search
from distillery.store.locks import named_lock
from distillery.store.models import (
    Completion,
    CompletionTag,
    DatasetExample,
    DatasetVersion,
    EvalItem,
    EvalRun,
    EvalSample,
    FineTuneJob,
    GenerationCache,
)
from distillery.store.records import CaptureRecord, check_capture
from distillery.store.repair import RecordRefused, refused

COMPLETIONS: sa.Table = Completion.__table__  # type: ignore[attr-defined]
TAGS: sa.Table = CompletionTag.__table__  # type: ignore[attr-defined]
VERSIONS: sa.Table = DatasetVersion.__table__  # type: ignore[attr-defined]
EXAMPLES: sa.Table = DatasetExample.__table__  # type: ignore[attr-defined]
EVAL_RUNS: sa.Table = EvalRun.__table__  # type: ignore[attr-defined]
EVAL_SAMPLES: sa.Table = EvalSample.__table__  # type: ignore[attr-defined]
EVAL_ITEMS: sa.Table = EvalItem.__table__  # type: ignore[attr-defined]
CACHE: sa.Table = GenerationCache.__table__  # type: ignore[attr-defined]
FINETUNES: sa.Table = FineTuneJob.__table__  # type: ignore[attr-defined]


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def normalise_url(url: str) -> str:
    """Accept the URLs users paste (``postgres://``, ``postgresql://``) and pick psycopg 3."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def create_engine(url: str) -> Engine:
    url = normalise_url(url)
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise StoreError(
            f"Cannot parse database URL {url!r}: use sqlite:///path/to/file.db "
            "or postgresql://user@host/dbname"
        ) from None
    if parsed.get_backend_name() not in ("sqlite", "postgresql"):
        raise StoreError(
            f"Unsupported database {parsed.get_backend_name()!r} in {url!r}: "
            "use sqlite:///path/to/file.db or postgresql://user@host/dbname"
        )
    kwargs: dict[str, Any] = {"json_serializer": _json_dumps, "json_deserializer": orjson.loads}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            _private_file(Path(parsed.database))
        # sqlite3's own busy timeout (5 s unless the URL says ?timeout=...)
        # rides out a concurrent writer such as a second proxy worker.
        kwargs["connect_args"] = {"check_same_thread": False}
    elif parsed.get_backend_name() == "postgresql":
        kwargs["pool_pre_ping"] = True
        kwargs["connect_args"] = {"connect_timeout": 5}
    engine = sa.create_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        sa.event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _private_file(path: Path) -> None:
    """Create the SQLite file readable by its owner only (captured traffic is private).

    SQLite gives its -wal and -shm files the main file's permissions.  A file
    that already exists keeps the permissions it has.
    """
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the CLI read while the proxy writes; NORMAL is durable across
    # process crashes (the spool covers the rest).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def schema_revision(engine: Engine) -> str | None:
    """The alembic revision the database is at (None: no schema yet)."""
    with engine.connect() as conn:
        if not sa.inspect(conn).has_table("alembic_version"):
            return "unversioned" if sa.inspect(conn).has_table("completions") else None
        return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()


def migrate(engine: Engine) -> list[str]:
    """Bring the schema up to date; the proxy and the CLI both call this on start.

    Ordered alembic revisions live in ``store/migrations``; one migrator at a
    time (an advisory lock on Postgres, a file lock beside SQLite), and a
    database that is already current costs one query.  Returns what the
    migrations did that a user should hear of (data they repaired), for the
    caller to say where its output goes.
    """
    from distillery.store.migrations import HEAD

    if schema_revision(engine) == HEAD:
        return []
    with named_lock(engine, "migrations"):
        current = schema_revision(engine)
        if current == HEAD:
            return []
        from alembic import command

        with engine.begin() as conn:
            config = _alembic_config(conn)
            if current == "unversioned":
                # Created by the schema's first release, before migrations: that is 0001.
                command.stamp(config, "0001")
            command.upgrade(config, "head")
        notes: list[str] = config.attributes.get("notes", [])
        return notes


def _tell(notes: list[str]) -> None:
    """What a migration repaired, said through the standard library's logging: the
    proxy routes it into its log; a command with no logging set up prints it on stderr
    (logging's last resort), never on stdout where its data goes."""
    for note in notes:
        logging.getLogger("distillery.store").warning(note)


def _alembic_config(conn: Any) -> Any:
    from alembic.config import Config

    from distillery.store.migrations import LOCATION

    config = Config()
    config.set_main_option("script_location", str(LOCATION))
    config.attributes["connection"] = conn
    return config


def utc(moment: datetime) -> datetime:
    """A stored timestamp, UTC-aware (SQLite keeps no zone; every timestamp we store is UTC)."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def as_record(row: Any) -> dict[str, Any]:
    """A result row as a plain dict: str keys (column names can be ``quoted_name``, e.g.
    "metadata", which JSON encoders refuse) and UTC-aware timestamps (SQLite keeps no
    zone; every timestamp we store is UTC)."""
    record = {str(key): value for key, value in row._mapping.items()}
    for key, value in record.items():
        if isinstance(value, datetime):
            record[key] = utc(value)
    return record


def newest_first(engine: Engine, table: sa.Table, limit: int | None) -> list[dict[str, Any]]:
    """Rows of a table whose ids are time-ordered, newest first; ``None``/0: all."""
    query = sa.select(table).order_by(table.c.id.desc())
    if limit:
        query = query.limit(limit)
    with engine.connect() as conn:
        return [as_record(row) for row in conn.execute(query)]


class _BatchInsert:
    """``INSERT ... ON CONFLICT DO NOTHING`` as one driver-level ``executemany``.

    This is the capture writer's whole job, and SQLAlchemy's per-row
    parameter processing cost more than the request it records (the writer
    shares the GIL with the event loop).  So the statement is compiled once
    and rows are plain tuples, each value converted by its column's type:
    JSON columns serialised with orjson, timestamps as the dialect stores them.
    """

    def __init__(self, engine: Engine, table: sa.Table) -> None:
        postgres = engine.dialect.name == "postgresql"
        self.columns = tuple(column.name for column in table.columns)
        self.converters = tuple(_converter(column.type, postgres) for column in table.columns)
        placeholders = ", ".join(
            ("%s::jsonb" if _is_json(column.type) else "%s") if postgres else "?"
            for column in table.columns
        )
        quote = engine.dialect.identifier_preparer.quote
        self.sql = (
            f"INSERT INTO {quote(table.name)} ({', '.join(quote(c) for c in self.columns)}) "
            f"VALUES ({placeholders}) ON CONFLICT DO NOTHING"
        )

    def rows(self, rows: Iterable[Mapping[str, Any]]) -> list[tuple[Any, ...]]:
        """Every column from every row: a missing key is a KeyError, never a silent NULL."""
        pairs = tuple(zip(self.columns, self.converters, strict=True))
        return [
            tuple(convert(row[name]) if convert else row[name] for name, convert in pairs)
            for row in rows
        ]


def _is_json(column_type: sa.types.TypeEngine[Any]) -> bool:
    # JSONColumn is a variant: JSON, with JSONB on Postgres.
    return isinstance(column_type, sa.JSON) or isinstance(
        getattr(column_type, "impl", None), sa.JSON
    )


def _converter(column_type: sa.types.TypeEngine[Any], postgres: bool) -> Any:
    if _is_json(column_type):
        return lambda value: None if value is None else _json_dumps(value)
    if isinstance(column_type, sa.DateTime):
        if postgres:
            return lambda value: datetime.fromtimestamp(value, UTC)
        # SQLAlchemy's own SQLite storage format, so ORM reads parse it back.
        return lambda value: datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    return None


def _tag(key: Any, value: Any) -> str:
    # Drivers stringify some non-strings their own way (psycopg: a list as
    # '{1,2}'), so the same record would be stored differently per database.
    if not isinstance(value, str) or not isinstance(key, str):
        raise TypeError(f"metadata value for {key!r} is not a string")
    return value


# Full-text search indexes at most this many characters of a call: its first
# and last halves (the instructions, and the question and answer at the end).
# Beyond that an index costs more than it finds, and Postgres refuses a
# tsvector over 1 MB anyway.
SEARCH_CHARS = 200_000


def _search_text(record: CaptureRecord) -> str:
    text = search_text(record["request"], record["response"])
    limit = record.get("search_limit")
    limit = limit if isinstance(limit, int) else SEARCH_CHARS
    if len(text) <= limit:
        return text
    return text[: limit // 2] + "\n" + text[-(limit // 2) :]


def _stored_ids(conn: Any, ids: list[str]) -> set[str]:
    found: set[str] = set()
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        found.update(
            row[0]
            for row in conn.execute(sa.select(COMPLETIONS.c.id).where(COMPLETIONS.c.id.in_(chunk)))
        )
    return found


class Store:
    """A database the capture path writes to and the curation commands read."""

    def __init__(self, engine: Engine, migrated: bool = False) -> None:
        self.engine = engine
        self.migrated = migrated
        self._completions = _BatchInsert(engine, COMPLETIONS)
        self._tags = _BatchInsert(engine, TAGS)

    @property
    def url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    @property
    def connect_url(self) -> str:
        """The URL with its password: for worker processes that open their own store."""
        return self.engine.url.render_as_string(hide_password=False)

    def insert(self, records: Iterable[CaptureRecord]) -> int:
        """Insert capture records (the ones the proxy builds); duplicates by id are skipped.
        Returns how many were not stored before (a spool read twice counts once).

        Records carry ``created_at`` as epoch seconds: cheap to mint on the
        request path and JSON-safe in the spool.
        Raises :class:`RecordRefused` when the database refuses the records
        themselves (see ``repair.py``), or when one is not a capture record at all
        (a key missing or unknown: never stored with a NULL where a value was meant);
        any other exception means the database is unavailable.
        """
        records = list(records)
        if not records:
            return 0
        for record in records:
            problem = check_capture(record)
            if problem:
                raise RecordRefused(f"record {record.get('id')!r} is {problem}")
        if not self.migrated:
            # The proxy starts even when the database is down; the schema is
            # created the first time it answers.
            _tell(migrate(self.engine))
            self.migrated = True
        dialect = self.engine.dialect.name
        try:
            completions = self._completions.rows(records)
            tags = self._tags.rows(
                {"completion_id": record["id"], "key": key, "value": _tag(key, value)}
                for record in records
                for key, value in record["metadata"].items()
            )
            texts = [(record["id"], _search_text(record)) for record in records]
            with self.engine.begin() as conn:
                # A replayed spool holds records already stored: they count once.
                stored = _stored_ids(conn, [record["id"] for record in records])
                conn.exec_driver_sql(self._completions.sql, completions)
                if tags:
                    conn.exec_driver_sql(self._tags.sql, tags)
                search.insert(conn, texts)
                fresh = {r["id"]: r for r in records if r["id"] not in stored}  # once per id
                rollups.apply(conn, rollups.group(rollups.Call.of(r) for r in fresh.values()))
        except Exception as exc:
            if refused(exc, dialect):
                raise RecordRefused(f"{type(exc).__name__}: {exc}") from exc
            raise
        return len(fresh)

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(sa.select(sa.func.count()).select_from(COMPLETIONS)).scalar_one()
            )

    def close(self) -> None:
        self.engine.dispose()


COMPLETION_COLUMNS: tuple[str, ...] = tuple(column.name for column in COMPLETIONS.columns)


def open_store(url: str) -> Store:
    """Open (and migrate) the database at ``url``, naming the fix when that fails."""
    engine = create_engine(url)
    try:
        _tell(migrate(engine))
    except sa.exc.OperationalError as exc:
        engine.dispose()
        raise StoreError(f"Cannot open database {engine.url!r}: {exc.orig}") from None
    return Store(engine, migrated=True)
