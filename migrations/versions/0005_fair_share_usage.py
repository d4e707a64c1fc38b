"""Fair share in GPU time: teams.max_gpus, jobs.usage_accounted_at, team_usage (decayed GPU-seconds)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 14:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("teams", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_gpus", sa.Integer(), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("usage_accounted_at", sa.Float(), nullable=True))
    op.create_table(
        "team_usage",
        sa.Column("team_id", sa.String(length=40), nullable=False),
        sa.Column("pool", sa.String(length=64), nullable=False),
        sa.Column("gpu_seconds", sa.Float(), nullable=False),
        sa.Column("as_of", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(["team_id"], ["teams.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("team_id", "pool"),
    )


def downgrade() -> None:
    op.drop_table("team_usage")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("usage_accounted_at")
    with op.batch_alter_table("teams", schema=None) as batch_op:
        batch_op.drop_column("max_gpus")
