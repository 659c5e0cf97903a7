"""Encoding an event into a record: checked before any SQL (I8), sized as librdkafka sizes it."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from decimal import Decimal
from types import MappingProxyType
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer
from hypothesis import given, settings
from hypothesis import strategies as st

from outbox.codec import (
    BINARY,
    CONTENT_TYPE_HEADER,
    EVENT_ID_HEADER,
    JSON,
    TEXT,
    check_topic,
    encode_event,
    encode_headers,
    encode_key,
    encode_value,
    record_size,
)
from outbox.errors import EventError
from outbox.partitioner import shard_for
from tests.hypothesis_profiles import examples


def _event(**kw: Any) -> Any:
    args: dict[str, Any] = {
        "topic": "orders",
        "key": None,
        "value": None,
        "headers": None,
        "event_id": None,
        "max_message_bytes": None,
    }
    args.update(kw)
    return encode_event(**args)


# -- topic -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic", ["orders", "a", "Orders.v2", "my_topic-1", "x" * 249, "...", "_", "-"]
)
def test_legal_kafka_topic_names_pass(topic: str) -> None:
    assert check_topic(topic) == topic


@pytest.mark.parametrize(
    "topic",
    ["", ".", "..", "x" * 250, "has space", "slash/topic", "ümlaut", "colon:", "orders\n", "\n"],
)
def test_i6_illegal_topic_names_refused_at_publish(topic: str) -> None:
    with pytest.raises(EventError, match="not a legal Kafka topic name"):
        check_topic(topic)


def test_topic_with_trailing_newline_refused() -> None:
    # Regression: the pattern ended in '$', which also matches before a final newline.
    with pytest.raises(EventError):
        check_topic("orders\n")


@pytest.mark.parametrize("topic", [None, b"orders", 42])
def test_topic_must_be_str(topic: object) -> None:
    with pytest.raises(TypeError, match="topic must be a str"):
        check_topic(topic)


# -- key / value ---------------------------------------------------------------------------


def test_key_str_is_utf8_bytes_pass_through_none_stays_none() -> None:
    assert encode_key("clé") == "clé".encode()
    assert encode_key(b"\x00\xff") == b"\x00\xff"
    assert encode_key(None) is None


@pytest.mark.parametrize("key", [42, 1.5, bytearray(b"k"), ["k"], uuid.UUID(int=1)])
def test_key_of_other_types_refused(key: object) -> None:
    with pytest.raises(TypeError, match="key must be str, bytes or None"):
        encode_key(key)


def test_key_with_lone_surrogate_refused_with_a_clear_event_error() -> None:
    with pytest.raises(EventError, match="key is not valid Unicode"):
        encode_key("bad\ud800")


@pytest.mark.parametrize(
    ("value", "payload", "content_type"),
    [
        ({"b": 1, "a": [1, 2]}, b'{"b":1,"a":[1,2]}', JSON),
        ([1, "x", None, True], b'[1,"x",null,true]', JSON),
        ({"name": "Zoë"}, '{"name":"Zoë"}'.encode(), JSON),
        ("plain text", b"plain text", TEXT),
        (b"\x00raw", b"\x00raw", BINARY),
        (None, None, None),
    ],
)
def test_value_encodings_and_content_types(
    value: object, payload: bytes | None, content_type: str | None
) -> None:
    assert encode_value(value) == (payload, content_type)


def test_a_read_only_mapping_is_encoded_as_a_json_object() -> None:
    assert encode_value(MappingProxyType({"a": 1})) == (b'{"a":1}', JSON)


@pytest.mark.parametrize(
    "value",
    [
        {"amount": Decimal("NaN")},
        {"amount": Decimal("12345678901234567890.12")},  # a float would round it
        {"x": float("nan")},
        [float("inf")],
        {"when": object()},
    ],
)
def test_i8_value_json_cannot_represent_refused_with_the_fix(value: object) -> None:
    with pytest.raises(TypeError, match=r"not JSON-serialisable.*convert it"):
        encode_value(value)


@pytest.mark.parametrize(
    ("value", "payload"), [(42, b"42"), (1.5, b"1.5"), (True, b"true"), (("a",), b'["a"]')]
)
def test_other_json_values_are_encoded_as_json(value: object, payload: bytes) -> None:
    assert encode_value(value) == (payload, JSON)


@pytest.mark.parametrize("value", [bytearray(b"x"), memoryview(b"x")])
def test_byte_buffers_other_than_bytes_refused(value: object) -> None:
    with pytest.raises(TypeError, match=r"pass bytes\(value\)"):
        encode_value(value)


def test_value_with_lone_surrogate_refused() -> None:
    with pytest.raises(EventError, match="value is not valid Unicode"):
        encode_value({"s": "\udfff"})


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
    max_leaves=10,
)


# Containers drawn as such, not filtered out of every JSON value (most draws were leaves).
@given(st.lists(JSON_VALUES, max_size=4) | st.dictionaries(st.text(), JSON_VALUES, max_size=4))
def test_json_values_round_trip(value: Any) -> None:
    payload, content_type = encode_value(value)
    assert content_type == JSON
    assert payload is not None
    assert json.loads(payload) == value


# -- headers -------------------------------------------------------------------------------


def test_headers_from_a_mapping_or_pairs_keep_order_and_duplicates() -> None:
    mapping: dict[str, str | bytes] = {"a": "1", "b": b"2"}
    assert encode_headers(mapping) == (["a", "b"], [b"1", b"2"])
    assert encode_headers([("a", "1"), ("a", b"2")]) == (["a", "a"], [b"1", b"2"])
    assert encode_headers(None) == ([], [])


@pytest.mark.parametrize("name", [EVENT_ID_HEADER, CONTENT_TYPE_HEADER, "Outbox-Event-ID"])
def test_reserved_header_names_refused_case_insensitively(name: str) -> None:
    with pytest.raises(EventError, match="set by the outbox itself"):
        encode_headers({name: "x"})


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"": "x"}, "non-empty str"),
        ([(1, "x")], "non-empty str"),
        ({"h": 1}, "must be str or bytes"),
        ({"h": None}, "must be str or bytes"),
        ("h=v", "not a single str/bytes"),
        ([("h", "v", "extra")], r"\(name, value\) pairs"),
        (["hv"], r"\(name, value\) pairs"),
    ],
)
def test_malformed_headers_refused(headers: Any, message: str) -> None:
    with pytest.raises(TypeError, match=message):
        encode_headers(headers)


# -- the whole event -----------------------------------------------------------------------


def test_event_carries_its_id_and_content_type_as_headers() -> None:
    event_id = uuid.uuid4()
    event = _event(key="k", value={"a": 1}, headers={"trace": "t"}, event_id=event_id)
    assert event.event_id == event_id
    assert event.header_names == ["trace", EVENT_ID_HEADER, CONTENT_TYPE_HEADER]
    assert event.header_values == [b"t", str(event_id).encode(), JSON.encode()]
    assert event.shard == shard_for(b"k", event_id)


def test_event_without_value_has_no_content_type_header() -> None:
    event = _event()
    assert event.header_names == [EVENT_ID_HEADER]
    assert isinstance(event.event_id, uuid.UUID)


def test_event_id_must_be_a_uuid() -> None:
    with pytest.raises(TypeError, match=r"event_id must be a uuid\.UUID"):
        _event(event_id=str(uuid.uuid4()))


def test_i8_oversized_event_refused_at_publish_naming_the_setting() -> None:
    event = _event(value=b"x" * 500)
    with pytest.raises(EventError, match=r"max_message_bytes=.*message\.max\.bytes"):
        _event(value=b"x" * 500, max_message_bytes=event.size - 1)
    assert _event(value=b"x" * 500, max_message_bytes=event.size).size == event.size


def test_size_counts_header_names_in_utf8_bytes() -> None:
    ascii_name = _event(headers={"ab": "v"}, event_id=uuid.UUID(int=0))
    two_byte_chars = _event(headers={"éé": "v"}, event_id=uuid.UUID(int=0))
    assert two_byte_chars.size - ascii_name.size == 2


# -- size as librdkafka computes it --------------------------------------------------------

LIMIT = 2000  # message.max.bytes of the probe producer (librdkafka's minimum is 1000)


@pytest.fixture(scope="module")
def probe() -> Iterator[Any]:
    """A producer with no broker: librdkafka checks message.max.bytes inside produce()."""
    producer = Producer(
        {"bootstrap.servers": "127.0.0.1:1", "message.max.bytes": LIMIT, "log_level": 0}
    )
    yield producer
    producer.purge()
    producer.flush(0)


def _accepted(producer: Any, key: bytes | None, value: bytes, headers: list[Any]) -> bool:
    try:
        producer.produce("t", key=key, value=value, headers=headers)
    except KafkaException as exc:
        code = exc.args[0].code()
    else:
        return True
    assert code == KafkaError.MSG_SIZE_TOO_LARGE
    return False


header_names = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=150)


@settings(deadline=None, max_examples=examples(150))
@given(
    key=st.none() | st.binary(max_size=200),
    headers=st.lists(
        st.tuples(header_names, st.none() | st.binary(max_size=200)).filter(lambda h: h[0] != ""),
        max_size=12,
    ),
)
def test_i6_record_size_is_exactly_librdkafkas_message_max_bytes_check(
    probe: Any, key: bytes | None, headers: list[tuple[str, bytes | None]]
) -> None:
    room = LIMIT - record_size(key, b"", headers)
    if room < 1:
        return
    fits = b"x" * room
    assert record_size(key, fits, headers) == LIMIT
    assert _accepted(probe, key, fits, headers), "a record of exactly the limit is sent"
    assert not _accepted(probe, key, fits + b"x", headers), "one byte more is refused"


def test_encoded_event_size_matches_librdkafka(probe: Any) -> None:
    def encoded(value: bytes) -> Any:
        return _event(key="k", value=value, headers={"trace": "t" * 100})

    pad = LIMIT - encoded(b"").size
    for value, size, accepted in [(b"x" * pad, LIMIT, True), (b"x" * (pad + 1), LIMIT + 1, False)]:
        event = encoded(value)
        headers = list(zip(event.header_names, event.header_values, strict=True))
        assert event.size == size
        assert _accepted(probe, event.key, event.value, headers) is accepted
