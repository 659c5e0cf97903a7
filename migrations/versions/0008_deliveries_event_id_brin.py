"""The delivery record's event-id lookups: a BRIN index for time-ordered (v7) ids, a btree for
the others.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07

``publish()`` makes UUIDv7 event ids, which the relay records in about the order they sort
in: a BRIN index (a few bytes per 128 pages, next to nothing to maintain) finds them, where a
btree cost the record's INSERT a third of its server time and a quarter of its WAL. Other ids
(random v4 ones from older versions, a caller's own) keep a btree, partial to them. Each index
says in its predicate which ids it holds, and ``outbox trace`` asks each for its own
(``outbox.sql.TRACE_DELIVERIES``).
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VERSION = "(get_byte(uuid_send(event_id), 6) >> 4)"
"""The UUID's version nibble, in SQL that every supported PostgreSQL has (a copy, as
migrations keep their own: ``outbox.schema.EVENT_ID_VERSION``)."""


def upgrade() -> None:
    op.drop_index("outbox_deliveries_event_id", table_name="outbox_deliveries")
    op.execute(
        "CREATE INDEX outbox_deliveries_event_id_v7 ON outbox_deliveries USING brin (event_id)"
        f" WITH (autosummarize = on) WHERE {VERSION} = 7"
    )
    op.execute(
        "CREATE INDEX outbox_deliveries_event_id ON outbox_deliveries (event_id)"
        f" WHERE {VERSION} <> 7"
    )


def downgrade() -> None:
    op.drop_index("outbox_deliveries_event_id", table_name="outbox_deliveries")
    op.drop_index("outbox_deliveries_event_id_v7", table_name="outbox_deliveries")
    op.create_index("outbox_deliveries_event_id", "outbox_deliveries", ["event_id"])
