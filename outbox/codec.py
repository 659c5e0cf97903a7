"""Turning a caller's event into the bytes of a Kafka record: pure, checked before any SQL."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from outbox.errors import EventError
from outbox.partitioner import shard_for

EVENT_ID_HEADER = "outbox-event-id"
CONTENT_TYPE_HEADER = "content-type"
RESERVED_HEADERS = frozenset({EVENT_ID_HEADER, CONTENT_TYPE_HEADER})

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
BINARY = "application/octet-stream"

# Kafka's own rule (org.apache.kafka.common.internals.Topic): legal chars, <= 249, not . or ..
_TOPIC_RE = re.compile(r"^[a-zA-Z0-9._-]{1,249}$")
# Bytes librdkafka adds per record on top of key+value+headers (v2 record overhead, rounded up).
RECORD_OVERHEAD = 64

Value = Mapping[str, Any] | list[Any] | str | bytes | None
Headers = Mapping[str, str | bytes] | Iterable[tuple[str, str | bytes]]


@dataclass(frozen=True, slots=True)
class EncodedEvent:
    """One outbox row, ready to insert."""

    event_id: uuid.UUID
    topic: str
    shard: int
    key: bytes | None
    value: bytes | None
    header_names: list[str]
    header_values: list[bytes]

    @property
    def size(self) -> int:
        """What librdkafka compares against ``message.max.bytes``."""
        return (
            len(self.key or b"")
            + len(self.value or b"")
            + sum(len(n) + len(v) for n, v in zip(self.header_names, self.header_values, strict=True))
            + RECORD_OVERHEAD
        )


def check_topic(topic: object) -> str:
    if not isinstance(topic, str):
        raise TypeError(f"topic must be a str, got {type(topic).__name__}")
    if topic in {".", ".."} or not _TOPIC_RE.match(topic):
        raise EventError(
            f"topic {topic!r} is not a legal Kafka topic name: use 1-249 characters "
            "from [a-zA-Z0-9._-], not '.' or '..'"
        )
    return topic


def encode_key(key: object) -> bytes | None:
    if key is None or isinstance(key, bytes):
        return key
    if isinstance(key, str):
        return key.encode()
    raise TypeError(f"key must be str, bytes or None, got {type(key).__name__}")


def encode_value(value: object) -> tuple[bytes | None, str | None]:
    """(payload, content type). JSON for dict/list; refuses anything it cannot round-trip."""
    if value is None:
        return None, None
    if isinstance(value, bytes):
        return value, BINARY
    if isinstance(value, str):
        return value.encode(), TEXT
    if isinstance(value, Mapping | list):
        try:
            text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"value is not JSON-serialisable ({exc}); convert it to plain "
                "dict/list/str/int/float/bool/None first (e.g. Decimal -> str)"
            ) from exc
        return text.encode(), JSON
    raise TypeError(
        f"value must be dict, list, str, bytes or None, got {type(value).__name__}; "
        "serialise it yourself and pass bytes"
    )


def encode_headers(headers: Headers | None) -> tuple[list[str], list[bytes]]:
    if headers is None:
        return [], []
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    names: list[str] = []
    values: list[bytes] = []
    for name, raw in pairs:
        if not isinstance(name, str) or not name:
            raise TypeError(f"header names must be non-empty str, got {name!r}")
        if name.lower() in RESERVED_HEADERS:
            raise EventError(f"header {name!r} is set by the outbox itself; rename your header")
        if isinstance(raw, str):
            values.append(raw.encode())
        elif isinstance(raw, bytes):
            values.append(raw)
        else:
            raise TypeError(f"header {name!r} must be str or bytes, got {type(raw).__name__}")
        names.append(name)
    return names, values


def encode_event(
    *,
    topic: object,
    key: object,
    value: object,
    headers: Headers | None,
    event_id: uuid.UUID | None,
    max_message_bytes: int | None,
) -> EncodedEvent:
    """Validate and encode; raises TypeError/EventError before the caller's transaction sees SQL."""
    if event_id is None:
        event_id = uuid.uuid4()
    elif not isinstance(event_id, uuid.UUID):
        raise TypeError(f"event_id must be a uuid.UUID, got {type(event_id).__name__}")
    topic = check_topic(topic)
    key_bytes = encode_key(key)
    payload, content_type = encode_value(value)
    names, values = encode_headers(headers)
    names.append(EVENT_ID_HEADER)
    values.append(str(event_id).encode())
    if content_type is not None:
        names.append(CONTENT_TYPE_HEADER)
        values.append(content_type.encode())
    event = EncodedEvent(
        event_id=event_id,
        topic=topic,
        shard=shard_for(key_bytes, event_id),
        key=key_bytes,
        value=payload,
        header_names=names,
        header_values=values,
    )
    if max_message_bytes is not None and event.size > max_message_bytes:
        raise EventError(
            f"event for topic {topic!r} is {event.size} bytes, above the configured "
            f"max_message_bytes={max_message_bytes} (the producer's message.max.bytes): "
            "Kafka would refuse it; store the payload elsewhere and publish a reference, "
            "or raise message.max.bytes on the broker, topic and relay together"
        )
    return event
