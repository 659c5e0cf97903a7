"""Event decoding, the typed-event registry (only registered types are built), dead letters."""

from __future__ import annotations

import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest

from consumer import Event, EventTypes, Record, UndecodableEvent, UnknownEventType
from consumer.deadletter import dead_letter_headers, dead_letter_id
from consumer.dedup import normalise_key
from consumer.event import decode_event, decode_value, outbox_event_id
from consumer.retry import Reason
from outbox.codec import encode_event
from outbox.errors import ConfigError


def _record(
    value: bytes | None, headers: list[tuple[str, bytes]] | None = None, **kw: Any
) -> Record:
    fields: dict[str, Any] = {
        "topic": "orders.v1",
        "partition": 2,
        "offset": 41,
        "key": b"alice",
        "value": value,
        "headers": tuple(headers or []),
        "timestamp_ms": 1_700_000_000_123,
    }
    fields.update(kw)
    return Record(**fields)


def _from_outbox(value: object, headers: dict[str, str] | None = None) -> Record:
    """The record the relay would produce for ``publish(value=value, headers=headers)``."""
    encoded = encode_event(
        topic="orders.v1",
        key="alice",
        value=value,
        headers=headers,
        event_id=None,
        max_message_bytes=None,
    )
    return _record(
        encoded.value, list(zip(encoded.header_names, encoded.header_values, strict=True))
    )


@dataclass(frozen=True)
class OrderPlaced:
    order_id: int
    total: str


def test_json_from_the_outbox_decodes_to_a_dict_with_all_fields() -> None:
    record = _from_outbox({"order_id": 1, "total": "9.50"}, {"event-type": "OrderPlaced"})
    event_id = outbox_event_id(record)
    assert event_id is not None
    uuid.UUID(event_id)
    event = decode_event(record, event_id)
    assert event.value == {"order_id": 1, "total": "9.50"}
    assert event.raw == b'{"order_id":1,"total":"9.50"}'
    assert (event.id, event.topic, event.partition, event.offset, event.key) == (
        event_id,
        "orders.v1",
        2,
        41,
        b"alice",
    )
    assert event.timestamp == datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)
    assert event.type == "OrderPlaced"
    assert event.header("Event-Type") == "OrderPlaced"
    assert event.content_type == "application/json"
    with pytest.raises(TypeError):
        event.headers["x"] = b"y"  # type: ignore[index]


@pytest.mark.parametrize(
    ("value", "expected"),
    [("héllo", "héllo"), (b"\x00\xff", b"\x00\xff"), ([1, 2], [1, 2]), (None, None)],
    ids=["text", "bytes", "json-list", "tombstone"],
)
def test_values_decode_by_the_content_type_publish_gave_them(
    value: object, expected: object
) -> None:
    record = _from_outbox(value)
    assert decode_event(record, "id").value == expected


def test_other_content_types() -> None:
    assert decode_value(b"caf\xe9", "text/plain; charset=latin-1") == "café"
    assert decode_value(b"\x01avro", "application/avro") == b"\x01avro"
    assert decode_value(b'{"a":1}', "application/cloudevents+json") == {"a": 1}
    assert decode_value(b'{"a":1}', None) == {"a": 1}  # other producers: JSON by default
    assert decode_value(b"raw", None, default_content_type="application/octet-stream") == b"raw"


@pytest.mark.parametrize(
    ("raw", "content_type", "match"),
    [
        (b"{not json", "application/json", "not valid JSON"),
        (b"\xff\xfe", "application/json", "not valid JSON"),
        (b"\xff", "text/plain; charset=utf-8", "not valid utf-8 text"),
        (b"x", "text/plain; charset=no-such-charset", "not valid no-such-charset text"),
    ],
)
def test_undecodable_values_raise_undecodable_event(
    raw: bytes, content_type: str, match: str
) -> None:
    with pytest.raises(UndecodableEvent, match=match):
        decode_value(raw, content_type)


def test_typed_registry_builds_only_registered_types() -> None:
    types = EventTypes()
    types.register("OrderPlaced", OrderPlaced)
    record = _from_outbox({"order_id": 7, "total": "1.00"}, {"event-type": "OrderPlaced"})
    assert decode_event(record, "id", types=types).value == OrderPlaced(7, "1.00")
    untyped = _from_outbox({"order_id": 7})
    assert decode_event(untyped, "id", types=types).value == {"order_id": 7}


@pytest.mark.parametrize("name", ["os:system", "subprocess.Popen", "builtins.eval", "Unknown"])
def test_typed_registry_refuses_unregistered_types_without_importing_anything(name: str) -> None:
    types = EventTypes()
    types.register("OrderPlaced", OrderPlaced)
    before = set(sys.modules)
    record = _from_outbox({"args": ["rm", "-rf", "/"]}, {"event-type": name})
    with pytest.raises(UnknownEventType, match=rf"event type '{name}' is not registered"):
        decode_event(record, "id", types=types)
    assert set(sys.modules) == before


def test_typed_registry_can_pass_unknown_types_as_dicts() -> None:
    types = EventTypes(unknown="dict")
    record = _from_outbox({"x": 1}, {"event-type": "Other"})
    assert decode_event(record, "id", types=types).value == {"x": 1}


