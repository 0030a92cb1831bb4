"""Routes: a student shadowing the teacher on live traffic, and its mode.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def _json() -> sa.types.TypeEngine:  # type: ignore[type-arg]
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "route_states",
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("mode", sa.String(10), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "route_samples",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("route", sa.String(100), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("student_model", sa.String(), nullable=False),
        sa.Column("status", sa.String(10), nullable=False),
        sa.Column("error", sa.String()),
        sa.Column("response", _json()),
        sa.Column("latency_ms", sa.Float()),
        sa.Column("prompt_tokens", sa.Integer()),
        sa.Column("completion_tokens", sa.Integer()),
        sa.Column("teacher_model", sa.String()),
        sa.Column("teacher_latency_ms", sa.Float()),
        sa.Column("teacher_prompt_tokens", sa.Integer()),
        sa.Column("teacher_completion_tokens", sa.Integer()),
        sa.Column("scores", _json(), nullable=False),
        sa.Column("score", sa.Float()),
        sa.Column("teacher_score", sa.Float()),
    )
    op.create_index("ix_route_samples_route_id", "route_samples", ["route", "id"])
    op.create_table(
        "route_counters",
        sa.Column("route", sa.String(100), primary_key=True),
        sa.Column("kind", sa.String(40), primary_key=True),
        sa.Column("count", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("route_counters")
    op.drop_index("ix_route_samples_route_id", "route_samples")
    op.drop_table("route_samples")
    op.drop_table("route_states")
