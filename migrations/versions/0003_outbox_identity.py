"""The outbox's identity: one random uuid per outbox, named by every recovery marker (I9).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "outbox_identity",
        sa.Column("singleton", sa.Boolean(), primary_key=True, server_default=sa.true()),
        sa.Column("outbox_id", sa.Uuid(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
        sa.Column("slot_count", sa.SmallInteger()),
        sa.CheckConstraint("singleton", name="outbox_identity_one_row"),
        comment=(
            "This outbox's identity (I9): recovery markers name it, the default "
            "transactional.id prefix derives from it; slot_count is the relays' slot layout."
        ),
    )
    # A fresh identity at every creation: a re-created outbox is a new outbox, whose
    # ids may repeat the old one's. A restored database keeps the identity it was saved with.
    op.execute("INSERT INTO outbox_identity (outbox_id) VALUES (gen_random_uuid())")


def downgrade() -> None:
    op.drop_table("outbox_identity")
