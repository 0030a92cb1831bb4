"""Hourly aggregates of the calls, for the dashboard's overview, filled from what is stored.

Why: the overview sums calls, tokens, errors and latency over days; scanning every
call per page view takes seconds on a million rows.  Aggregates kept as calls are
written (store/rollups.py) answer from a few thousand rows.  This revision creates
the table and fills it from the calls already stored, through the same code that
keeps it (so the two cannot disagree), in batches.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

HISTOGRAM = [f"lat_{i:02d}" for i in range(13)]


def upgrade() -> None:
    op.create_table(
        "completion_rollups",
        sa.Column("bucket", sa.DateTime(timezone=True), primary_key=True),
        sa.Column("tenant", sa.String(), primary_key=True),
        sa.Column("model", sa.String(), primary_key=True),
        sa.Column("app", sa.String(), primary_key=True),
        sa.Column("fingerprint", sa.String(), primary_key=True),
        sa.Column("calls", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("latency_ms_sum", sa.Float(), nullable=False),
        *(sa.Column(name, sa.Integer(), nullable=False) for name in HISTOGRAM),
    )
    from distillery.store import rollups
    from distillery.store.db import COMPLETIONS

    conn = op.get_bind()
    columns = [COMPLETIONS.c[name] for name in rollups.COLUMNS]
    last = ""
    while True:  # pages in id order: no cursor stays open while the aggregates are written
        page = conn.execute(
            sa.select(COMPLETIONS.c.id, *columns)
            .where(COMPLETIONS.c.id > last)
            .order_by(COMPLETIONS.c.id)
            .limit(5000)
        ).all()
        if not page:
            break
        rollups.apply(conn, rollups.group(rollups.Call.of(row._mapping) for row in page))
        last = page[-1].id


def downgrade() -> None:
    op.drop_table("completion_rollups")
