"""The delivery record's decisions: which daily partitions exist, which expire, key hashes."""

from __future__ import annotations

import datetime as dt

import pytest

from outbox.relay.deliveries import (
    day_start,
    key_hash,
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
