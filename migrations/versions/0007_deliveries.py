"""The delivery record: where each published event went, kept for a retention window.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07

Partitioned by day on ``published_at``; the relay creates the days ahead and drops expired
ones (``outbox.relay.deliveries``). The default partition catches rows no day covers yet, so
a relay never fails a batch for a missing partition.
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
    op.create_table(
        "outbox_deliveries",
        sa.Column(
            "published_at",
            sa.DateTime(timezone=True),
            nullable=False,
            server_default=sa.func.now(),
        ),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column(
            "id", sa.BigInteger(), nullable=False, comment="The outbox row's id: the outbox order."
        ),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("partition", sa.Integer(), comment="NULL when recovered from a marker."),
        sa.Column("kafka_offset", sa.BigInteger(), comment="NULL when recovered from a marker."),
        sa.Column(
            "key_hash",
            sa.BigInteger(),
            comment="First 8 bytes of the key's SHA-256; NULL: no key.",
        ),
        comment=(
            "Where each published event went, written with the delete of its outbox row; "
            "daily partitions on published_at, dropped after the retention window."
        ),
        postgresql_partition_by="RANGE (published_at)",
    )
    op.create_index("outbox_deliveries_event_id", "outbox_deliveries", ["event_id"])
    op.execute("CREATE TABLE outbox_deliveries_default PARTITION OF outbox_deliveries DEFAULT")


def downgrade() -> None:
    op.drop_table("outbox_deliveries")
