"""kafka-outbox: publish events to Kafka exactly once from your PostgreSQL transactions.

``publish(session, ...)`` writes an event as a row in the caller's transaction;
the ``outbox relay`` daemon moves committed rows to Kafka in transactions.
"""

from outbox.codec import CONTENT_TYPE_HEADER, EVENT_ID_HEADER
from outbox.errors import ConfigError, EventError, NotMigrated, OutboxError
from outbox.publish import PublishSettings, apublish, configure, publish
from outbox.schema import dead_events, metadata, outbox_events

__all__ = [
    "CONTENT_TYPE_HEADER",
    "EVENT_ID_HEADER",
    "ConfigError",
    "EventError",
    "NotMigrated",
    "OutboxError",
    "PublishSettings",
    "apublish",
    "configure",
    "dead_events",
    "metadata",
    "outbox_events",
    "publish",
]
