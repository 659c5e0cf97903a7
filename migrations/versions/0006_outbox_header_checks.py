"""Keep rows no Kafka record can be built from out of the outbox (I6): header names and
values in pairs, no NULL header name.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

The constraints are added NOT VALID: rows already in the table are not checked (a scan under
lock, and a migration that fails on a row another writer put there), only new ones are. The
relay buries an existing malformed row with its reason (I6); once none is left,
``ALTER TABLE outbox_events VALIDATE CONSTRAINT ...`` marks them valid without blocking writes.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHECKS = {
    "outbox_events_headers_paired": "cardinality(header_names) = cardinality(header_values)",
    "outbox_events_headers_named": "array_position(header_names, NULL) IS NULL",
}


def upgrade() -> None:
    for name, condition in CHECKS.items():
        # Tables made from outbox.metadata have them already: replaced, not refused.
        op.execute(f"ALTER TABLE outbox_events DROP CONSTRAINT IF EXISTS {name}")
        op.create_check_constraint(name, "outbox_events", condition, postgresql_not_valid=True)


def downgrade() -> None:
    for name in CHECKS:
        op.drop_constraint(name, "outbox_events", type_="check")
