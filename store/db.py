"""Opening the database, creating its schema, and the idempotent batch insert.

SQLite is the default (one file in the data dir, WAL mode so readers never
block the proxy's writer); Postgres is selected by a ``postgresql://`` URL and
driven through psycopg 3.  Both take the same code path: SQLAlchemy Core
``INSERT ... ON CONFLICT DO NOTHING`` in batches, which is what makes spool
replay safe to repeat.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import sqlalchemy as sa
from distillery.errors import StoreError
from distillery.store.models import Completion, CompletionTag
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlmodel import SQLModel

COMPLETIONS: sa.Table = Completion.__table__  # type: ignore[attr-defined]
TAGS: sa.Table = CompletionTag.__table__  # type: ignore[attr-defined]


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
    kwargs: dict[str, Any] = {"json_serializer": _json_dumps, "json_deserializer": orjson.loads}
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
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


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets the CLI read while the proxy writes; NORMAL is durable across
    # process crashes (the spool covers the rest).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def migrate(engine: Engine) -> None:
    """Bring the schema up to date; the proxy and the CLI both call this on start."""
    # Version 1 of the schema: created from the models.  Ordered alembic
    # migrations take over from here once the schema first changes.
    SQLModel.metadata.create_all(engine, tables=[COMPLETIONS, TAGS])


def _insert_ignoring_duplicates(engine: Engine, table: sa.Table) -> Any:
    dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
    return dialect.insert(table).on_conflict_do_nothing()


class Store:
    """A database the capture path writes to and the curation commands read."""

    def __init__(self, engine: Engine, migrated: bool = False) -> None:
        self.engine = engine
        self.migrated = migrated
        self._insert_completion = _insert_ignoring_duplicates(engine, COMPLETIONS)
        self._insert_tag = _insert_ignoring_duplicates(engine, TAGS)

    @property
    def url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def insert(self, records: Iterable[Mapping[str, Any]]) -> int:
        """Insert capture records (the dicts the proxy builds); duplicates by id are skipped."""
        rows: list[dict[str, Any]] = []
        tags: list[dict[str, Any]] = []
        for record in records:
            row = {name: record.get(name) for name in COMPLETION_COLUMNS}
            # Records carry epoch seconds (cheap to mint, JSON-safe in the spool).
            row["created_at"] = datetime.fromtimestamp(record["created_at"], UTC)
            rows.append(row)
            tags.extend(
                {"completion_id": record["id"], "key": key, "value": value}
                for key, value in record["metadata"].items()
            )
        if not rows:
            return 0
        if not self.migrated:
            # The proxy starts even when the database is down; the schema is
            # created the first time it answers.
            migrate(self.engine)
            self.migrated = True
        with self.engine.begin() as conn:
            conn.execute(self._insert_completion, rows)
            if tags:
                conn.execute(self._insert_tag, tags)
        return len(rows)

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
        migrate(engine)
    except sa.exc.OperationalError as exc:
        engine.dispose()
        raise StoreError(f"Cannot open database {engine.url!r}: {exc.orig}") from None
    return Store(engine, migrated=True)
