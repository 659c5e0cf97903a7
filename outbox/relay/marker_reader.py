"""Reading a slot's last recovery marker back from the state topic (I4).

``MarkerReader`` is what the coordinator and the slot workers call; ``KafkaMarkerReader`` is
the real one (one per process, two Kafka consumers built on first use). The consumers come
from a factory, so the reading decisions (how far back to look, when to give up, when to
build new clients) are tested with scripted consumers. The verdict on what was read is
``outbox.relay.marker.judge_marker``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from outbox.errors import TransientError
from outbox.logs import librdkafka_logger

log = logging.getLogger("outbox.relay")

MARKER_READ_TIMEOUT = 30.0
"""How long a takeover reads for the slot's last marker before retrying (never settles
for an older one)."""
HELD_BACK_AFTER = 5.0
"""Seconds a committed read may sit at the partition's last stable offset, below its end,
before it raises ``HeldBack`` (the slot may then read on uncommitted, see ``HeldBack``)."""
FIRST_WINDOW = 16
"""Offsets read back from the partition's end first; the window grows 4x until a marker of
the transactional id is found or the partition's start is reached."""
POLL_TIMEOUT = 0.2


class HeldBack(TransientError):
    """A committed read is held at the partition's last stable offset, below its end.

    On Apache Kafka that is another producer's open transaction, which the broker aborts
    within its transaction.timeout.ms. Tansu 0.6 has no transaction timeout, and a
    transaction whose end raced a new producer's init_transactions of the same
    transactional.id can stay unfinished in its bookkeeping for good: the stable offset of
    every partition it wrote then never moves again, whatever ends after it. A broker that
    shows aborted transactions to read_committed readers (Tansu) has nothing more to hide
    from the slot there: the slot reads its marker uncommitted (``SlotWorker``).
    """


class ReadMarker(Protocol):
    """A slot's read of its last marker (``MarkerReader.read``, bound to the reader)."""

    def __call__(
        self,
        slot: int,
        tid: str,
        interrupt: threading.Event,
        *,
        committed: bool = True,
        since: int = 0,
    ) -> bytes | None: ...


