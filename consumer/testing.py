"""Helpers for testing a deduplicating consumer's ``handle`` without a broker.

``deliver()`` runs your handler on one event the way ``run()`` does: in a real
database transaction that also records the event as processed, so a second
delivery of the same event is skipped. The event can be built from values
(``record()``, encoded exactly as ``publish()`` encodes them) or taken from what
your application published (``outbox.testing.published()``)::

    from consumer.testing import consumer_for_tests, deliver, record

    def test_an_order_is_counted_once(engine):
        projector = consumer_for_tests(OrderProjector, engine)
        event = record("orders.v1", {"customer": "alice", "total": "19.99"},
                       headers={"event-type": "OrderPlaced"})
        assert deliver(projector, event) is True
        assert deliver(projector, event) is False  # the same event id: skipped
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from consumer.consumer import IdempotentConsumer, runner_of
from consumer.dedup import mark_processed, normalise_key
from consumer.event import Record, decode_event, outbox_event_id
from outbox.codec import Headers, encode_event
from outbox.tracing import restored_context

if TYPE_CHECKING:
    from outbox.testing import PublishedEvent

C = TypeVar("C", bound=IdempotentConsumer)

UNUSED_BROKER = "broker.invalid:9092"
"""The bootstrap servers of a consumer built for tests: ``deliver()`` never contacts Kafka."""


def consumer_for_tests(cls: type[C], db: str | Engine | AsyncEngine, **options: Any) -> C:
    """An instance of your consumer class for ``deliver()``; no Kafka connection is made.
    Call its ``close()`` when done (an async consumer holds an AsyncEngine and an event loop)."""
    return cls(db, UNUSED_BROKER, **options)


def record(
    topic: str,
    value: object,
    *,
    key: str | bytes | None = None,
    headers: Headers | None = None,
    event_id: uuid.UUID | None = None,
    partition: int = 0,
    offset: int = 0,
) -> Record:
    """The Kafka record the relay would produce for ``publish(topic=..., value=...)``."""
    event = encode_event(
        topic=topic,
        key=key,
        value=value,
        headers=headers,
        event_id=event_id,
        max_message_bytes=None,
    )
    return Record(
        topic=event.topic,
        partition=partition,
        offset=offset,
        key=event.key,
        value=event.value,
        headers=tuple(zip(event.header_names, event.header_values, strict=True)),
    )


def deliver(consumer: IdempotentConsumer, event: Record | PublishedEvent) -> bool:
    """Run ``consumer.handle`` on ``event`` with its dedup record in ONE transaction.

    Returns True when the handler ran (an ``async def`` one awaited) and committed, False
    when the event had already been processed by this consumer group (skipped, as ``run()``
    skips it). A handler's exception, ``TransactionMisuse`` when it committed, rolled back
    or swallowed a database error, or a value that cannot be decoded (``UndecodableEvent``),
    propagates and nothing is committed. Call it from plain (not async) test functions: an
    async handler runs on the consumer's own event loop.
    """
    runner = runner_of(consumer)
    rec = event if isinstance(event, Record) else event.record()
    key = normalise_key(outbox_event_id(rec) or consumer.dedup_key(rec) or rec.position)
    decoded = decode_event(
        rec,
        key,
        types=runner.event_types,
        default_content_type=runner.config.default_content_type,
    )
    group = runner.config.group_id
    with runner.transactions.open() as tx:
        if not tx.run(lambda session: mark_processed(session, group, [key])):
            return False
        with restored_context(decoded.headers):
            tx.handle(decoded)  # awaited when async; its transaction checked (I11)
    return True