def test_typed_registry_as_decorator_with_factory_and_custom_header() -> None:
    types = EventTypes(header="type")

    @types.register("Placed")
    @dataclass
    class Placed:
        order_id: int

    types.register("Total", factory=lambda doc: float(doc["total"]))
    assert types.decode("Placed", {"order_id": 1}) == Placed(1)
    assert types.decode("Total", {"total": "2.5"}) == 2.5
    assert types.names() == ["Placed", "Total"]
    assert "Placed" in types
    record = _from_outbox({"order_id": 3}, {"type": "Placed"})
    assert decode_event(record, "id", types=types).value == Placed(3)


def test_typed_registry_uses_model_validate_when_present() -> None:
    class Model:
        def __init__(self, doc: Any) -> None:
            self.doc = doc

        @classmethod
        def model_validate(cls, doc: Any) -> Model:
            return cls(doc)

    types = EventTypes()
    types.register("M", Model)
    assert types.decode("M", {"a": 1}).doc == {"a": 1}


def test_a_type_that_cannot_be_built_from_the_json_is_undecodable() -> None:
    types = EventTypes()
    types.register("OrderPlaced", OrderPlaced)
    with pytest.raises(UndecodableEvent, match="cannot build event type 'OrderPlaced'"):
        types.decode("OrderPlaced", {"unexpected": 1})
    with pytest.raises(UndecodableEvent, match="expected a JSON object"):
        types.decode("OrderPlaced", [1, 2])


def test_i8_bad_registrations_are_refused() -> None:
    types = EventTypes()
    types.register("OrderPlaced", OrderPlaced)
    types.register("OrderPlaced", OrderPlaced)  # the same again is harmless
    with pytest.raises(ConfigError, match="already registered"):
        types.register("OrderPlaced", dict)
    with pytest.raises(ConfigError, match="is not a class"):
        types.register("x", "os.system")  # type: ignore[call-overload]
    with pytest.raises(ConfigError, match="non-empty str"):
        types.register("", OrderPlaced)
    with pytest.raises(ConfigError, match="'reject' or 'dict'"):
        EventTypes(unknown="instantiate")  # type: ignore[arg-type]


def test_records_without_an_outbox_id_have_none() -> None:
    assert outbox_event_id(_record(b"{}", [("message-id", b"m-1")])) is None
    assert _record(b"{}").position == "orders.v1/2/41"


def test_long_dedup_keys_are_hashed_short_ones_kept() -> None:
    assert normalise_key("orders.v1/2/41") == "orders.v1/2/41"
    long = normalise_key("k" * 500)
    assert long.startswith("sha256:")
    assert len(long) == 7 + 64
    assert normalise_key("k" * 500) == long


def test_i7_dead_letter_headers_explain_the_failure_and_keep_the_original() -> None:
    record = _from_outbox({"order_id": 1}, {"event-type": "OrderPlaced", "trace": "abc"})
    record = Record(
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        value=record.value,
        headers=(*record.headers, ("dlt-reason", b"older")),
        timestamp_ms=record.timestamp_ms,
    )
    key = outbox_event_id(record)
    assert key is not None
    headers = dead_letter_headers(
        record,
        group_id="projector",
        key=key,
        error=ValueError("cannot connect to postgresql://app:hunter2@db/app"),
        attempts=3,
        reason=Reason.RETRIES_EXHAUSTED,
    )
    names = [n for n, _ in headers]
    values = dict(headers)
    assert names[:2] == ["event-type", "trace"]  # originals first, outbox's own removed
    assert "outbox-event-id" not in names
    assert "content-type" not in names
    assert names.count("dlt-reason") == 1
    assert values == {
        "event-type": b"OrderPlaced",
        "trace": b"abc",
        "dlt-reason": "retries-exhausted",
        "dlt-error-type": "ValueError",
        "dlt-error-message": "cannot connect to postgresql://app:***@db/app",
        "dlt-attempts": "3",
        "dlt-original-topic": "orders.v1",
        "dlt-original-partition": "2",
        "dlt-original-offset": "41",
        "dlt-original-event-id": key,
        "dlt-consumer-group": "projector",
        "dlt-original-timestamp": "1700000000123",
        "dlt-original-content-type": "application/json",
    }


def test_dead_letter_error_message_is_cut_and_id_is_stable() -> None:
    headers = dict(
        dead_letter_headers(
            _record(None),
            group_id="g",
            key="k",
            error=RuntimeError("x" * 5000),
            attempts=1,
            reason=Reason.NON_RETRYABLE,
        )
    )
    message = headers["dlt-error-message"]
    assert isinstance(message, str)
    assert len(message) == 2000
    assert message.endswith("...")
    assert dead_letter_id("g", "k") == dead_letter_id("g", "k")
    assert dead_letter_id("g", "k") != dead_letter_id("other", "k")


def test_event_is_a_frozen_value() -> None:
    event = Event(id="1", topic="t", partition=0, offset=0, key=None, value=None, raw=None)
    with pytest.raises(AttributeError):
        event.id = "2"  # type: ignore[misc]