class MarkerReader(Protocol):
    """What the relay uses to read a slot's last marker."""

    def read(
        self,
        slot: int,
        tid: str,
        interrupt: threading.Event,
        *,
        committed: bool = True,
        since: int = 0,
    ) -> bytes | None:
        """The slot's LAST marker under ``tid`` (committed ones only, unless told) at or after
        offset ``since``, or None; TransientError when it cannot be read to the partition's end
        now (``HeldBack`` when the partition's last stable offset holds a committed read below
        it)."""
        ...

    def ends(self, partitions: int) -> dict[int, int]:
        """Where each of the state topic's first ``partitions`` partitions ends now (its high
        watermark): no marker written later can be found below it."""
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
        held_back_after: float = HELD_BACK_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.state_topic = state_topic
        self.timeout = timeout
        self.held_back_after = held_back_after
        self._consumers = consumers
        self._clock = clock
        self._lock = threading.Lock()
        self._committed: MarkerConsumer | None = None
        self._end: MarkerConsumer | None = None

    def read(
        self,
        slot: int,
        tid: str,
        interrupt: threading.Event,
        *,
        committed: bool = True,
        since: int = 0,
    ) -> bytes | None:
        """The slot's LAST committed marker under ``tid`` (read_committed) at or after offset
        ``since``, or None.

        Call it after ``init_transactions`` settled ``tid``'s transactions. It reads up to
        the partition's end as of now, waiting while another producer's open transaction
        holds the read back; past ``timeout`` it raises TransientError rather than return
        an older marker (which would publish the last batch twice), and ``HeldBack`` once
        the partition's last stable offset held it for ``held_back_after``.
        """
        with self._lock:
            try:
                return self._read(slot, tid, interrupt, committed, since)
            except HeldBack:
                raise  # the clients read fine: the broker holds them back
            except (TransientError, KafkaException):
                # A failed read can leave a client stuck on stale metadata (seen after a node
                # restart: _UNKNOWN_PARTITION on every retry): the next try builds new ones.
                self.close()
                raise

    def ends(self, partitions: int) -> dict[int, int]:
        with self._lock:
            try:
                end = self._end_consumer()
                return {
                    p: end.get_watermark_offsets(
                        TopicPartition(self.state_topic, p), timeout=10, cached=False
                    )[1]
                    for p in range(partitions)
                }
            except KafkaException:
                self.close()
                raise

    def close(self) -> None:
        for consumer in (self._committed, self._end):
            if consumer is not None:
                with contextlib.suppress(KafkaException, RuntimeError):
                    consumer.close()
        self._committed = self._end = None

    def _end_consumer(self) -> MarkerConsumer:
        if self._committed is None or self._end is None:
            self._committed = self._consumers("read_committed")
            # The true end of the partition, open transactions included (a read_committed
            # client is told the last stable offset, which another producer can hold back).
            self._end = self._consumers("read_uncommitted")
        return self._end

    def _read(
        self, slot: int, tid: str, interrupt: threading.Event, committed: bool, since: int
    ) -> bytes | None:
        end = self._end_consumer()
        assert self._committed is not None
        tp = TopicPartition(self.state_topic, slot)
        low, high = end.get_watermark_offsets(tp, timeout=10, cached=False)
        low = max(low, since)  # nothing of ``tid`` below it: no need to look back further
        consumer = self._committed if committed else end
        deadline = self._clock() + self.timeout
        window = FIRST_WINDOW
        try:
            while high > low:
                start = max(low, high - window)
                last = self._scan(
                    consumer, slot, tid, start, high, deadline, interrupt, committed=committed
                )
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
        *,
        committed: bool,
    ) -> bytes | None:
        """The last committed value under ``tid`` in offsets [start, end): read to the end."""
        tp = TopicPartition(self.state_topic, slot, start)
        consumer.assign([tp])
        key = tid.encode()
        last: bytes | None = None
        position = start
        moved = self._clock()  # when the read last got further
        while position < end:
            if interrupt.is_set():
                raise TransientError(f"slot {slot}: marker read interrupted (stopping)")
            if self._clock() > deadline:
                raise TransientError(
                    f"slot {slot}: the state topic was not readable up to offset {end} within "
                    f"{self.timeout:.0f} s (an open transaction of another producer?)"
                )
            if committed and self._clock() - moved >= self.held_back_after:
                self._held_back(consumer, slot, tp, position, end)
                moved = self._clock()  # not the stable offset: ask again after as long
            msg = consumer.poll(POLL_TIMEOUT)
            before = position
            if msg is None:
                position = max(position, _position(consumer, tp))
            elif (error := msg.error()) is not None:
                if error.code() != KafkaError._PARTITION_EOF:
                    raise TransientError(f"reading recovery marker: {error}")
                position = max(position, msg.offset() or 0, _position(consumer, tp))
            else:
                position = max(position, (msg.offset() or 0) + 1)
                if msg.key() == key and msg.value():
                    last = msg.value()
            if position > before:
                moved = self._clock()
        return last

    def _held_back(
        self, consumer: MarkerConsumer, slot: int, tp: TopicPartition, position: int, end: int
    ) -> None:
        """Raise ``HeldBack`` if the partition's last stable offset is where the read waits."""
        where = TopicPartition(tp.topic, tp.partition)
        _, stable = consumer.get_watermark_offsets(where, timeout=10, cached=False)
        if stable <= position < end:
            raise HeldBack(
                f"slot {slot}: the state topic's partition {tp.partition} is held at its last "
                f"stable offset {stable}, below its end {end}, for "
                f"{self.held_back_after:.0f} s (a transaction the broker has not finished)"
            )


def read_past_a_stuck_offset(
    read: ReadMarker,
    slot: int,
    tid: str,
    interrupt: threading.Event,
    aborts_shown: Callable[[], bool],
    *,
    since: int = 0,
    what: str = "slot",
) -> bytes | None:
    """A slot's last marker, read_committed; read uncommitted instead once the state
    partition's last stable offset holds the read below its end (``HeldBack``) on a broker
    that shows aborted transactions to read_committed readers (Tansu, which can leave that
    offset stuck for good). There, with no transaction of the slot's id open (its
    ``init_transactions`` done), every marker went out after all its records were
    acknowledged, and committed or aborted they are all shown: the marker past the stable
    offset deletes only rows whose records every reader gets (I2, I4). Elsewhere, or without
    a clear answer, it waits read after read up to ``MARKER_READ_TIMEOUT``, then raises.
    ``aborts_shown`` is asked at the first hold-up only (it may probe the broker)."""
    waited_until = time.monotonic() + MARKER_READ_TIMEOUT
    shown: bool | None = None
    while True:
        try:
            return read(slot, tid, interrupt, since=since)
        except HeldBack as exc:
            if shown is None:
                shown = aborts_shown()
            if shown:
                log.warning(
                    "%s; this broker shows aborted transactions, so %s %d reads its marker "
                    "uncommitted, up to the end",
                    exc,
                    what,
                    slot,
                )
                return read(slot, tid, interrupt, committed=False, since=since)
            if time.monotonic() >= waited_until:  # retried after a backoff, logged
                raise


def _position(consumer: MarkerConsumer, tp: TopicPartition) -> int:
    """Where ``consumer`` will read next in ``tp`` (past skipped control records too)."""
    [where] = consumer.position([TopicPartition(tp.topic, tp.partition)])
    return int(where.offset) if where.offset >= 0 else 0
