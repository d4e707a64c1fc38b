"""pools (declared names, one pending dispatch each); webhook secret rotation; delivery pruning index

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 14:40:00
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    pools = op.create_table(
        "pools",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("declared_by", sa.String(length=16), nullable=False),
        sa.Column("description", sa.String(length=512), nullable=True),
        sa.Column("dispatch_sent_at", sa.Float(), nullable=True),
        sa.Column("dispatch_taken_at", sa.Float(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_pools")),
    )
    # Every pool already in use stays usable: those of registered models, workers and jobs.
    conn = op.get_bind()
    known: dict[str, str] = {}
    for table, source in (("jobs", "admin"), ("base_models", "model"), ("workers", "worker")):
        for (name,) in conn.execute(sa.text(f"SELECT DISTINCT pool FROM {table}")):
            known.setdefault(name, source)
    if known:
        now = int(time.time())
        op.bulk_insert(
            pools, [{"name": n, "declared_by": s, "created_at": now} for n, s in sorted(known.items())]
        )

    with op.batch_alter_table("webhook_endpoints", schema=None) as batch_op:
        batch_op.alter_column(
            "secret",
            existing_type=sa.String(length=128),
            type_=sa.String(length=512),
            existing_nullable=False,
        )
        batch_op.add_column(sa.Column("previous_secret", sa.String(length=512), nullable=True))
        batch_op.add_column(sa.Column("previous_secret_expires_at", sa.Float(), nullable=True))
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_webhook_deliveries_created_at"), ["created_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_webhook_deliveries_created_at"))
    with op.batch_alter_table("webhook_endpoints", schema=None) as batch_op:
        batch_op.drop_column("previous_secret_expires_at")
        batch_op.drop_column("previous_secret")
        batch_op.alter_column(
            "secret",
            existing_type=sa.String(length=512),
            type_=sa.String(length=128),
            existing_nullable=False,
        )
    op.drop_table("pools")
