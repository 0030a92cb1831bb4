"""Fine-tune jobs, each tied to the dataset version it trained on.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def _json() -> sa.types.TypeEngine:  # type: ignore[type-arg]
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "finetune_jobs",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("backend", sa.String(20), nullable=False),
        sa.Column("base_url", sa.String()),
        sa.Column("provider_job_id", sa.String(), index=True),
        sa.Column("dataset", sa.String(200), nullable=False),
        sa.Column("dataset_version", sa.Integer(), nullable=False),
        sa.Column("base_model", sa.String(), nullable=False),
        sa.Column("status", sa.String(40), nullable=False),
        sa.Column("fine_tuned_model", sa.String()),
        sa.Column("hyperparameters", _json(), nullable=False),
        sa.Column("metrics", _json(), nullable=False),
        sa.Column("error", _json()),
    )


def downgrade() -> None:
    op.drop_table("finetune_jobs")
