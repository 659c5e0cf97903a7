"""The outbox's tables as SQLAlchemy metadata.

Applications that run their own Alembic history can include ``metadata`` (or
copy the migration); everyone else runs ``outbox migrate``. The migrations in
``migrations/versions`` create exactly these tables (a test compares them).
"""

from __future__ import annotations

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    Table,
    Text,
    Uuid,
    func,
    text,
    true,
)

metadata = MetaData()

NOTIFY_CHANNEL = "outbox_events"
VERSION_TABLE = "outbox_alembic_version"
"""Alembic version table of its own, so it never collides with the application's history."""
EVENT_ID_VERSION = "(get_byte(uuid_send(event_id), 6) >> 4)"
"""An event id's UUID version in SQL: the delivery record indexes v7 ids apart (0008)."""

# Autovacuum for a delete-after-publish table: vacuum after a fixed number of
# dead rows instead of a fraction of a table that is mostly empty, and without
# cost-based throttling, so claims never walk long runs of dead index entries.
OUTBOX_STORAGE = {
    "autovacuum_vacuum_scale_factor": "0",
    "autovacuum_vacuum_threshold": "5000",
    "autovacuum_vacuum_insert_scale_factor": "0",
    "autovacuum_vacuum_insert_threshold": "5000",
    "autovacuum_vacuum_cost_delay": "0",
}


def _event_columns() -> list[Column[object]]:
    """The event itself: the same columns in the outbox and among the dead rows."""
    return [
        Column("event_id", Uuid, nullable=False, unique=True),
        Column("topic", Text, nullable=False),
        Column("shard", SmallInteger, nullable=False),
        Column("key", LargeBinary),
        Column("value", LargeBinary),
        Column("header_names", ARRAY(Text), nullable=False),
        Column("header_values", ARRAY(LargeBinary), nullable=False),
    ]


outbox_events = Table(
    "outbox_events",
    metadata,
    Column("id", BigInteger, Identity(always=True), primary_key=True),
    *_event_columns(),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column(
        "dead_attempts",
        Integer,
        nullable=False,
        server_default="0",
        comment="Times this event was moved aside as dead before `outbox dead requeue`.",
    ),
    Index("outbox_events_shard_id", "shard", "id"),
    # A row no Kafka record can be built from is poison (I6): keep such rows out.
    CheckConstraint(
        "cardinality(header_names) = cardinality(header_values)",
        name="outbox_events_headers_paired",
    ),
    CheckConstraint(
        "array_position(header_names, NULL) IS NULL", name="outbox_events_headers_named"
    ),
    comment="Committed events waiting for the relay; a row is deleted once Kafka has it.",
)

dead_events = Table(
    "outbox_dead_events",
    metadata,
    Column("id", BigInteger, primary_key=True, autoincrement=False),
    *_event_columns(),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("failed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("error", Text, nullable=False),
    Column("attempts", Integer, nullable=False, server_default="1"),
    comment="Poison rows Kafka refused for good (I6), kept with their error until re-queued.",
)

processed_events = Table(
    "outbox_processed_events",
    metadata,
    Column("group_id", Text, primary_key=True),
    Column("event_id", Text, primary_key=True),
    Column("processed_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Index("outbox_processed_events_group_processed_at", "group_id", "processed_at"),
    comment=(
        "Dedup records of consumers (I5): one row per consumer group and event applied; "
        "purged after the dedup window."
    ),
)

identity = Table(
    "outbox_identity",
    metadata,
    Column("singleton", Boolean, primary_key=True, server_default=true()),
    Column("outbox_id", Uuid, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("slot_count", SmallInteger),
    CheckConstraint("singleton", name="outbox_identity_one_row"),
    comment=(
        "This outbox's identity (I9): recovery markers name it, the default "
        "transactional.id prefix derives from it; slot_count is the relays' slot layout."
    ),
)

consumer_attempts = Table(
    "outbox_consumer_attempts",
    metadata,
    Column("group_id", Text, primary_key=True),
    Column("topic", Text, primary_key=True),
    Column("partition", Integer, primary_key=True),
    Column("first_offset", BigInteger, nullable=False),
    Column("last_offset", BigInteger, nullable=False),
    Column("attempts", Integer, nullable=False, server_default="0"),
    Column("updated_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    comment=(
        "Records a consumer group started handling, per partition, and how many handler "
        "attempts one record has used across process deaths (I10)."
    ),
)

deliveries = Table(
    "outbox_deliveries",
    metadata,
    Column("published_at", DateTime(timezone=True), nullable=False, server_default=func.now()),
    Column("event_id", Uuid, nullable=False),
    Column("id", BigInteger, nullable=False, comment="The outbox row's id: the outbox order."),
    Column("topic", Text, nullable=False),
    Column("partition", Integer, comment="NULL when recovered from a marker."),
    Column("kafka_offset", BigInteger, comment="NULL when recovered from a marker."),
    Column("key_hash", BigInteger, comment="First 8 bytes of the key's SHA-256; NULL: no key."),
    # Time-ordered (v7) ids by a BRIN index, others by a btree (migration 0008).
    Index(
        "outbox_deliveries_event_id_v7",
        "event_id",
        postgresql_using="brin",
        postgresql_with={"autosummarize": "on"},
        postgresql_where=text(f"{EVENT_ID_VERSION} = 7"),
    ),
    Index(
        "outbox_deliveries_event_id",
        "event_id",
        postgresql_where=text(f"{EVENT_ID_VERSION} <> 7"),
    ),
    comment=(
        "Where each published event went, written with the delete of its outbox row; "
        "daily partitions on published_at, dropped after the retention window."
    ),
    postgresql_partition_by="RANGE (published_at)",
)
