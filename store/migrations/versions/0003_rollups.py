"""Daily aggregates of the calls, for the dashboard's overview, filled from what is stored.

Why: the overview sums calls, tokens, errors and latency over days; scanning every
call per page view takes seconds on a million rows.  Aggregates kept as calls are
written (store/rollups.py, which says why days and two tables) answer from far
fewer rows.  This revision creates the tables and fills them from the calls already
stored, through the same code that keeps them (so the two cannot disagree).

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


def _counts() -> list[sa.Column]:  # type: ignore[type-arg]
    return [
        sa.Column("calls", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("prompt_tokens", sa.BigInteger(), nullable=False),
        sa.Column("completion_tokens", sa.BigInteger(), nullable=False),
        sa.Column("latency_ms_sum", sa.Float(), nullable=False),
        *(sa.Column(name, sa.Integer(), nullable=False) for name in HISTOGRAM),
    ]


def upgrade() -> None:
    for table, last in (("rollup_apps", "app"), ("rollup_tasks", "fingerprint")):
        op.create_table(
            table,
            sa.Column("day", sa.DateTime(timezone=True), primary_key=True),
            sa.Column("tenant", sa.String(), primary_key=True),
            sa.Column("model", sa.String(), primary_key=True),
            sa.Column(last, sa.String(), primary_key=True),
            *_counts(),
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
    op.drop_table("rollup_tasks")
    op.drop_table("rollup_apps")
