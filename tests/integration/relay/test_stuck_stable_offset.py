"""A slot's recovery is not stalled by a stable offset the broker never moves (I4, I12).

Tansu 0.6 has no transaction timeout, and it finishes a transaction's end only when every
transaction overlapping it on its partitions is ending too; a transaction whose end raced a
new producer's ``init_transactions`` of the same transactional.id can stay unfinished for
good. The last stable offset of its partitions then stays where it started, whatever commits
after it, and a ``read_committed`` reader of the state topic never reaches the slot's last
marker. Two relays with one identity fencing each other left the state topic that way about
once in ten runs on a loaded machine. Here the same hold is made without a race: a
transaction of another producer stays open while two producers of the slot's transactional
id commit after it, the second with the slot's marker.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from outbox import publish
from outbox.partitioner import SHARD_COUNT
from outbox.relay import Relay
from outbox.relay.abort_probe import aborts_hidden
from outbox.relay.config import RelayConfig
from outbox.relay.marker import Marker
from outbox.relay.marker_reader import KafkaMarkerReader, MarkerReader, kafka_consumers
from tests.conftest import Broker, RelayHandle
from tests.support import KafkaReader, assert_exactly_once, wait_for


def _ends(bootstrap_servers: str, topic: str) -> tuple[int, int]:
    """The partition's last stable offset and its end (high watermark)."""
    ends = []
    for isolation in ("read_committed", "read_uncommitted"):
        consumer = Consumer(
            {
                "bootstrap.servers": bootstrap_servers,
                "group.id": f"ends-{uuid.uuid4().hex}",
                "isolation.level": isolation,
            }
        )
        try:
            ends.append(
                consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10, cached=False)[
                    1
                ]
            )
        finally:
            consumer.close()
    return ends[0], ends[1]


def _producer(bootstrap_servers: str, tid: str) -> Producer:
    producer = Producer({"bootstrap.servers": bootstrap_servers, "transactional.id": tid})
    producer.init_transactions(30)
    return producer


def _hold_the_stable_offset(bootstrap_servers: str, topic: str, tid: str, marker: bytes) -> None:
    """Commit the slot's marker on partition 0 after a hold Tansu 0.6 never lets go of."""
    other = _producer(bootstrap_servers, f"other-{uuid.uuid4().hex[:8]}")
    other.begin_transaction()
    other.produce(topic, key=b"other", value=b"open", partition=0)
    assert other.flush(30) == 0
    for value in (b"", marker):  # two producers of the slot's id end after the open one
        slot = _producer(bootstrap_servers, tid)
        slot.begin_transaction()
        slot.produce(topic, key=tid.encode(), value=value, partition=0)
        assert slot.flush(30) == 0
        slot.commit_transaction(30)
    other.commit_transaction(30)


def _know_how_the_broker_shows_aborts(bootstrap_servers: str, probe_topic: str) -> bool | None:
    """What a relay process knows after its first slot's probe: later producers ask no more,
    so no probe transaction of theirs ends on the state partition before recovery reads it."""
    tid = f"probe-{uuid.uuid4().hex[:8]}"
    producer = _producer(bootstrap_servers, tid)
    try:
        return aborts_hidden(
            producer,
            {"bootstrap.servers": bootstrap_servers},
            probe_topic,
            0,
            tid.encode(),
            remember_as=bootstrap_servers,
        )
    finally:
        producer.flush(5)


def _pending(engine: Engine) -> list[tuple[int, uuid.UUID]]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT id, event_id FROM outbox_events ORDER BY id")).all()
    return [(int(r[0]), uuid.UUID(str(r[1]))) for r in rows]


