"""Outbox and dead-row tables.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from outbox.schema import OUTBOX_STORAGE

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _event_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("shard", sa.SmallInteger(), nullable=False),
        sa.Column("key", sa.LargeBinary()),
        sa.Column("value", sa.LargeBinary()),
        sa.Column("header_names", postgresql.ARRAY(sa.Text()), nullable=False),
        sa.Column("header_values", postgresql.ARRAY(sa.LargeBinary()), nullable=False),
    ]


def upgrade() -> None:
    op.create_table(
        "outbox_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=True), primary_key=True),
        *_event_columns(),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.UniqueConstraint("event_id", name="outbox_events_event_id_key"),
        comment="Committed events waiting for the relay; a row is deleted once Kafka has it.",
    )
    op.create_index("outbox_events_shard_id", "outbox_events", ["shard", "id"])
    storage = ", ".join(f"{k} = {v}" for k, v in OUTBOX_STORAGE.items())
    op.execute(f"ALTER TABLE outbox_events SET ({storage})")
    op.create_table(
        "outbox_dead_events",
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=False),
        *_event_columns(),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "failed_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False, server_default="1"),
        sa.UniqueConstraint("event_id", name="outbox_dead_events_event_id_key"),
        comment="Poison rows Kafka refused for good (I6), kept with their error until re-queued.",
    )


def downgrade() -> None:
    op.drop_table("outbox_dead_events")
    op.drop_table("outbox_events")
