"""When the database refuses a capture record: telling that apart from an outage, and repairing it.

A batch insert can fail for two very different reasons, and the capture writer
must never confuse them:

* the database is unavailable (down, locked, out of disk, not yet migrated):
  every record is fine and must wait in the spool until it answers again;
* the database refuses *these* records (a metadata value that is an object, a
  key longer than the column, a NUL character Postgres cannot store, a search
  text beyond Postgres' ``tsvector`` limit): waiting will never help, and
  holding the record back would hold back every record spooled after it.

:func:`refused` decides which one an exception is; :func:`repair` rewrites a
refused record into one the database accepts, changing as little as it can:
metadata becomes strings within OpenAI's limits (the original stays in the
stored request JSON, which is what was sent upstream), NUL characters are
escaped as the six characters ``\\u0000``, JSON that nests too deeply is kept
as text, and the search index gets a tighter bound.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, cast

import orjson
import sqlalchemy as sa

from distillery.core.shapes import MAX_KEY, MAX_VALUE
from distillery.store.records import CaptureRecord

# What full-text search indexes of a repaired record (its first and last
# halves): Postgres refuses a tsvector over 1 MB; 100,000 characters of
# distinct words stay well under it, even where the usual bound did not.
SEARCH_CHARS_REPAIRED = 100_000
# The tag that marks a repaired record, so it can be found with --tag.
REPAIRED_TAG = "distillery_repaired"
JSON_FIELDS = ("request", "response", "error")
TEXT_FIELDS = (
    "completion_id",
    "tenant",
    "upstream",
    "path",
    "model_requested",
    "model_served",
    "finish_reason",
    "upstream_request_id",
    "prompt_fingerprint",
)

# Postgres SQLSTATE classes that blame the data: 22 data exception (too long,
# NUL, bad encoding), 23 integrity constraint (NOT NULL), 54 program limit
# exceeded (tsvector too long).  Everything else -- connection failures (08),
# disk full (53), shutdown (57), locks (55), a missing table (42) -- is an outage.
_POSTGRES_REFUSALS = ("22", "23", "54")
_DATATYPE_MISMATCH = "42804"  # the one class-42 error a value can cause
# Raised by our own row building (a metadata value that is not a string, a
# timestamp that is not a number, JSON orjson cannot serialise).
_ROW_ERRORS = (TypeError, ValueError, KeyError, AttributeError, OverflowError)


_SQLITE_REFUSALS = (
    sa.exc.IntegrityError,
    sa.exc.DataError,
    sa.exc.ProgrammingError,
    sa.exc.InterfaceError,
)


class RecordRefused(Exception):
    """The database refused these records themselves; it is not unavailable."""


def refused(exc: BaseException, dialect: str) -> bool:
    """True when ``exc`` blames the records, False when it means the database is unavailable."""
    if isinstance(exc, _ROW_ERRORS):
        return True
    if not isinstance(exc, sa.exc.DBAPIError):
        return False
    if dialect == "postgresql":
        code = str(getattr(exc.orig, "sqlstate", None) or "")
        if code:
            return code[:2] in _POSTGRES_REFUSALS or code == _DATATYPE_MISMATCH
        # Errors psycopg raises before sending (a NUL byte, a type it cannot adapt).
        return isinstance(exc, sa.exc.DataError | sa.exc.ProgrammingError)
    # SQLite: "database is locked", "disk is full", "unable to open" are
    # OperationalError; a bad binding, a NOT NULL or a too-big string are these.
    return isinstance(exc, _SQLITE_REFUSALS)


def repair(record: Mapping[str, Any]) -> tuple[CaptureRecord, list[str]]:
    """A copy of ``record`` the database can store, and what had to change."""
    out = dict(record)
    changes: list[str] = []
    metadata, problems = _metadata(record.get("metadata"))
    if problems:
        changes.extend(problems)
    for name in JSON_FIELDS:
        value = out.get(name)
        if value is None:
            continue
        try:
            # As it sits in the record, one level down: a value orjson writes alone
            # can still be one level too deep inside the record.
            orjson.dumps({name: value})
        except (orjson.JSONEncodeError, TypeError):
            out[name] = {"distillery_unstorable": "nested too deeply", "json": _as_text(value)}
            changes.append(f"{name} kept as text")
    if _has_nul(out, metadata):
        out = _escape_nul(out)
        metadata = _escape_nul(metadata)
        changes.append("NUL characters escaped")
    for name in TEXT_FIELDS:
        if out.get(name) is not None and not isinstance(out[name], str):
            out[name] = str(out[name])
            changes.append(f"{name} made a string")
    out["search_limit"] = SEARCH_CHARS_REPAIRED  # read by Store.insert
    changes.append("search index bounded")
    metadata[REPAIRED_TAG] = _limit(", ".join(changes), MAX_VALUE)
    out["metadata"] = metadata
    return cast(CaptureRecord, out), changes


def _metadata(value: Any) -> tuple[dict[str, str], list[str]]:
    if not isinstance(value, Mapping):
        return {}, [] if value is None else ["metadata was not an object"]
    fixed: dict[str, str] = {}
    problems: set[str] = set()
    for key, item in value.items():
        name = key if isinstance(key, str) else str(key)
        if len(name) > MAX_KEY:
            name = name[:MAX_KEY]
            problems.add("metadata key shortened")
        if not isinstance(item, str):
            item = _as_text(item)
            problems.add("metadata value made a string")
        if len(item) > MAX_VALUE:
            item = item[:MAX_VALUE]
            problems.add("metadata value shortened")
        if name in fixed:
            problems.add("metadata key dropped (duplicate after shortening)")
            continue
        fixed[name] = item
    return fixed, sorted(problems)


def _as_text(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except (orjson.JSONEncodeError, TypeError):
        try:
            return json.dumps(value, ensure_ascii=False, default=str)
        except (RecursionError, ValueError, TypeError):
            return repr(value)[:MAX_VALUE]


def _limit(text: str, size: int) -> str:
    return text if len(text) <= size else text[: size - 1] + "…"


def _has_nul(*values: Any) -> bool:
    for value in values:
        if isinstance(value, str):
            if "\x00" in value:
                return True
        elif isinstance(value, Mapping):
            if _has_nul(*value.keys()) or _has_nul(*value.values()):
                return True
        elif isinstance(value, list | tuple) and _has_nul(*value):
            return True
    return False


def _escape_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\\u0000")
    if isinstance(value, Mapping):
        return {_escape_nul(key): _escape_nul(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_escape_nul(item) for item in value]
    return value
