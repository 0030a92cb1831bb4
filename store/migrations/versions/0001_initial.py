"""The first schema: captured calls, tags, full-text search, datasets, evals.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _json() -> sa.types.TypeEngine:  # type: ignore[type-arg]
    return sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    # Why these indexes: listing is by id (time-ordered); filters hit created_at,
    # tenant, model and fingerprint; tag filters walk (key, value, completion_id).
    op.create_table(
        "completions",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("completion_id", sa.String(), index=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, index=True),
        sa.Column("tenant", sa.String(), nullable=False, index=True),
        sa.Column("upstream", sa.String(), nullable=False),
        sa.Column("path", sa.String(), nullable=False),
        sa.Column("model_requested", sa.String(), index=True),
        sa.Column("model_served", sa.String()),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.Column("finish_reason", sa.String()),
        sa.Column("prompt_tokens", sa.Integer()),
        sa.Column("completion_tokens", sa.Integer()),
        sa.Column("total_tokens", sa.Integer()),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("ttft_ms", sa.Float()),
        sa.Column("upstream_request_id", sa.String()),
        sa.Column("prompt_fingerprint", sa.String(), index=True),
        sa.Column("request", _json(), nullable=False),
        sa.Column("response", _json()),
        sa.Column("error", _json()),
        sa.Column("metadata", _json(), nullable=False),
    )
    op.create_table(
        "completion_tags",
        sa.Column(
            "completion_id", sa.String(40), sa.ForeignKey("completions.id"), primary_key=True
        ),
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.String(512), nullable=False),
    )
    op.create_index(
        "ix_completion_tags_key_value", "completion_tags", ["key", "value", "completion_id"]
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            "CREATE TABLE completion_search (completion_id VARCHAR(40) PRIMARY KEY "
            "REFERENCES completions(id), body TSVECTOR NOT NULL)"
        )
        op.execute("CREATE INDEX ix_completion_search_body ON completion_search USING GIN (body)")
    else:
        op.execute("CREATE VIRTUAL TABLE completions_fts USING fts5(body, tokenize='unicode61')")
    op.create_table(
        "dataset_versions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(200), nullable=False, index=True),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("watermark", sa.String(40)),
        sa.Column("train_examples", sa.Integer(), nullable=False),
        sa.Column("val_examples", sa.Integer(), nullable=False),
        sa.Column("path", sa.String(), nullable=False),
        sa.Column("manifest", _json(), nullable=False),
        sa.UniqueConstraint("name", "version"),
    )
    op.create_table(
        "dataset_examples",
        sa.Column(
            "version_id", sa.Integer(), sa.ForeignKey("dataset_versions.id"), primary_key=True
        ),
        sa.Column("completion_id", sa.String(40), primary_key=True),
        sa.Column("split", sa.String(5), nullable=False),
    )
    op.create_table(
        "eval_runs",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("config", _json(), nullable=False),
        sa.Column("summary", _json(), nullable=False),
    )
    op.create_table(
        "eval_samples",
        sa.Column("run_id", sa.String(40), sa.ForeignKey("eval_runs.id"), primary_key=True),
        sa.Column("item", sa.Integer(), primary_key=True),
        sa.Column("candidate", sa.String(200), primary_key=True),
        sa.Column("item_key", sa.String(32), nullable=False, index=True),
        sa.Column("output", _json()),
        sa.Column("error", sa.String()),
        sa.Column("grades", _json(), nullable=False),
        sa.Column("latency_ms", sa.Float()),
        sa.Column("prompt_tokens", sa.Integer()),
        sa.Column("completion_tokens", sa.Integer()),
    )
    op.create_table(
        "generation_cache",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("response", _json(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    for table in (
        "generation_cache",
        "eval_samples",
        "eval_runs",
        "dataset_examples",
        "dataset_versions",
    ):
        op.drop_table(table)
    if op.get_bind().dialect.name == "postgresql":
        op.drop_table("completion_search")
    else:
        op.execute("DROP TABLE completions_fts")
    op.drop_index("ix_completion_tags_key_value", "completion_tags")
    op.drop_table("completion_tags")
    op.drop_table("completions")
