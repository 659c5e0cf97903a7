"""Turning a caller's event into the bytes of a Kafka record: pure, checked before any SQL."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, is_dataclass
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from enum import Enum
from pathlib import PurePath
from typing import Any

from outbox.errors import EventError, EventTooLarge
from outbox.event_ids import new_event_id
from outbox.partitioner import shard_for

EVENT_ID_HEADER = "outbox-event-id"
CONTENT_TYPE_HEADER = "content-type"
RESERVED_HEADERS = frozenset({EVENT_ID_HEADER, CONTENT_TYPE_HEADER})

JSON = "application/json"
TEXT = "text/plain; charset=utf-8"
BINARY = "application/octet-stream"

# Kafka's own rule (org.apache.kafka.common.internals.Topic): legal chars, <= 249, not . or ..
_TOPIC_RE = re.compile(r"[a-zA-Z0-9._-]{1,249}")
# librdkafka's RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD: the per-record bytes it adds to key + value
# + headers before comparing with message.max.bytes (each header adds its two varint lengths).
RECORD_OVERHEAD = 36

Value = Mapping[str, Any] | list[Any] | str | bytes | None
JsonDefault = Callable[[Any], Any]
"""Like ``json.dumps(default=...)``: return a JSON-able stand-in, or raise TypeError."""
Headers = Mapping[str, str | bytes] | Iterable[tuple[str, str | bytes]]


def _varint_size(n: int) -> int:
    """Bytes of a zig-zag varint, as Kafka's v2 record format encodes lengths."""
    zigzag = (n << 1) ^ (n >> 63)
    size = 1
    while zigzag >= 0x80:
        zigzag >>= 7
        size += 1
    return size


def record_size(
    key: bytes | None, value: bytes | None, headers: Iterable[tuple[str, bytes | None]]
) -> int:
    """The size librdkafka compares with ``message.max.bytes`` (refused when above it)."""
    size = RECORD_OVERHEAD + len(key or b"") + len(value or b"")
    for name, raw in headers:
        name_bytes = name.encode()
        size += _varint_size(len(name_bytes)) + len(name_bytes)
        size += _varint_size(-1 if raw is None else len(raw)) + len(raw or b"")
    return size


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
        return record_size(
            self.key, self.value, zip(self.header_names, self.header_values, strict=True)
        )


def check_topic(topic: object) -> str:
    if not isinstance(topic, str):
        raise TypeError(f"topic must be a str, got {type(topic).__name__}")
    if topic in {".", ".."} or not _TOPIC_RE.fullmatch(topic):
        raise EventError(
            f"topic {topic!r} is not a legal Kafka topic name: use 1-249 characters "
            "from [a-zA-Z0-9._-], not '.' or '..'"
        )
    return topic


def _utf8(text: str, what: str) -> bytes:
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        raise EventError(
            f"{what} is not valid Unicode text ({exc.reason} at index {exc.start}); "
            "pass bytes if it is binary"
        ) from None


def encode_key(key: object) -> bytes | None:
    if key is None or isinstance(key, bytes):
        return key
    if isinstance(key, str):
        return _utf8(key, "key")
    raise TypeError(f"key must be str, bytes or None, got {type(key).__name__}")


def _decimal(value: Decimal) -> int | float:
    """A JSON number, as FastAPI's encoder writes it (int when whole), never silently rounded."""
    if not value.is_finite():
        raise ValueError(f"Decimal {value} has no JSON number")
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent >= 0:
        return int(value)
    number = float(value)
    if Decimal(repr(number)) != value:
        raise TypeError(
            f"Decimal {value} has more digits than a JSON number keeps once read as a float: "
            "pass str(value), or a json_default that does"
        )
    return number


