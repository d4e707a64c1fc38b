"""Preemption, pause and queue reasons: jobs.stop_request/stop_reason/preemptible/preemptions/
queued_at/attempt_started_at/queue_reason/reserved_worker/backfill_for, the per-team queue index,
teams.may_exempt_preemption, team_quotas (guaranteed GPUs)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03 17:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stop_request", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("stop_reason", sa.String(length=512), nullable=True))
        batch_op.add_column(sa.Column("preemptible", sa.Boolean(), server_default=sa.true(), nullable=False))
        batch_op.add_column(sa.Column("preemptions", sa.Integer(), server_default="0", nullable=False))
        batch_op.add_column(sa.Column("queued_at", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("attempt_started_at", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("queue_reason", sa.String(length=512), nullable=True))
        batch_op.add_column(sa.Column("reserved_worker", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("backfill_for", sa.String(length=40), nullable=True))
        batch_op.create_index(
            "ix_jobs_team_id_pool_status_priority_pk", ["team_id", "pool", "status", "priority", "pk"]
        )
    with op.batch_alter_table("teams", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("may_exempt_preemption", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    op.create_table(
        "team_quotas",
        sa.Column("team_id", sa.String(length=40), nullable=False),
        sa.Column("pool", sa.String(length=64), nullable=False),
        sa.Column("guaranteed_gpus", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["team_id"], ["teams.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("team_id", "pool"),
    )


def downgrade() -> None:
    op.drop_table("team_quotas")
    with op.batch_alter_table("teams", schema=None) as batch_op:
        batch_op.drop_column("may_exempt_preemption")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_team_id_pool_status_priority_pk")
        for column in (
            "backfill_for", "reserved_worker", "queue_reason", "attempt_started_at", "queued_at",
            "preemptions", "preemptible", "stop_reason", "stop_request",
        ):  # fmt: skip
            batch_op.drop_column(column)
