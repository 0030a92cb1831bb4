"""Streamed calls stored as errors by 0.1.0.dev0's stream bug get their status back.

Why: from the capture-hardening change until this revision, every successful streamed
call whose upstream sent a chunk with ``"choices": []`` -- OpenAI's usage chunk, which
the proxy asks for on every stream -- was stored with ``error = {"type":
"upstream_malformed", "message": "chunk N ...: TypeError('choices is not a list')"}``,
so the stored API, datasets and the dashboard treated it as failed.  The answer itself
was stored whole: the old assembler merged every chunk before the usage chunk and took
that chunk's usage before it refused its choices.

What marks a call hit by the bug, from what was stored, and nothing else: that error,
a 2xx status, a stored response whose every choice has a ``finish_reason`` and which has
``usage`` -- the usage chunk comes after the last finish, so a stream that was really
broken part-way (a chunk whose choices are a string) has neither and keeps its error.
The daily aggregates move the repaired calls from errors to successes in the same
transaction.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from distillery.store import rollups

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

BUG = "TypeError('choices is not a list')"
BATCH = 500


def _table() -> sa.TableClause:
    json = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
    return sa.table(
        "completions",
        sa.column("id", sa.String()),
        sa.column("stream", sa.Boolean()),
        sa.column("status", sa.Integer()),
        sa.column("created_at", sa.DateTime(timezone=True)),
        sa.column("tenant", sa.String()),
        sa.column("model_served", sa.String()),
        sa.column("model_requested", sa.String()),
        sa.column("metadata", json),
        sa.column("prompt_fingerprint", sa.String()),
        sa.column("prompt_tokens", sa.Integer()),
        sa.column("completion_tokens", sa.Integer()),
        sa.column("latency_ms", sa.Float()),
        sa.column("response", json),
        sa.column("error", json),
    )


def hit_by_the_bug(status: int, error: Any, response: Any) -> bool:
    if status >= 400 or not isinstance(error, dict) or not isinstance(response, dict):
        return False
    if error.get("type") != "upstream_malformed" or BUG not in str(error.get("message")):
        return False
    choices = response.get("choices")
    return (
        isinstance(choices, list)
        and bool(choices)
        and all(isinstance(c, dict) and c.get("finish_reason") for c in choices)
        and isinstance(response.get("usage"), dict)
    )


def upgrade() -> None:
    conn = op.get_bind()
    completions = _table()
    # Only the candidates are read; the message test is exact in Python (JSON
    # operators differ between SQLite and Postgres).
    candidates = (
        sa.select(completions.c.id, completions.c.status, completions.c.error)
        .where(completions.c.stream.is_(True), completions.c.response.is_not(None))
        .where(completions.c.error.is_not(None), completions.c.status < 400)
        .order_by(completions.c.id)
    )
    suspects = [row.id for row in conn.execute(candidates) if _suspect(row.error)]
    repaired = 0
    for start in range(0, len(suspects), BATCH):
        ids = suspects[start : start + BATCH]
        rows = conn.execute(sa.select(completions).where(completions.c.id.in_(ids))).all()
        hit = [r for r in rows if hit_by_the_bug(r.status, r.error, r.response)]
        if not hit:
            continue
        before = [rollups.Call.of(r._mapping) for r in hit]
        rollups.apply(conn, rollups.group(before, sign=-1))
        after = [rollups.Call.of({**r._mapping, "error": None}) for r in hit]
        rollups.apply(conn, rollups.group(after))
        conn.execute(
            completions.update()
            .where(completions.c.id.in_([r.id for r in hit]))
            .values(error=sa.null())
        )
        repaired += len(hit)
    if repaired:
        # Said by whoever migrates (store.db.migrate returns it): the CLI on stderr, the
        # proxy in its log.
        config = op.get_context().config
        notes = config.attributes.setdefault("notes", []) if config is not None else []
        notes.append(
            f"Repaired {repaired} streamed calls stored as errors by the stream bug "
            "(revision 0006): they are listed, built into datasets and counted as successes."
        )


def _suspect(error: Any) -> bool:
    return isinstance(error, dict) and BUG in str(error.get("message"))


def downgrade() -> None:
    """Nothing to undo: the calls were successes; the bug's error is not put back."""