def jsonable(obj: Any) -> Any:
    """The built-in conversions for what ``json`` cannot write, the way FastAPI encodes them.

    Decimal -> number, datetime/date/time -> ISO 8601, timedelta -> seconds, UUID and
    paths -> str, Enum -> its value, set -> list, dataclass -> object of its fields,
    pydantic model -> ``model_dump(mode="json")``.
    """
    if isinstance(obj, Decimal):
        return _decimal(obj)
    if isinstance(obj, datetime | date | time):
        return obj.isoformat()
    if isinstance(obj, timedelta):
        return obj.total_seconds()
    if isinstance(obj, uuid.UUID | PurePath):
        return str(obj)
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, set | frozenset):
        return list(obj)
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: getattr(obj, f.name) for f in fields(obj)}
    dump = getattr(obj, "model_dump", None)  # pydantic v2, without importing it
    if callable(dump) and not isinstance(obj, type):
        return dump(mode="json")
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def _json_default(custom: JsonDefault | None) -> JsonDefault:
    """The caller's encoder first; what it refuses with TypeError goes to ``jsonable``."""
    if custom is None:
        return jsonable

    def default(obj: Any) -> Any:
        try:
            return custom(obj)
        except TypeError:
            return jsonable(obj)

    return default


def encode_value(
    value: object, json_default: JsonDefault | None = None
) -> tuple[bytes | None, str | None]:
    """(payload, content type): bytes as they are, str as UTF-8 text, anything else as JSON.

    JSON takes dicts, lists and scalars, plus what ``jsonable`` converts (Decimal,
    datetime, UUID, Enum, dataclasses, pydantic models...) and whatever
    ``json_default`` converts. It refuses NaN and infinities. Like ``json.dumps``
    it turns tuples into lists and non-str dict keys into str.
    """
    if value is None:
        return None, None
    if isinstance(value, bytes):
        return value, BINARY
    if isinstance(value, str):
        return _utf8(value, "value"), TEXT
    if isinstance(value, bytearray | memoryview):
        raise TypeError(f"value is a {type(value).__name__}: pass bytes(value)")
    if isinstance(value, Mapping) and not isinstance(value, dict):
        value = dict(value)
    try:
        text = json.dumps(
            value,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
            default=_json_default(json_default),
        )
    except RecursionError:
        raise TypeError(
            "value is nested too deeply to encode as JSON (or refers to itself); flatten it, "
            "or pass bytes you encoded yourself"
        ) from None
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"value is not JSON-serialisable ({exc}); convert it to plain "
            "dict/list/str/int/float/bool/None first, or pass a json_default to "
            "publish() or outbox.configure()"
        ) from exc
    return _utf8(text, "value"), JSON


def encode_headers(headers: Headers | None) -> tuple[list[str], list[bytes]]:
    if headers is None:
        return [], []
    if isinstance(headers, str | bytes):
        raise TypeError("headers must be a mapping or (name, value) pairs, not a single str/bytes")
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    names: list[str] = []
    values: list[bytes] = []
    for pair in pairs:
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise TypeError(f"headers must be (name, value) pairs, got {pair!r}")
        name, raw = pair
        if not isinstance(name, str) or not name:
            raise TypeError(f"header names must be non-empty str, got {name!r}")
        if "\x00" in name:  # header names are stored as PostgreSQL text, which refuses NUL
            raise EventError(f"header name {name!r} contains a NUL character; rename the header")
        if name.lower() in RESERVED_HEADERS:
            raise EventError(f"header {name!r} is set by the outbox itself; rename your header")
        _utf8(name, f"header name {name!r}")
        if isinstance(raw, str):
            values.append(_utf8(raw, f"header {name!r}"))
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
    context_headers: Sequence[tuple[str, bytes]] = (),
    json_default: JsonDefault | None = None,
) -> EncodedEvent:
    """Validate and encode; raises TypeError/EventError before the caller's transaction sees SQL.

    ``context_headers`` (the trace context) are added unless the caller set the same names.
    """
    if event_id is None:
        event_id = new_event_id()
    elif not isinstance(event_id, uuid.UUID):
        raise TypeError(f"event_id must be a uuid.UUID, got {type(event_id).__name__}")
    topic = check_topic(topic)
    key_bytes = encode_key(key)
    payload, content_type = encode_value(value, json_default)
    names, values = encode_headers(headers)
    for name, raw in context_headers:
        if name not in names:
            names.append(name)
            values.append(raw)
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
        raise EventTooLarge(
            f"event for topic {topic!r} is {event.size} bytes, above "
            f"max_message_bytes={max_message_bytes} (the producer's message.max.bytes): "
            "Kafka would refuse it; store the payload elsewhere and publish a reference, "
            "or raise message.max.bytes on the broker, topic and relay together and "
            "outbox.configure(max_message_bytes=...) to match"
        )
    return event
