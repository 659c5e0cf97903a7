"""Dedup records of deduplicating consumers.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "outbox_processed_events",
        sa.Column("group_id", sa.Text(), nullable=False),
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column(
            "processed_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
        sa.PrimaryKeyConstraint("group_id", "event_id", name="outbox_processed_events_pkey"),
        comment=(
            "Dedup records of consumers (I5): one row per consumer group and event applied; "
            "purged after the dedup window."
        ),
    )
    # The purge walks one group's oldest records; this keeps it index-driven.
    op.create_index(
        "outbox_processed_events_group_processed_at",
        "outbox_processed_events",
        ["group_id", "processed_at"],
    )


def downgrade() -> None:
    op.drop_table("outbox_processed_events")
