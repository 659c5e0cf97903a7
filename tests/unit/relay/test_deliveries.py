"""The delivery record's decisions: which daily partitions exist, which expire, key hashes,
and the batch's pre-encoded arrays."""

from __future__ import annotations

import datetime as dt
import struct

import pytest

from outbox.event_ids import new_event_id
from outbox.relay.deliveries import (
    Packed,
    batch_params,
    day_start,
    draft,
    key_hash,
    partition_day,
    partition_name,
    plan_partitions,
)
from outbox.relay.rows import Row

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


def _int8s(packed: Packed) -> list[int | None]:
    """Read back an int8[] in PostgreSQL's binary array format."""
    data = packed.data
    _dims, _nulls, _oid, n, _lower = struct.unpack_from(">iiiii", data)
    out: list[int | None] = []
    at = 20
    for _ in range(n):
        (size,) = struct.unpack_from(">i", data, at)
        at += 4
        if size == -1:
            out.append(None)
            continue
        out.append(struct.unpack_from(">q", data, at)[0])
        at += size
    return out


def test_i2_a_batchs_key_hashes_are_the_relays_hashes_with_null_for_no_key() -> None:
    """The batch's record carries each key's hash as the relay computes it (the same value
    recovery's SQL computes), NULL for a record without a key."""
    keys = [b"a", None, b"", bytes(range(256)), b"a"]
    rows = [Row(i, new_event_id(), "t", k, b"", [], [], 0, 0) for i, k in enumerate(keys)]
    params = batch_params(rows, {r.id: (0, r.id) for r in rows})
    assert "keys" not in params  # the keys themselves do not go to the server
    assert _int8s(params["key_hashes"]) == [key_hash(k) for k in keys]
    assert _int8s(params["offsets"]) == [r.id for r in rows]


def test_i2_a_draft_packed_during_the_flush_is_used_only_for_the_rows_it_was_made_of() -> None:
    """The relay packs the record's row-only arrays while the broker acknowledges the batch;
    a draft of other rows (a stale one) must never describe this batch."""
    rows = [Row(i, new_event_id(), "t", b"k", b"", [], [], 0, 0) for i in range(3)]
    others = [Row(i + 10, new_event_id(), "t", None, b"", [], [], 0, 0) for i in range(3)]
    placed = {r.id: (1, r.id + 100) for r in rows}
    drafted = draft(rows)
    assert batch_params(rows, placed, drafted=drafted)["ids"] is drafted.params["ids"]
    stale = batch_params(rows, placed, drafted=draft(others))
    assert _int8s(stale["ids"]) == [0, 1, 2]
    assert _int8s(stale["key_hashes"]) == [key_hash(b"k")] * 3
    assert _int8s(stale["offsets"]) == [100, 101, 102]
