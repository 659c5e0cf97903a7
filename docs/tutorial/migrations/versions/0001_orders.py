"""orders, customer totals and the outbox tables

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import outbox.migrate

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "orders",
        sa.Column("id", sa.Uuid(), primary_key=True),
        sa.Column("customer", sa.String(64), nullable=False),
        sa.Column("total", sa.Numeric(12, 2), nullable=False),
    )
    op.create_table(
        "customer_totals",
        sa.Column("customer", sa.String(64), primary_key=True),
        sa.Column("orders", sa.Integer(), nullable=False),
        sa.Column("total", sa.Numeric(14, 2), nullable=False),
    )
    # The outbox's own migrations, inside this revision's transaction.
    outbox.migrate.upgrade(op.get_bind())


def downgrade() -> None:
    op.drop_table("customer_totals")
    op.drop_table("orders")
