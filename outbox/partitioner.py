"""Java-compatible key hashing, so Python and Java producers agree on partitions.

Kafka's default partitioner (and librdkafka's ``murmur2_random``) maps a key to
``toPositive(murmur2(key)) % partitions``. The relay's shards use the same hash,
so every event of one key lands in one shard and is relayed in order (I3).
"""

from __future__ import annotations

import uuid

SHARD_COUNT = 32
"""Fixed for the life of a database: changing it would split a key's history across shards."""

_M = 0x5BD1E995
_SEED = 0x9747B28C
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """32-bit murmur2 exactly as ``org.apache.kafka.common.utils.Utils.murmur2`` (signed)."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    tail = length & ~3
    for i in range(0, tail, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = (h * _M) & _MASK
        h ^= k
    rest = length & 3
    if rest == 3:
        h ^= data[tail + 2] << 16
    if rest >= 2:
        h ^= data[tail + 1] << 8
    if rest >= 1:
        h ^= data[tail]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def to_positive(n: int) -> int:
    return n & 0x7FFFFFFF


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's Java client (and ``murmur2_random``) picks for ``key``."""
    if partitions < 1:
        raise ValueError(f"partitions={partitions} must be at least 1")
    return to_positive(murmur2(key)) % partitions


def shard_for(key: bytes | None, event_id: uuid.UUID) -> int:
    """Keyed events shard by key (order matters); unkeyed ones spread by event id."""
    return partition_for(key if key is not None else event_id.bytes, SHARD_COUNT)


def shards_of_slot(slot: int, slots: int) -> list[int]:
    """The shards a slot owns: a fixed, disjoint split of all shards.

    With ``slots`` above ``SHARD_COUNT`` the extra slots own nothing.
    """
    if slots < 1:
        raise ValueError(f"slots={slots} must be at least 1")
    if not 0 <= slot < slots:
        raise ValueError(f"slot {slot} is outside 0..{slots - 1}")
    return [s for s in range(SHARD_COUNT) if s % slots == slot]


def slot_of_shard(shard: int, slots: int) -> int:
    """The slot that owns ``shard`` (the inverse of ``shards_of_slot``)."""
    if slots < 1:
        raise ValueError(f"slots={slots} must be at least 1")
    if not 0 <= shard < SHARD_COUNT:
        raise ValueError(f"shard {shard} is outside 0..{SHARD_COUNT - 1}")
    return shard % slots
