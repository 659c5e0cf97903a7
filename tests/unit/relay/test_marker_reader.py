"""Reading a slot's last recovery marker (I4): the reader's decisions, through scripted consumers.

A fake state partition stands in for Kafka: records at offsets, control records (offsets no
poll returns), a last stable offset an open transaction holds back, and scripted read errors.
The real consumers are covered by the relay's integration tests.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest
from confluent_kafka import KafkaError, Message, TopicPartition

from outbox.errors import TransientError
from outbox.relay.marker_reader import (
    FIRST_WINDOW,
    HELD_BACK_AFTER,
    POLL_TIMEOUT,
    HeldBack,
    KafkaMarkerReader,
)

TOPIC = "state"
TID = "outbox-abc-0"


@dataclass
class Clock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Partition:
    """The state topic's partition of a slot, as the fake consumers see it."""

    records: dict[int, tuple[bytes, bytes]]
    end: int
    low: int = 0
    stable: int | None = None  # read_committed readers stop here (an open transaction)
    errors: list[KafkaError] = field(default_factory=list)  # the next polls fail with these


class FakeConsumer:
    def __init__(self, partition: Partition, isolation: str, clock: Clock) -> None:
        self.partition = partition
        self.isolation = isolation
        self.clock = clock
        self.starts: list[int] = []  # the offset of every assign
        self.pos = 0
        self.closed = False

    def assign(self, partitions: list[TopicPartition], /) -> None:
        [tp] = partitions
        assert (tp.topic, tp.partition) == (TOPIC, 0)
        self.starts.append(tp.offset)
        self.pos = tp.offset

    def unassign(self) -> None:
        pass

    def poll(self, timeout: float = -1, /) -> Message | None:
        p = self.partition
        if p.errors:
            return Message(offset=self.pos, error=p.errors.pop(0))
        committed = self.isolation == "read_committed" and p.stable is not None
        limit = p.stable if committed and p.stable is not None else p.end
        while self.pos < limit:
            offset = self.pos
            self.pos += 1
            if offset in p.records:
                key, value = p.records[offset]
                return Message(topic=TOPIC, partition=0, offset=offset, key=key, value=value)
            # a control record (a transaction's commit): skipped, no message
        if self.pos >= p.end:
            return Message(offset=self.pos, error=KafkaError(KafkaError._PARTITION_EOF))
        self.clock.now += timeout  # nothing to return: the poll waits its whole timeout
        return None  # held back below the open transaction

    def position(self, partitions: list[TopicPartition], /) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, self.pos) for tp in partitions]

    def get_watermark_offsets(
        self, partition: TopicPartition, /, timeout: float = -1, cached: bool = False
    ) -> tuple[int, int]:
        assert not cached, "a cached end offset may be stale"
        p = self.partition
        if self.isolation == "read_committed" and p.stable is not None:
            return p.low, p.stable  # a read_committed client is told the last stable offset
        return p.low, p.end

    def close(self) -> None:
        self.closed = True


class Kafka:
    """Builds the reader's consumers over one partition and remembers them."""

    def __init__(self, partition: Partition) -> None:
        self.partition = partition
        self.clock = Clock()
        self.built: list[FakeConsumer] = []

    def __call__(self, isolation: str) -> FakeConsumer:
        consumer = FakeConsumer(self.partition, isolation, self.clock)
        self.built.append(consumer)
        return consumer

    def reader(
        self, timeout: float = 30.0, held_back_after: float = HELD_BACK_AFTER
    ) -> KafkaMarkerReader:
        return KafkaMarkerReader(
            TOPIC, self, timeout=timeout, held_back_after=held_back_after, clock=self.clock
        )

    def committed(self) -> list[FakeConsumer]:
        return [c for c in self.built if c.isolation == "read_committed"]


def _marker(n: int, tid: str = TID) -> tuple[bytes, bytes]:
    return tid.encode(), f"marker {n}".encode()


def _read(reader: KafkaMarkerReader, *, committed: bool = True) -> bytes | None:
    return reader.read(0, TID, threading.Event(), committed=committed)


def test_i4_the_reader_returns_the_last_marker_of_the_transactional_id_not_an_older_one() -> None:
    records = {0: _marker(1), 1: _marker(1, "other-0"), 3: _marker(2), 4: _marker(9, "x-0")}
    kafka = Kafka(Partition(records, end=6))  # offsets 2 and 5: transaction commits
    assert _read(kafka.reader()) == b"marker 2"


def test_i4_the_reader_looks_further_back_until_it_finds_a_marker_of_the_tid() -> None:
    records = {0: _marker(1)} | {i: _marker(i, "other-0") for i in range(1, 200)}
    kafka = Kafka(Partition(records, end=200))
    assert _read(kafka.reader()) == b"marker 1"
    [consumer] = kafka.committed()
    assert consumer.starts == [200 - FIRST_WINDOW, 200 - 4 * FIRST_WINDOW, 0]


