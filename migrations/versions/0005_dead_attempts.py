"""Re-queued dead rows keep the count of their failures.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
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
    # A constant default: no table rewrite, publish() leaves it to the default.
    op.add_column(
        "outbox_events",
        sa.Column(
            "dead_attempts",
            sa.Integer(),
            nullable=False,
            server_default="0",
            comment="Times this event was moved aside as dead before `outbox dead requeue`.",
        ),
    )


def downgrade() -> None:
    op.drop_column("outbox_events", "dead_attempts")
