"""publish()'s JSON encoding of the types applications hand it, round-tripped through the
consumer's decoding: what a handler receives for each, and the caller's own encoder."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from enum import Enum, IntEnum
from pathlib import PurePosixPath
from typing import Any

import pytest
from pydantic import BaseModel

from consumer.event import EventTypes, decode_value
from consumer.testing import record
from outbox.codec import JSON, encode_event, encode_value

ORDER_ID = uuid.UUID("6f1c2d7e-9a43-4c1e-8a55-1f2e3d4c5b6a")


class Color(Enum):
    RED = "red"


class Priority(IntEnum):
    HIGH = 1


@dataclass
class Line:
    sku: str
    price: Decimal


@dataclass
class Order:
    order_id: uuid.UUID
    lines: list[Line]
    placed_at: datetime


class OrderPlaced(BaseModel):
    order_id: uuid.UUID
    total: Decimal
    placed_at: datetime
    color: Color


def round_trip(value: object, **kwargs: Any) -> Any:
    """Encode as publish() does, decode as the consumer does."""
    payload, content_type = encode_value(value, **kwargs)
    assert content_type == JSON
    return decode_value(payload, content_type)


@pytest.mark.parametrize(
    ("value", "received"),
    [
        (Decimal("19.99"), 19.99),
        (Decimal("19.990"), 19.99),
        (Decimal("42"), 42),
        (Decimal("1E+2"), 100),
        (datetime(2026, 12, 2, 3, 4, 5, 123456, tzinfo=UTC), "2026-12-02T03:04:05.123456+00:00"),
        (datetime(2026, 12, 2, 3, 4, 5), "2026-12-02T03:04:05"),
        (date(2026, 12, 2), "2026-12-02"),
        (time(3, 4, 5), "03:04:05"),
        (timedelta(minutes=1, milliseconds=500), 60.5),
        (ORDER_ID, str(ORDER_ID)),
        (Color.RED, "red"),
        (Priority.HIGH, 1),
        ({"a"}, ["a"]),
        (frozenset({1}), [1]),
        (PurePosixPath("/tmp/x"), "/tmp/x"),
    ],
)
def test_each_type_reaches_the_handler_as_fastapi_would_encode_it(
    value: object, received: object
) -> None:
    assert round_trip({"v": value}) == {"v": received}


def test_decimal_values_are_exact_json_numbers() -> None:
    assert encode_value({"total": Decimal("0.10")})[0] == b'{"total":0.1}'
    assert Decimal(str(round_trip(Decimal("12345.67")))) == Decimal("12345.67")


def test_a_decimal_a_float_would_round_is_refused_with_the_fix() -> None:
    with pytest.raises(TypeError, match=r"more digits.*str\(value\)"):
        encode_value({"total": Decimal("0.1000000000000000055511151231257827")})


def test_dataclasses_nested_with_other_types() -> None:
    order = Order(ORDER_ID, [Line("sku-1", Decimal("2.50"))], datetime(2026, 1, 2, tzinfo=UTC))
    assert round_trip(order) == {
        "order_id": str(ORDER_ID),
        "lines": [{"sku": "sku-1", "price": 2.5}],
        "placed_at": "2026-01-02T00:00:00+00:00",
    }


def test_pydantic_model_round_trips_to_the_same_model_through_event_types() -> None:
    event = OrderPlaced(
        order_id=ORDER_ID,
        total=Decimal("19.99"),
        placed_at=datetime(2026, 12, 2, tzinfo=UTC),
        color=Color.RED,
    )
    payload, content_type = encode_value(event)
    types = EventTypes()
    types.register("OrderPlaced", OrderPlaced)
    assert decode_value(payload, content_type, type_name="OrderPlaced", types=types) == event
    assert round_trip(event)["total"] == "19.99"  # pydantic's JSON mode: Decimal as text


def test_a_record_built_like_publish_decodes_to_the_same_values() -> None:
    rec = record("orders.v1", {"at": date(2026, 1, 2), "id": ORDER_ID}, key="k")
    assert rec.header("content-type") == JSON
    assert decode_value(rec.value, rec.header("content-type")) == {
        "at": "2026-01-02",
        "id": str(ORDER_ID),
    }


class Money:
    def __init__(self, cents: int) -> None:
        self.cents = cents


def money_as_text(obj: object) -> object:
    if isinstance(obj, Money):
        return f"{obj.cents / 100:.2f} EUR"
    if isinstance(obj, Decimal):
        return str(obj)  # overrides the built-in number
    raise TypeError(type(obj).__name__)


def test_a_custom_encoder_goes_first_and_leaves_the_rest_to_the_built_in_one() -> None:
    value = {"price": Money(1999), "exact": Decimal("0.10"), "when": date(2026, 1, 2)}
    assert round_trip(value, json_default=money_as_text) == {
        "price": "19.99 EUR",
        "exact": "0.10",
        "when": "2026-01-02",
    }


def test_what_neither_encoder_knows_is_refused_naming_the_hook() -> None:
    with pytest.raises(TypeError, match=r"Money is not JSON serializable.*json_default"):
        encode_value({"price": Money(1)})
    with pytest.raises(TypeError, match="not JSON serializable"):
        encode_value({"x": object()}, json_default=money_as_text)


def test_encode_event_passes_the_encoder_on() -> None:
    event = encode_event(
        topic="t",
        key=None,
        value={"price": Money(250)},
        headers=None,
        event_id=None,
        max_message_bytes=None,
        json_default=money_as_text,
    )
    assert event.value == b'{"price":"2.50 EUR"}'
