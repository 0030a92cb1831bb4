"""Dashboard sessions kept in the database, so that they can end.

Why: a session lived only in its signed cookie, valid until it expired (12 h): signing
out cleared the browser's copy, and a key removed from the config kept its sessions.
Every request now checks its session here, on every proxy of the database: signing
out, ``distillery db end-sessions`` and idle time end it at once.  Cookies from before
this revision name no session and are signed out.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "ui_sessions",
        sa.Column("id", sa.String(40), primary_key=True),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("seen_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True)),
    )


def downgrade() -> None:
    op.drop_table("ui_sessions")
