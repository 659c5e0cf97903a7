"""Publishing a dead letter through the outbox, in the transaction marking the record
processed, so a dead letter is exactly-once too (I7)."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session

from consumer.config import ConsumerConfig
from consumer.deadletter import (
    dead_letter_headers,
    dead_letter_id,
    describe,
    lean_dead_letter_headers,
)
from consumer.decoding import Item
from consumer.retry import Reason
from outbox.errors import EventTooLarge
from outbox.publish import publish

log = logging.getLogger("outbox.consumer")


def publish_dead_letter(
    session: Session,
    config: ConsumerConfig,
    item: Item,
    error: BaseException,
    attempts: int,
    reason: Reason,
) -> None:
    """The dead letter of ``item`` to its ``<topic>.DLT``, in ``session``'s transaction."""
    record = item.record
    topic = config.dead_letter_topic(record.topic)
    headers = dead_letter_headers(
        record,
        group_id=config.group_id,
        key=item.key,
        error=error,
        attempts=attempts,
        reason=reason,
    )
    event_id = dead_letter_id(config.group_id, item.key)
    try:
        publish(
            session,
            topic=topic,
            key=record.key,
            value=record.value,
            headers=headers,
            event_id=event_id,
        )
    except EventTooLarge as exc:
        # A record near the broker's limit does not fit with the dead letter's headers
        # (or the broker allows more than publish()): dead-letter it without its payload,
        # rather than stop the consumer on it (I10). The original stays at its position.
        log.warning("%s is too large to dead-letter whole: %s", record.position, exc)
        publish(
            session,
            topic=topic,
            key=None,
            value=None,
            headers=lean_dead_letter_headers(headers, exc),
            event_id=event_id,
        )
    log.error(
        "%s (event %s) dead-lettered to %s after %d attempt(s), %s: %s",
        record.position,
        item.key,
        topic,
        attempts,
        reason.value,
        describe(error),
    )