def test_i4_a_partition_without_a_marker_of_the_tid_reads_as_none_after_reading_it_all() -> None:
    records = {i: _marker(i, "other-0") for i in range(5, 100)}
    kafka = Kafka(Partition(records, low=5, end=100))
    assert _read(kafka.reader()) is None
    assert kafka.committed()[0].starts[-1] == 5, "stopped before the partition's start"


def test_i4_an_empty_partition_reads_as_none_without_a_fetch() -> None:
    kafka = Kafka(Partition({}, low=7, end=7))
    assert _read(kafka.reader()) is None
    assert kafka.committed()[0].starts == []


def test_i4_a_marker_with_an_empty_value_is_not_the_last_marker() -> None:
    kafka = Kafka(Partition({0: _marker(1), 1: (TID.encode(), b"")}, end=2))
    assert _read(kafka.reader()) == b"marker 1"


def test_i4_an_open_transaction_holding_the_read_back_raises_instead_of_an_older_marker() -> None:
    """The slot's last marker follows another producer's open transaction: a read_committed
    reader cannot reach it; returning the older marker would publish the last batch twice."""
    records = {0: _marker(1), 1: (b"intruder", b"open"), 2: _marker(2)}
    kafka = Kafka(Partition(records, end=3, stable=1))
    with pytest.raises(TransientError, match="not readable up to offset 3 within 5 s"):
        _read(kafka.reader(timeout=5.0, held_back_after=60.0))
    assert kafka.clock.now <= 5.0 + 2 * POLL_TIMEOUT, "the read outlived its timeout"


def test_i4_a_read_held_at_the_last_stable_offset_says_so_before_its_timeout() -> None:
    """Where the broker may never move the stable offset (Tansu 0.6), the slot must learn that
    the stable offset is what holds it, soon, to decide what to do (``SlotWorker``)."""
    records = {0: _marker(1), 1: (b"intruder", b"open"), 2: _marker(2)}
    kafka = Kafka(Partition(records, end=3, stable=1))
    with pytest.raises(HeldBack, match="held at its last stable offset 1, below its end 3"):
        _read(kafka.reader(timeout=30.0, held_back_after=5.0))
    assert 5.0 <= kafka.clock.now <= 5.0 + 2 * POLL_TIMEOUT
    assert not any(c.closed for c in kafka.built), "healthy clients were thrown away"


def test_i4_a_slow_read_is_not_taken_for_one_held_at_the_stable_offset() -> None:
    """Polls that return nothing while the stable offset is past them (a slow broker) keep
    the read going until its timeout: only the stable offset's hold is ``HeldBack``."""
    records = {0: _marker(1), 2: _marker(2)}
    slow = SlowConsumerKafka(Partition(records, end=3, stable=3), polls_with_nothing=40)
    assert _read(slow.reader(timeout=30.0, held_back_after=5.0)) == b"marker 2"
    assert slow.clock.now >= 40 * POLL_TIMEOUT, "the slow polls did not happen"


class SlowConsumer(FakeConsumer):
    """A consumer whose first polls return nothing though records are there."""

    def __init__(self, partition: Partition, isolation: str, clock: Clock, empty: list[int]):
        super().__init__(partition, isolation, clock)
        self.empty = empty  # polls left that return nothing, shared by the reader's consumers

    def poll(self, timeout: float = -1, /) -> Message | None:
        if self.empty[0]:
            self.empty[0] -= 1
            self.clock.now += timeout
            return None
        return super().poll(timeout)


class SlowConsumerKafka(Kafka):
    """Builds ``SlowConsumer``s."""

    def __init__(self, partition: Partition, polls_with_nothing: int) -> None:
        super().__init__(partition)
        self.empty = [polls_with_nothing]

    def __call__(self, isolation: str) -> FakeConsumer:
        consumer = SlowConsumer(self.partition, isolation, self.clock, self.empty)
        self.built.append(consumer)
        return consumer


def test_i4_a_read_from_a_floor_looks_back_no_further_and_finds_a_marker_above_it() -> None:
    records = {i: _marker(i, "other-0") for i in range(0, 300)} | {250: _marker(7)}
    kafka = Kafka(Partition(records, end=300))
    assert kafka.reader().read(0, TID, threading.Event(), since=240) == b"marker 7"
    assert kafka.reader().read(0, TID, threading.Event(), since=260) is None
    assert min(kafka.committed()[-1].starts) == 260, "read below the floor"


def test_i4_the_state_partitions_ends_are_their_high_watermarks_open_ones_included() -> None:
    kafka = Kafka(Partition({0: _marker(1)}, end=9, stable=4))
    assert kafka.reader().ends(1) == {0: 9}