def test_i4_recovery_reads_its_marker_past_a_stable_offset_the_broker_never_moves(
    broker: Broker,
    engine: Engine,
    topic: str,
    make_topic: Callable[..., str],
    relay_config: Callable[..., RelayConfig],
    bootstrap_servers: str,
    kafka: KafkaReader,
) -> None:
    """The slot's last marker names the first of three pending rows and sits past a stable
    offset Tansu never moves. The relay taking the slot must delete that row (not publish it
    again) and publish the two others, in bounded time, instead of waiting on the offset."""
    if broker.filters_aborts:
        pytest.skip("Apache Kafka ends every transaction within transaction.timeout.ms")
    state_topic = make_topic(partitions=SHARD_COUNT, config={"cleanup.policy": "compact"})
    config = relay_config(slots=1, state_topic=state_topic)
    with Session(engine) as session, session.begin():
        ids = [str(publish(session, topic=topic, key=f"k{i}", value={"i": i})) for i in range(3)]
    with engine.connect() as conn:
        outbox_id = uuid.UUID(
            str(conn.execute(text("SELECT outbox_id FROM outbox_identity")).one()[0])
        )
    tid = config.transactional_id(0, outbox_id)
    first = _pending(engine)[:1]
    marker = Marker.of_batch(outbox_id, tid, 0, 1, first).encode()
    assert _know_how_the_broker_shows_aborts(bootstrap_servers, make_topic()) is False
    _hold_the_stable_offset(bootstrap_servers, state_topic, tid, marker)
    stable, end = _ends(bootstrap_servers, state_topic)
    assert stable < end, "the broker finished the transactions: nothing holds the read"

    reads: list[bool] = []
    markers = _RecordedReads(
        KafkaMarkerReader(
            state_topic,
            kafka_consumers(config.producer_plan().connection, lambda: f"{state_topic}-r"),
        ),
        reads,
    )
    handle = RelayHandle(Relay(config, markers=markers))
    handle.thread.start()
    try:
        wait_for(lambda: not _pending(engine), timeout=60, what="the slot recovers and drains")
    finally:
        handle.stop()
    assert handle.relay.stats.recovered == 1, "the marker's row was not deleted by recovery"
    # (the coordinator's own read, before the slot's, is uncommitted: the shared-prefix check)
    recovery = reads[reads.index(True) :]
    assert recovery[:2] == [True, False], "recovery did not read past the held stable offset"
    assert_exactly_once(kafka.read(topic, 2), ids[1:])


class _RecordedReads:
    """A marker reader that records each read's isolation (True: read_committed)."""

    def __init__(self, real: MarkerReader, reads: list[bool]) -> None:
        self.real = real
        self.reads = reads

    def read(
        self,
        slot: int,
        tid: str,
        interrupt: threading.Event,
        *,
        committed: bool = True,
        since: int = 0,
    ) -> bytes | None:
        self.reads.append(committed)
        return self.real.read(slot, tid, interrupt, committed=committed, since=since)

    def ends(self, partitions: int) -> dict[int, int]:
        return self.real.ends(partitions)

    def close(self) -> None:
        self.real.close()


def test_i12_a_layout_change_settles_an_old_slot_past_a_stable_offset_the_broker_never_moves(
    broker: Broker,
    engine: Engine,
    topic: str,
    make_topic: Callable[..., str],
    relay_config: Callable[..., RelayConfig],
    bootstrap_servers: str,
    kafka: KafkaReader,
) -> None:
    """A relay started with a new slot count first settles the old layout's slots (fences each
    and applies its last marker). The old slot's last marker sits past a stable offset Tansu
    never moves: the settling must read past it as a slot's own recovery does, not retry the
    committed read for ever (the relay would never start publishing: I12), and must delete the
    marker's row rather than publish it again (I4)."""
    if broker.filters_aborts:
        pytest.skip("Apache Kafka ends every transaction within transaction.timeout.ms")
    state_topic = make_topic(partitions=SHARD_COUNT, config={"cleanup.policy": "compact"})
    with Session(engine) as session, session.begin():
        ids = [str(publish(session, topic=topic, key=f"k{i}", value={"i": i})) for i in range(3)]
    with engine.begin() as conn:
        outbox_id = uuid.UUID(
            str(conn.execute(text("SELECT outbox_id FROM outbox_identity")).one()[0])
        )
        conn.execute(text("UPDATE outbox_identity SET slot_count = 1"))  # an old 1-slot layout
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    old = relay_config(slots=1, state_topic=state_topic, transactional_id_prefix=prefix)
    tid = old.transactional_id(0, outbox_id)
    marker = Marker.of_batch(outbox_id, tid, 0, 1, _pending(engine)[:1]).encode()
    assert _know_how_the_broker_shows_aborts(bootstrap_servers, make_topic()) is False
    _hold_the_stable_offset(bootstrap_servers, state_topic, tid, marker)
    stable, end = _ends(bootstrap_servers, state_topic)
    assert stable < end, "the broker finished the transactions: nothing holds the read"

    new = relay_config(slots=2, state_topic=state_topic, transactional_id_prefix=prefix)
    handle = RelayHandle(Relay(new))
    handle.thread.start()
    try:
        wait_for(lambda: not _pending(engine), timeout=90, what="the old layout settles, drains")
    finally:
        handle.stop()
    assert handle.relay.stats.recovered == 1, "the old slot's marker did not delete its row"
    assert_exactly_once(kafka.read(topic, 2), ids[1:])
