"""The items an eval run graded: each prompt and its reference answer, kept with the run.

Why: the dashboard's eval page showed scores and outputs but not what was asked, nor
what the answers were graded against; those lived only in the run's HTML report,
made at run time.  Runs from before this revision keep no items: their pages say so.

Revision ID: 0008
Revises: 0007
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "eval_items",
        sa.Column("run_id", sa.String(40), sa.ForeignKey("eval_runs.id"), primary_key=True),
        sa.Column("item", sa.Integer(), primary_key=True),
        sa.Column("item_key", sa.String(32), nullable=False),
        sa.Column("messages", JSON, nullable=False),
        sa.Column("reference", JSON),
    )


def downgrade() -> None:
    op.drop_table("eval_items")
