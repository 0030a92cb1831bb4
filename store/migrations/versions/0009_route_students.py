"""Whose evidence a pair is, and who a route's mode was decided for.

Why: a route's graded pairs were the route's, whoever the student was. Changing the
route's student (another model, or new files served under the same name) kept the
old mode and the old pairs, so an untested model served calls under "clears the bar".
Each pair now records the student that answered it (``MODEL@ENDPOINT``, with the
served files' content hash when the endpoint reports one) and a route's state the
student its mode was decided for; evidence is counted for the current student only.
Pairs stored before this revision name no student and count for none.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("route_samples") as table:
        table.add_column(sa.Column("student", sa.String(300)))
    op.create_index(
        "ix_route_samples_route_student_id", "route_samples", ["route", "student", "id"]
    )
    with op.batch_alter_table("route_states") as table:
        table.add_column(sa.Column("student", sa.String(300)))


def downgrade() -> None:
    op.drop_index("ix_route_samples_route_student_id", "route_samples")
    with op.batch_alter_table("route_states") as table:
        table.drop_column("student")
    with op.batch_alter_table("route_samples") as table:
        table.drop_column("student")
