"""The dead-letter record: what goes to ``<topic>.DLT`` and which headers explain it (I7). Pure.

The consumer publishes it THROUGH THE OUTBOX, in the same database transaction
that records the original event as processed, so a dead letter is exactly-once
too: never lost, never doubled, and the partition moves on.

The record keeps the original key and the original value bytes (its
``content-type`` becomes ``application/octet-stream``; the original one is in
``dlt-original-content-type``). The original headers are copied, except the
outbox's own (``outbox-event-id``, ``content-type``) and the headers below of
an earlier dead letter (an application's other ``dlt-*`` headers are kept), and
these are added (all UTF-8 text):

=============================  ===============================================
``dlt-reason``                 ``retries-exhausted``, ``non-retryable``, ``undecodable``,
                               ``consumer-died`` or ``stuck``
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

Any original header is accepted (I10). One whose name cannot be stored as is
(empty, a NUL, bytes that are not UTF-8) travels as
``dlt-header-b64:<base64url of the name's bytes>`` with its value untouched; so
does an ``outbox-event-id`` whose bytes are not the dedup key (a hashed key), so
the originals stay recoverable. Values are bytes and always stored as they are.
"""

from __future__ import annotations

import base64
import re
import uuid

from consumer.event import Record
from consumer.retry import Reason, error_type_name
from outbox.codec import CONTENT_TYPE_HEADER, EVENT_ID_HEADER, RESERVED_HEADERS
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
LEFT_OUT_HEADER = "dlt-left-out"
"""Set when the record was too large to dead-letter whole: what was left out, and why."""
ENCODED_HEADER_PREFIX = "dlt-header-b64:"
"""Prefix of an original header whose name could not be stored as is; base64url follows."""

OWN_HEADERS = frozenset(
    {
        REASON_HEADER,
        ERROR_TYPE_HEADER,
        ERROR_MESSAGE_HEADER,
        ATTEMPTS_HEADER,
        ORIGINAL_TOPIC_HEADER,
        ORIGINAL_PARTITION_HEADER,
        ORIGINAL_OFFSET_HEADER,
        ORIGINAL_TIMESTAMP_HEADER,
        ORIGINAL_EVENT_ID_HEADER,
        ORIGINAL_CONTENT_TYPE_HEADER,
        CONSUMER_GROUP_HEADER,
        LEFT_OUT_HEADER,
    }
)
"""The headers a dead letter sets; a record's own header of one of these names is replaced.
Other ``dlt-*`` headers (the application's own) are kept."""

MAX_ERROR_MESSAGE = 2000
_UNSTORABLE_NAME = re.compile(r"[\x00\ud800-\udfff]")
_NAMESPACE = uuid.UUID("2b0c8f5e-6f0a-4c61-9a3e-6b2f1d7c0d1e")


def dead_letter_id(group_id: str, key: str) -> uuid.UUID:
    """A stable event id for the dead letter of ``key`` in ``group_id`` (reproducible)."""
    return uuid.uuid5(_NAMESPACE, f"{group_id}\x00{key}")


def error_message(error: BaseException, limit: int = MAX_ERROR_MESSAGE) -> str:
    """``str(error)``, cut to ``limit`` characters BEFORE redaction (bounded work), redacted."""
    try:
        text = str(error)
    except Exception:
        text = ""
    text = redact(text, limit - 3) or type(error).__name__  # 3: the "..." of a cut text
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(error: BaseException, limit: int = 500) -> str:
    """``Type: message``, bounded and redacted: for log lines."""
    return f"{type(error).__name__}: {error_message(error, limit)}"


def encoded_header_name(name: str) -> str:
    """The stored name of a header whose own name cannot be stored (empty, NUL, not UTF-8)."""
    raw = name.encode("utf-8", "surrogateescape") if name else b""
    return ENCODED_HEADER_PREFIX + base64.urlsafe_b64encode(raw).decode()


def original_header_name(stored: str) -> str | None:
    """Inverse of ``encoded_header_name`` (None for other names): how to recover an original."""
    if not stored.startswith(ENCODED_HEADER_PREFIX):
        return None
    raw = base64.urlsafe_b64decode(stored[len(ENCODED_HEADER_PREFIX) :])
    return raw.decode("utf-8", "surrogateescape")


def _storable(name: str) -> bool:
    return bool(name) and _UNSTORABLE_NAME.search(name) is None


def _text(value: str) -> str | bytes:
    """Header text; as bytes with the characters UTF-8 cannot hold (lone surrogates) escaped."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return value.encode("utf-8", "backslashreplace")
    return value


def _raw_text(value: bytes) -> str | bytes:
    """A header value as text when it is UTF-8, else its bytes as they are."""
    try:
        return value.decode()
    except UnicodeDecodeError:
        return value


def _original_headers(record: Record, key: str) -> list[tuple[str, str | bytes]]:
    headers: list[tuple[str, str | bytes]] = []
    for name, value in record.headers:
        lowered = name.lower()
        if lowered in OWN_HEADERS:
            continue  # an earlier dead letter's explanation (a replayed dead letter)
        if lowered == EVENT_ID_HEADER:
            if value != key.encode("utf-8", "surrogateescape"):  # hashed, trimmed: keep it
                headers.append((encoded_header_name(name), value))
        elif lowered in RESERVED_HEADERS:
            continue  # content-type: kept as dlt-original-content-type
        elif _storable(name):
            headers.append((name, value))
        else:
            headers.append((encoded_header_name(name), value))
    return headers


def lean_dead_letter_headers(
    headers: list[tuple[str, str | bytes]], too_large: BaseException
) -> list[tuple[str, str | bytes]]:
    """The dead letter's own headers without the record's: for a record too large to
    dead-letter whole (its value and headers stay readable at the original position)."""
    own = [(n, v) for n, v in headers if n.startswith(DLT_PREFIX) and n != LEFT_OUT_HEADER]
    own = [(n, v) for n, v in own if not n.startswith(ENCODED_HEADER_PREFIX)]
    note = f"value, key and original headers: {error_message(too_large, 500)}"
    return [*own, (LEFT_OUT_HEADER, note)]


def dead_letter_headers(
    record: Record,
    *,
    group_id: str,
    key: str,
    error: BaseException,
    attempts: int,
    reason: Reason,
) -> list[tuple[str, str | bytes]]:
    """The headers of the dead letter for ``record``, original ones first; every name and
    value storable, whatever the record carried (I10)."""
    headers = _original_headers(record, key)
    headers += [
        (REASON_HEADER, reason.value),
        (ERROR_TYPE_HEADER, _text(error_type_name(error))),
        (ERROR_MESSAGE_HEADER, _text(error_message(error))),
        (ATTEMPTS_HEADER, str(attempts)),
        (ORIGINAL_TOPIC_HEADER, _text(record.topic)),
        (ORIGINAL_PARTITION_HEADER, str(record.partition)),
        (ORIGINAL_OFFSET_HEADER, str(record.offset)),
        (ORIGINAL_EVENT_ID_HEADER, _text(key)),
        (CONSUMER_GROUP_HEADER, _text(group_id)),
    ]
    if record.timestamp_ms is not None:
        headers.append((ORIGINAL_TIMESTAMP_HEADER, str(record.timestamp_ms)))
    content_type = record.raw_header(CONTENT_TYPE_HEADER)
    if content_type is not None:
        headers.append((ORIGINAL_CONTENT_TYPE_HEADER, _raw_text(content_type)))
    return headers
