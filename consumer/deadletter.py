"""The dead-letter record: what goes to ``<topic>.DLT`` and which headers explain it (I7). Pure.

The consumer publishes it THROUGH THE OUTBOX, in the same database transaction
that records the original event as processed, so a dead letter is exactly-once
too: never lost, never doubled, and the partition moves on.

The record keeps the original key and the original value bytes (its
``content-type`` becomes ``application/octet-stream``; the original one is in
``dlt-original-content-type``). The original headers are copied, except the
outbox's own (``outbox-event-id``, ``content-type``) and earlier ``dlt-*``
headers, and these are added (all UTF-8 text):

=============================  ===============================================
``dlt-reason``                 ``retries-exhausted``, ``non-retryable`` or ``undecodable``
``dlt-error-type``             exception class, ``module.QualName`` (builtins bare)
``dlt-error-message``          ``str(exception)``, passwords redacted, cut at 2000 chars
``dlt-attempts``               handler calls made (``0`` when undecodable)
``dlt-original-topic``         topic of the failed record
``dlt-original-partition``     its partition
``dlt-original-offset``        its offset
``dlt-original-timestamp``     its timestamp, ms since the epoch (when it had one)
``dlt-original-event-id``      its dedup key (the ``outbox-event-id`` for outbox events)
``dlt-original-content-type``  its ``content-type`` header (when it had one)
``dlt-consumer-group``         the consumer group that gave up on it
=============================  ===============================================
"""

from __future__ import annotations

import uuid

from consumer.event import Record
from consumer.retry import Reason, error_type_name
from outbox.codec import CONTENT_TYPE_HEADER, RESERVED_HEADERS
from outbox.db import redact

DLT_PREFIX = "dlt-"
REASON_HEADER = "dlt-reason"
ERROR_TYPE_HEADER = "dlt-error-type"
ERROR_MESSAGE_HEADER = "dlt-error-message"
ATTEMPTS_HEADER = "dlt-attempts"
ORIGINAL_TOPIC_HEADER = "dlt-original-topic"
ORIGINAL_PARTITION_HEADER = "dlt-original-partition"
ORIGINAL_OFFSET_HEADER = "dlt-original-offset"
ORIGINAL_TIMESTAMP_HEADER = "dlt-original-timestamp"
ORIGINAL_EVENT_ID_HEADER = "dlt-original-event-id"
ORIGINAL_CONTENT_TYPE_HEADER = "dlt-original-content-type"
CONSUMER_GROUP_HEADER = "dlt-consumer-group"

MAX_ERROR_MESSAGE = 2000
_NAMESPACE = uuid.UUID("2b0c8f5e-6f0a-4c61-9a3e-6b2f1d7c0d1e")


def dead_letter_id(group_id: str, key: str) -> uuid.UUID:
    """A stable event id for the dead letter of ``key`` in ``group_id`` (reproducible)."""
    return uuid.uuid5(_NAMESPACE, f"{group_id}\x00{key}")


def error_message(error: BaseException) -> str:
    text = redact(str(error)) or type(error).__name__
    return text if len(text) <= MAX_ERROR_MESSAGE else text[: MAX_ERROR_MESSAGE - 3] + "..."


def dead_letter_headers(
    record: Record,
    *,
    group_id: str,
    key: str,
    error: BaseException,
    attempts: int,
    reason: Reason,
) -> list[tuple[str, str | bytes]]:
    """The headers of the dead letter for ``record``, original ones first."""
    headers: list[tuple[str, str | bytes]] = [
        (name, value)
        for name, value in record.headers
        if name.lower() not in RESERVED_HEADERS and not name.lower().startswith(DLT_PREFIX)
    ]
    headers += [
        (REASON_HEADER, reason.value),
        (ERROR_TYPE_HEADER, error_type_name(error)),
        (ERROR_MESSAGE_HEADER, error_message(error)),
        (ATTEMPTS_HEADER, str(attempts)),
        (ORIGINAL_TOPIC_HEADER, record.topic),
        (ORIGINAL_PARTITION_HEADER, str(record.partition)),
        (ORIGINAL_OFFSET_HEADER, str(record.offset)),
        (ORIGINAL_EVENT_ID_HEADER, key),
        (CONSUMER_GROUP_HEADER, group_id),
    ]
    if record.timestamp_ms is not None:
        headers.append((ORIGINAL_TIMESTAMP_HEADER, str(record.timestamp_ms)))
    content_type = record.header(CONTENT_TYPE_HEADER)
    if content_type is not None:
        headers.append((ORIGINAL_CONTENT_TYPE_HEADER, content_type))
    return headers
