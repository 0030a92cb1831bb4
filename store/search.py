"""Full-text search over captured calls: SQLite FTS5 or Postgres ``tsvector``.

The searchable text (messages, output, tool calls; see ``records.search_text``)
lives in a table of its own keyed to the completion (created by migration
0001), filled by the same batch insert as the completion itself:

* SQLite: an FTS5 table whose rowid is the completion's rowid;
* Postgres: ``completion_search(completion_id, body tsvector)`` with a GIN index.

Queries are plain words (all must occur); FTS5/tsquery syntax is not exposed,
so user input can never be a syntax error.
"""

from __future__ import annotations

import re
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

_WORD = re.compile(r"\w+", re.UNICODE)

# Replays insert the same completion again: skip those already indexed.
SQLITE_INSERT = (
    "INSERT INTO completions_fts (rowid, body) SELECT c.rowid, ? FROM completions c "
    "WHERE c.id = ? AND NOT EXISTS (SELECT 1 FROM completions_fts f WHERE f.rowid = c.rowid)"
)
POSTGRES_INSERT = (
    "INSERT INTO completion_search (completion_id, body) "
    "VALUES (%s, to_tsvector('simple', %s)) ON CONFLICT DO NOTHING"
)


def insert(conn: Connection, rows: list[tuple[str, str]]) -> None:
    """Index ``(completion id, text)`` pairs."""
    if not rows:
        return
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(POSTGRES_INSERT, rows)
    else:
        conn.exec_driver_sql(SQLITE_INSERT, [(text, cid) for cid, text in rows])


def words(query: str) -> list[str]:
    return _WORD.findall(query)


def matching_ids(engine: Engine | Connection, query: str) -> Any:
    """A subquery of completion ids whose text contains every word of ``query``."""
    terms = words(query)
    if engine.dialect.name == "postgresql":
        tsquery = " & ".join(terms) or "''"
        return (
            sa.text(
                "SELECT completion_id FROM completion_search "
                "WHERE body @@ to_tsquery('simple', :fts_query)"
            )
            .bindparams(fts_query=tsquery)
            .columns(completion_id=sa.String)
        )
    match = " ".join('"' + term.replace('"', '""') + '"' for term in terms) or '""'
    return (
        sa.text(
            "SELECT c.id AS completion_id FROM completions_fts f JOIN completions c "
            "ON c.rowid = f.rowid WHERE completions_fts MATCH :fts_query"
        )
        .bindparams(fts_query=match)
        .columns(completion_id=sa.String)
    )


def delete(conn: Connection, ids: list[str]) -> None:
    if conn.dialect.name == "postgresql":
        conn.execute(
            sa.text("DELETE FROM completion_search WHERE completion_id = ANY(:ids)"), {"ids": ids}
        )
    else:
        conn.execute(
            sa.text(
                "DELETE FROM completions_fts WHERE rowid IN "
                "(SELECT rowid FROM completions WHERE id IN :ids)"
            ).bindparams(sa.bindparam("ids", expanding=True)),
            {"ids": ids},
        )
