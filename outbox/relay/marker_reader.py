"""Reading a slot's last recovery marker back from the state topic (I4).

``MarkerReader`` is what the coordinator and the slot workers call; ``KafkaMarkerReader`` is
the real one (one per process, two Kafka consumers built on first use). The consumers come
from a factory, so the reading decisions (how far back to look, when to give up, when to
build new clients) are tested with scripted consumers. The verdict on what was read is
``outbox.relay.marker.judge_marker``.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from outbox.errors import TransientError
from outbox.logs import librdkafka_logger

MARKER_READ_TIMEOUT = 30.0
"""How long a takeover reads for the slot's last marker before retrying (never settles
for an older one)."""
FIRST_WINDOW = 16
"""Offsets read back from the partition's end first; the window grows 4x until a marker of
the transactional id is found or the partition's start is reached."""
POLL_TIMEOUT = 0.2


class MarkerReader(Protocol):
    """What the relay uses to read a slot's last marker."""

    def read(
        self, slot: int, tid: str, interrupt: threading.Event, *, committed: bool = True
    ) -> bytes | None:
        """The slot's LAST marker under ``tid`` (committed ones only, unless told), or None;
        TransientError when it cannot be read to the partition's end now."""
        ...

    def close(self) -> None:
        """Release the Kafka clients (the next read builds new ones)."""
        ...


class MarkerConsumer(Protocol):
    """What the reader uses of a Kafka consumer (``confluent_kafka.Consumer``)."""

    def assign(self, partitions: list[TopicPartition], /) -> None: ...

    def unassign(self) -> None: ...

    def poll(self, timeout: float = -1, /) -> Message | None: ...

    def position(self, partitions: list[TopicPartition], /) -> list[TopicPartition]: ...

    def get_watermark_offsets(
        self, partition: TopicPartition, /, timeout: float = -1, cached: bool = False
    ) -> tuple[int, int]: ...

    def close(self) -> None: ...


ConsumerFactory = Callable[[str], MarkerConsumer]
"""Builds a consumer for an ``isolation.level`` (read_committed or read_uncommitted)."""


def kafka_consumers(connection: Mapping[str, Any], group: Callable[[], str]) -> ConsumerFactory:
    """The real consumers: the producer's connection settings, EOF reported at once."""

    def build(isolation: str) -> MarkerConsumer:
        return Consumer(
            dict(connection)
            | {
                "logger": librdkafka_logger(),
                "group.id": group(),
                "isolation.level": isolation,
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "fetch.wait.max.ms": "10",  # EOF at once: takeover waits on this read
            }
        )

    return build


class KafkaMarkerReader:
    """Reads markers from the state topic; one read at a time per process."""

    def __init__(
        self,
        state_topic: str,
        consumers: ConsumerFactory,
        *,
        timeout: float = MARKER_READ_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state_topic = state_topic
        self.timeout = timeout
        self._consumers = consumers
        self._clock = clock
        self._lock = threading.Lock()
        self._committed: MarkerConsumer | None = None
        self._end: MarkerConsumer | None = None

    def read(
        self, slot: int, tid: str, interrupt: threading.Event, *, committed: bool = True
    ) -> bytes | None:
        """The slot's LAST committed marker under ``tid`` (read_committed), or None.

        Call it after ``init_transactions`` settled ``tid``'s transactions. It reads up to
        the partition's end as of now, waiting while another producer's open transaction
        holds the read back; past ``timeout`` it raises TransientError rather than return
        an older marker (which would publish the last batch twice).
        """
        with self._lock:
            try:
                return self._read(slot, tid, interrupt, committed)
            except (TransientError, KafkaException):
                # A failed read can leave a client stuck on stale metadata (seen after a node
                # restart: _UNKNOWN_PARTITION on every retry): the next try builds new ones.
                self.close()
                raise

    def close(self) -> None:
        for consumer in (self._committed, self._end):
            if consumer is not None:
                with contextlib.suppress(KafkaException, RuntimeError):
                    consumer.close()
        self._committed = self._end = None

    def _read(
        self, slot: int, tid: str, interrupt: threading.Event, committed: bool
    ) -> bytes | None:
        if self._committed is None or self._end is None:
            self._committed = self._consumers("read_committed")
            # The true end of the partition, open transactions included (a read_committed
            # client is told the last stable offset, which another producer can hold back).
            self._end = self._consumers("read_uncommitted")
        tp = TopicPartition(self.state_topic, slot)
        low, high = self._end.get_watermark_offsets(tp, timeout=10, cached=False)
        consumer = self._committed if committed else self._end
        deadline = self._clock() + self.timeout
        window = FIRST_WINDOW
        try:
            while high > low:
                start = max(low, high - window)
                last = self._scan(consumer, slot, tid, start, high, deadline, interrupt)
                if last is not None or start == low:
                    return last
                window *= 4
            return None
        finally:
            consumer.unassign()

    def _scan(
        self,
        consumer: MarkerConsumer,
        slot: int,
        tid: str,
        start: int,
        end: int,
        deadline: float,
        interrupt: threading.Event,
    ) -> bytes | None:
        """The last committed value under ``tid`` in offsets [start, end): read to the end."""
        tp = TopicPartition(self.state_topic, slot, start)
        consumer.assign([tp])
        key = tid.encode()
        last: bytes | None = None
        position = start
        while position < end:
            if interrupt.is_set():
                raise TransientError(f"slot {slot}: marker read interrupted (stopping)")
            if self._clock() > deadline:
                raise TransientError(
                    f"slot {slot}: the state topic was not readable up to offset {end} within "
                    f"{self.timeout:.0f} s (an open transaction of another producer?)"
                )
            msg = consumer.poll(POLL_TIMEOUT)
            if msg is None:
                position = max(position, _position(consumer, tp))
                continue
            error = msg.error()
            if error is not None:
                if error.code() == KafkaError._PARTITION_EOF:
                    position = max(position, msg.offset() or 0, _position(consumer, tp))
                    continue
                raise TransientError(f"reading recovery marker: {error}")
            position = max(position, (msg.offset() or 0) + 1)
            if msg.key() == key and msg.value():
                last = msg.value()
        return last


def _position(consumer: MarkerConsumer, tp: TopicPartition) -> int:
    """Where ``consumer`` will read next in ``tp`` (past skipped control records too)."""
    [where] = consumer.position([TopicPartition(tp.topic, tp.partition)])
    return int(where.offset) if where.offset >= 0 else 0
