"""The delivery record's decisions: which daily partitions exist, which expire, key hashes."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any, NamedTuple

import pytest
from psycopg.adapt import Transformer
from psycopg.pq import Format

from outbox.relay.deliveries import (
    INT8,
    Packed,
    batch_params,
    day_start,
    key_hash,
    pack_ints,
    packed_params,
    partition_day,
    partition_name,
    plan_partitions,
)

D = dt.date(2026, 12, 7)


def days(*offsets: int) -> list[dt.date]:
    return [D + dt.timedelta(days=n) for n in offsets]


@pytest.mark.parametrize(
    ("existing", "retention", "create", "drop"),
    [
        ([], 7, days(0, 1, 2), []),  # a fresh table: today and two days ahead
        (days(0, 1, 2), 7, [], []),  # all there: nothing to do
        (days(-1, 0, 1), 7, days(2), []),  # a day passed: one more ahead
        (days(-8, -7, 0, 1, 2), 7, [], days(-8)),  # -7 still holds rows 7 days old
        (days(-30, -10, 0, 1, 2), 7, [], days(-30, -10)),
        (days(-1, 0, 1, 2), 1, [], []),  # yesterday's rows may be younger than a day
        (days(-2, -1, 0, 1, 2), 1, [], days(-2)),
        (days(5), 7, days(0, 1, 2), []),  # a partition far ahead (a clock once ahead) stays
    ],
)
def test_i2_delivery_partitions_are_made_ahead_and_dropped_only_once_past_retention(
    existing: list[dt.date], retention: int, create: list[dt.date], drop: list[dt.date]
) -> None:
    plan = plan_partitions(D, existing, retention)
    assert list(plan.create) == create
    assert list(plan.drop) == drop
    assert plan.expire_before == day_start(D - dt.timedelta(days=retention))


def test_partition_names_round_trip_and_other_tables_are_not_days() -> None:
    assert partition_name(D) == "outbox_deliveries_p20261207"
    assert partition_day(partition_name(D)) == D
    assert partition_day("outbox_deliveries_default") is None
    assert partition_day("outbox_deliveries_p2026120") is None


def test_key_hash_is_stable_signed_64_bit_and_none_for_no_key() -> None:
    assert key_hash(None) is None
    assert key_hash(b"order-1") == key_hash(b"order-1")
    assert key_hash(b"order-1") != key_hash(b"order-2")
    assert all(-(2**63) <= key_hash(bytes([i])) < 2**63 for i in range(256))  # type: ignore[operator]
    # The first 8 bytes of SHA-256, big-endian signed (what the SQL side computes).
    assert key_hash(b"") == int.from_bytes(bytes.fromhex("e3b0c44298fc1c14"), "big", signed=True)


class _Row(NamedTuple):
    id: int
    event_id: uuid.UUID
    topic: str
    key: bytes | None


def test_batch_params_put_each_event_at_its_delivery_reports_place() -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    rows = [_Row(10, a, "t", b"k"), _Row(11, b, "u", None)]
    params = batch_params(rows, {11: (3, 42), 10: (0, 7)})
    assert params == {
        "event_ids": [a, b],
        "ids": [10, 11],
        "topics": ["t", "u"],
        "partitions": [0, 3],
        "offsets": [7, 42],
        "keys": [b"k", None],
    }


def _load(packed: Packed) -> Any:
    """What PostgreSQL's binary array receive would read (psycopg's own binary loader)."""
    loader = Transformer().get_loader(packed.oid, Format.BINARY)
    return loader.load(packed.data)


def test_i2_pre_encoded_arrays_read_back_as_the_batchs_values() -> None:
    """The record's arrays are built in PostgreSQL's binary format by hand; psycopg's binary
    loaders read each back as the values it was built from (NULL keys, repeated topics,
    the extremes of each integer type)."""
    ids = [uuid.uuid4(), uuid.uuid4(), uuid.uuid4()]
    params: dict[str, list[Any]] = {
        "event_ids": ids,
        "ids": [1, 2**63 - 1, 3],
        "topics": ["orders", "orders", "payments.é"],
        "partitions": [0, 2**31 - 1, -1],
        "offsets": [0, 2**62, 7],
        "keys": [b"k", None, b""],
    }
    packed = packed_params(params)
    assert {name: _load(p) for name, p in packed.items()} == params
    assert _load(pack_ints([], INT8)) == []
