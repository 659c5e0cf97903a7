"""I3: keys hash exactly like Kafka's Java client, and slots split the shards disjointly."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outbox.partitioner import (
    SHARD_COUNT,
    murmur2,
    partition_for,
    shard_for,
    shards_of_slot,
    slot_of_shard,
    to_positive,
)
from outbox.relay import notified_slot

# org.apache.kafka.common.utils.UtilsTest#testMurmur2
JAVA_VECTORS = [
    (b"21", -973932308),
    (b"foobar", -790332482),
    (b"a-little-bit-long-string", -985981536),
    (b"a-little-bit-longer-string", -1486304829),
    (b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8", -58897971),
    (b"abc", 479470107),
]


def _java_int(n: int) -> int:
    n &= 0xFFFFFFFF
    return n - (1 << 32) if n >= 1 << 31 else n


def _java_murmur2(data: bytes) -> int:
    """A literal transliteration of Utils.murmur2 with Java int arithmetic, as an oracle."""
    length = len(data)
    seed = _java_int(0x9747B28C)
    m = 0x5BD1E995
    r = 24

    def ushr(x: int, n: int) -> int:  # Java's >>>
        return (x & 0xFFFFFFFF) >> n

    h = _java_int(seed ^ length)
    for i in range(length // 4):
        i4 = i * 4
        k = data[i4] + (data[i4 + 1] << 8) + (data[i4 + 2] << 16) + (data[i4 + 3] << 24)
        k = _java_int(k * m)
        k = _java_int(k ^ ushr(k, r))
        k = _java_int(k * m)
        h = _java_int(h * m)
        h = _java_int(h ^ k)
    rest = length % 4
    base = length & ~3
    if rest == 3:
        h = _java_int(h ^ (data[base + 2] << 16))
    if rest >= 2:
        h = _java_int(h ^ (data[base + 1] << 8))
    if rest >= 1:
        h = _java_int(h ^ data[base])
        h = _java_int(h * m)
    h = _java_int(h ^ ushr(h, 13))
    h = _java_int(h * m)
    return _java_int(h ^ ushr(h, 15))


@pytest.mark.parametrize(("data", "expected"), JAVA_VECTORS)
def test_i3_murmur2_matches_kafka_java_test_vectors(data: bytes, expected: int) -> None:
    assert murmur2(data) == expected


@given(st.binary(max_size=64))
def test_i3_murmur2_matches_java_int_arithmetic_for_every_tail_length(data: bytes) -> None:
    assert _java_murmur2(data) == murmur2(data)


@given(st.binary(max_size=64))
def test_murmur2_is_a_signed_32_bit_int(data: bytes) -> None:
    assert -(2**31) <= murmur2(data) < 2**31


def test_to_positive_masks_the_sign_bit_like_java_utils_to_positive() -> None:
    assert to_positive(-1) == 0x7FFFFFFF
    assert to_positive(-(2**31)) == 0
    assert to_positive(5) == 5


@pytest.mark.parametrize(("data", "hashed"), JAVA_VECTORS)
@pytest.mark.parametrize("partitions", [1, 3, 4, 12, 32, 100])
def test_i3_partition_for_is_javas_to_positive_hash_mod_partitions(
    data: bytes, hashed: int, partitions: int
) -> None:
    assert partition_for(data, partitions) == (hashed & 0x7FFFFFFF) % partitions


@pytest.mark.parametrize("partitions", [0, -1])
def test_partition_for_refuses_a_partition_count_below_one(partitions: int) -> None:
    with pytest.raises(ValueError, match="partitions"):
        partition_for(b"k", partitions)


@given(st.binary(max_size=32), st.uuids(), st.uuids())
def test_i3_every_event_of_a_key_lands_in_one_shard(
    key: bytes, first: uuid.UUID, second: uuid.UUID
) -> None:
    assert shard_for(key, first) == shard_for(key, second) == partition_for(key, SHARD_COUNT)


@given(st.uuids())
def test_unkeyed_events_shard_by_event_id(event_id: uuid.UUID) -> None:
    shard = shard_for(None, event_id)
    assert 0 <= shard < SHARD_COUNT
    assert shard == partition_for(event_id.bytes, SHARD_COUNT)


def test_an_empty_key_is_a_key_not_a_missing_one() -> None:
    ids = [uuid.UUID(int=i) for i in range(64)]
    assert {shard_for(b"", i) for i in ids} == {partition_for(b"", SHARD_COUNT)}


@pytest.mark.parametrize("slots", range(1, SHARD_COUNT + 5))
def test_i3_slots_split_all_shards_disjointly(slots: int) -> None:
    owned = [shards_of_slot(slot, slots) for slot in range(slots)]
    flat = [shard for shards in owned for shard in shards]
    assert sorted(flat) == list(range(SHARD_COUNT)), "every shard in exactly one slot"
    if slots <= SHARD_COUNT:
        assert all(owned), "no slot is left without shards"
        assert max(map(len, owned)) - min(map(len, owned)) <= 1, "balanced split"


def test_shards_of_slot_is_stable() -> None:
    assert shards_of_slot(1, 4) == [1, 5, 9, 13, 17, 21, 25, 29]


@pytest.mark.parametrize(("slot", "slots"), [(-1, 4), (4, 4), (0, 0), (0, -2)])
def test_shards_of_slot_refuses_slots_out_of_range(slot: int, slots: int) -> None:
    with pytest.raises(ValueError, match="slot"):
        shards_of_slot(slot, slots)


@pytest.mark.parametrize("slots", range(1, SHARD_COUNT + 5))
def test_a_notified_shard_wakes_the_slot_that_owns_it(slots: int) -> None:
    for slot in range(slots):
        for shard in shards_of_slot(slot, slots):
            assert slot_of_shard(shard, slots) == slot
            assert notified_slot(str(shard), slots) == slot


@pytest.mark.parametrize("payload", ["", "x", "-1", str(SHARD_COUNT), "1.5"])
def test_a_payload_that_names_no_shard_wakes_every_slot(payload: str) -> None:
    assert notified_slot(payload, 4) is None


@pytest.mark.parametrize(("shard", "slots"), [(-1, 4), (SHARD_COUNT, 4), (0, 0)])
def test_slot_of_shard_refuses_values_out_of_range(shard: int, slots: int) -> None:
    with pytest.raises(ValueError, match=r"shard|slots"):
        slot_of_shard(shard, slots)
