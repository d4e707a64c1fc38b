"""workers.slots and free_slots: the GPUs (CPU slots) a node's worker owns and has free

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 15:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.add_column(sa.Column("slots", sa.Integer(), server_default="1", nullable=False))
        batch_op.add_column(sa.Column("free_slots", sa.Integer(), server_default="1", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("workers", schema=None) as batch_op:
        batch_op.drop_column("free_slots")
        batch_op.drop_column("slots")
