"""Deduplicating consumers: exactly-once effects for events from the outbox (I5, I7).

Subclass ``IdempotentConsumer``, set ``topics`` and ``group_id``, implement
``handle(session, event)``; each event's effects commit in one database
transaction with its dedup record, and the Kafka offset after it::

    class OrderProjector(IdempotentConsumer):
        topics = ["orders.v1"]
        group_id = "order-projector"

        def handle(self, session, event: Event) -> None:
            session.execute(...)

    OrderProjector(db="postgresql+psycopg://...", bootstrap_servers="localhost:9092").run()

or ``outbox consume mypkg.projector:OrderProjector --db ... --bootstrap-servers ...``.
"""

from consumer.config import DEAD_LETTER_SUFFIX, ConsumerConfig
from consumer.consumer import IdempotentConsumer, consume, runner_of
from consumer.event import (
    EVENT_TYPE_HEADER,
    Event,
    EventTypes,
    Record,
    UndecodableEvent,
    UnknownEventType,
)
from consumer.handling import RetryLater, TransactionMisuse
from consumer.loader import load_consumer_class
from consumer.outcomes import DeadLetterError
from consumer.purge import purge_processed
from consumer.retry import RetryPolicy
from consumer.runner import ConsumerRunner
from consumer.stats import ConsumerStats

__all__ = [
    "DEAD_LETTER_SUFFIX",
    "EVENT_TYPE_HEADER",
    "ConsumerConfig",
    "ConsumerRunner",
    "ConsumerStats",
    "DeadLetterError",
    "Event",
    "EventTypes",
    "IdempotentConsumer",
    "Record",
    "RetryLater",
    "RetryPolicy",
    "TransactionMisuse",
    "UndecodableEvent",
    "UnknownEventType",
    "consume",
    "load_consumer_class",
    "purge_processed",
    "runner_of",
]
