"""The relay's failure classes (issue 14): no loss in at-least-once (I2), no slot blocked by one
topic and no innocent row buried (I6), prompt hand-over, fatal producers rebuilt, every Kafka
client secured alike, bounded memory.

Faults the embedded Tansu broker cannot produce (a missing topic with auto-create off, a
topic's max.message.bytes below the producer's, a fatal idempotence error) are injected where
librdkafka reports them: into the delivery reports of a real batch sent to the real broker.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import KafkaError, Message, TopicPartition
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from outbox import configure, publish, sql
from outbox.embedded import EmbeddedBroker
from outbox.relay import Relay, Row, Seams, coordinator, kafka_probe, marker_reader
from outbox.relay import seams as relay_seams
from outbox.relay.config import Guarantee, RelayConfig
from outbox.relay.marker_reader import KafkaMarkerReader, MarkerConsumer, kafka_consumers
from outbox.relay.slot_session import PsycopgSlotSession
from tests.conftest import Broker, RelayHandle
from tests.integration.relay.faults import Faults, FaultyProducer, Sent
from tests.integration.relay.test_relay import proxied_broker  # noqa: F401 - a shared fixture
from tests.support import KafkaReader, TcpProxy, assert_exactly_once, wait_for

ALO = Guarantee.AT_LEAST_ONCE


def _pending(engine: Engine, topic: str | None = None) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                text(
                    "SELECT count(*) FROM outbox_events "
                    "WHERE CAST(:t AS text) IS NULL OR topic = :t"
                ),
                {"t": topic},
            ).scalar_one()
        )


def _dead(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT * FROM outbox_dead_events ORDER BY id")))


def _publish(engine: Engine, topic: str, values: list[str], *, keys: int = 3) -> list[str]:
    with Session(engine) as session, session.begin():
        return [
            str(publish(session, topic=topic, key=f"k{i % keys}", value=v))
            for i, v in enumerate(values)
        ]


def _inject(fail: Callable[[FaultyProducer, list[Sent]], dict[int, int]]) -> Seams:
    """Send each batch to the real broker, then report the errors ``fail`` picks (index in the
    batch -> code) for it, as librdkafka would in the delivery reports."""
    return Faults(reports=fail).seams()


def test_i2_at_least_once_keeps_rows_whose_delivery_outlasted_the_flush_timeout(
    engine: Engine,
    topic: str,
    proxied_broker: tuple[EmbeddedBroker, TcpProxy],  # noqa: F811
    start_relay: Callable[..., RelayHandle],
) -> None:
    """The broker is away longer than the flush timeout: before the fix the rows were deleted
    and their records expired later (loss)."""
    broker, proxy = proxied_broker
    handle = start_relay(
        bootstrap_servers=broker.bootstrap_servers,
        guarantee=ALO,
        transaction_timeout=1.0,  # the flush timeout
        producer_overrides={
            "request.timeout.ms": "1500",
            "socket.timeout.ms": "1500",
            "message.timeout.ms": "4000",
        },
    )
    first = _publish(engine, topic, [f"a{i}" for i in range(10)])
    wait_for(lambda: _pending(engine) == 0, what="first events published")
    proxy.cut()
    second = _publish(engine, topic, [f"b{i}" for i in range(10)])
    wait_for(
        lambda: handle.relay.stats.retries >= 1,
        timeout=60,
        what="the records expired unacknowledged and the batch is retried",
    )
    assert _pending(engine) == 10, "rows left the outbox without a delivery report"
    proxy.restore()
    wait_for(lambda: _pending(engine) == 0, timeout=90, what="drained after the broker is back")
    handle.stop()
    got = {r.event_id for r in KafkaReader(broker.bootstrap_servers).read(topic, 20)}
    assert got >= set(first) | set(second)


def test_i3_an_at_least_once_batch_whose_slot_session_ended_is_not_sent_beside_the_next_owners(
    engine: Engine,
    topic: str,
    proxied_broker: tuple[EmbeddedBroker, TcpProxy],  # noqa: F811
    start_relay: Callable[..., RelayHandle],
) -> None:
    """A restarted server (or a terminated backend) ends a slot's session, and frees its lock,
    while the worker waits for its batch's delivery reports through a broker outage. Nothing
    fences an idempotent producer: before the fix it kept the records and sent them when the
    broker came back, beside the slot's next owner sending the same rows, so every event of
    the batch reached the topic twice (and, with a next owner already past them, out of
    per-key order: CI's chaos run at stop 32)."""
    broker, proxy = proxied_broker
    handle = start_relay(
        bootstrap_servers=broker.bootstrap_servers,
        slots=1,
        guarantee=ALO,
        takeover_timeout=120.0,  # a heartbeat every 30 s: the old owner must not wait for it
    )
    first = _publish(engine, topic, ["a0", "a1", "a2"])
    wait_for(lambda: _pending(engine) == 0, what="first events published")
    proxy.cut()
    claimed = handle.relay.stats.claimed
    second = _publish(engine, topic, [f"b{i}" for i in range(5)])
    wait_for(
        lambda: handle.relay.stats.claimed >= claimed + 5, what="the batch claimed and in flight"
    )
    worker = handle.relay.workers[0]
    with engine.connect() as conn:
        conn.execute(
            text("SELECT pg_terminate_backend(:pid)"), {"pid": worker.conn.info.backend_pid}
        )
    wait_for(
        lambda: not worker.is_alive(),
        timeout=20,
        what="the worker whose slot session ended gave its batch up (before the fix it waited "
        "for the broker, up to delivery.timeout.ms; with a heartbeat alone, up to 30 s)",
    )
    assert _pending(engine) == 5, "rows left the outbox without a delivery report"
    proxy.restore()
    wait_for(lambda: _pending(engine) == 0, timeout=90, what="drained after the broker is back")
    handle.stop()
    copies = [r.event_id for r in KafkaReader(broker.bootstrap_servers).read(topic, 8)]
    assert sorted(copies) == sorted(first + second), "an event reached the topic twice"


def _relay_counting_beats(
    start_relay: Callable[..., RelayHandle], **overrides: Any
) -> tuple[RelayHandle, list[float]]:
    """A one-slot at-least-once relay with a beat due every 30 s only, and when each beat ran."""
    beats: list[float] = []

    class Counted(PsycopgSlotSession):
        def heartbeat(self) -> bool:
            beats.append(time.monotonic())
            return super().heartbeat()

    handle = start_relay(
        slots=1,
        guarantee=ALO,
        takeover_timeout=120.0,  # a beat every 30 s: none is due during the test
        seams=relay_seams.Seams(session=Counted),
        **overrides,
    )
    return handle, beats


def test_i12_a_slot_heartbeat_that_listens_between_beats_adds_no_statement_per_batch(
    engine: Engine,
    topic: str,
    start_relay: Callable[..., RelayHandle],
) -> None:
    """The heartbeat listens on the slot's connection between beats, which is readable each time
    a statement of the worker's is answered: that must not turn into a heartbeat per statement
    (a round trip per batch), only the server speaking unprompted does."""
    handle, beats = _relay_counting_beats(start_relay, batch_size=1)  # a claim, a delete each
    _publish(engine, topic, [f"v{i}" for i in range(40)])
    wait_for(lambda: _pending(engine) == 0, what="40 batches published")
    handle.stop()
    assert handle.relay.stats.batches >= 40
    assert beats == [], f"{len(beats)} heartbeats in 40 batches"


@pytest.fixture
def descriptors_above_1024() -> Iterator[Callable[[], None]]:
    """A call fills every free descriptor below 1100, so the sockets opened next get one above
    select()'s FD_SETSIZE (1024), as in a relay with many slots (each a connection and a
    producer's broker sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip(f"the hard limit on open files is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    held: list[int] = []

    def fill() -> None:
        gc.collect()  # close what earlier tests left to finalizers now, not under the relay
        while True:  # every call: holes made since the last one are filled too
            held.append(os.open(os.devnull, os.O_RDONLY))
            if held[-1] >= 1100:
                return

    try:
        yield fill
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_i12_a_slot_connection_above_fd_setsize_does_not_spin_its_heartbeat(
    engine: Engine,
    topic: str,
    start_relay: Callable[..., RelayHandle],
    descriptors_above_1024: Callable[[], None],
) -> None:
    """select() refuses a descriptor of 1024 or more (ValueError), which the listening heartbeat
    took for a connection gone: it beat, found the connection alive, and listened again, in a
    loop: thousands of statements a second on the slot's connection (and a core), for as long
    as the relay ran (6,840 beats in about a second)."""
    got: list[int] = []
    for _ in range(5):  # a descriptor below 1024 closed after the fill (a CI run's took 16)
        descriptors_above_1024()
        handle, beats = _relay_counting_beats(start_relay)
        wait_for(lambda h=handle: h.relay.workers, what="the slot worker started")  # type: ignore[misc]
        got.append(handle.relay.workers[0].conn.fileno())
        if got[-1] >= 1024:
            break
        handle.stop()
    else:  # CI's xdist workers free low descriptors while a relay starts; not yet explained
        pytest.skip(f"the slot's connection got no descriptor above 1024 in 5 starts: {got}")
    # A spinning heartbeat beats from the worker's start: thousands while these are published.
    _publish(engine, topic, [f"v{i}" for i in range(20)])
    wait_for(lambda: _pending(engine) == 0, what="events published")
    handle.stop()
    assert len(beats) <= 2, f"{len(beats)} heartbeats while 20 events were published"


def test_a_slot_handed_over_while_retrying_stops_at_once(
    engine: Engine,
    topic: str,
    start_relay: Callable[..., RelayHandle],
) -> None:
    """Before the fix the interrupt stayed set: retries spun without backoff, never handed over."""
    seams = _inject(lambda producer, batch: dict.fromkeys(range(len(batch)), KafkaError._TRANSPORT))
    _publish(engine, topic, ["v1", "v2", "v3"])
    handle = start_relay(slots=1, guarantee=ALO, seams=seams)
    wait_for(lambda: handle.relay.stats.retries >= 2, what="the slot retries the failing batch")
    worker = handle.relay.workers[0]
    retries = handle.relay.stats.retries
    worker.hand_over()
    wait_for(lambda: not worker.is_alive(), timeout=10, what="the worker gave the slot away")
    assert handle.relay.stats.retries - retries <= 1
    assert _pending(engine) == 3  # nothing was acknowledged: nothing left the outbox
    assert not worker.failed


def test_a_fatal_producer_error_builds_a_new_producer(
    engine: Engine,
    topic: str,
    drain: Callable[..., Relay],
    kafka: KafkaReader,
) -> None:
    producers: list[Any] = []  # kept alive, so their ids stay distinct

    def first_batch_fatal(producer: FaultyProducer, batch: list[Sent]) -> dict[int, int]:
        producers.append(producer)
        return {0: KafkaError._FATAL} if len(producers) == 1 else {}

    ids = _publish(engine, topic, [f"v{i}" for i in range(5)])
    drain(slots=1, guarantee=ALO, seams=_inject(first_batch_fatal))
    assert len({id(p) for p in producers}) == 2, (
        "the batch was retried with the same (fatal) producer"
    )
    assert _pending(engine) == 0
    assert _dead(engine) == []  # a fatal producer's error is no row's fault
    assert {r.event_id for r in kafka.read(topic, 5)} >= set(ids)


def test_i12_a_relay_fenced_before_its_commit_gives_the_slot_up_without_waiting_out_an_abort(
    engine: Engine,
    topic: str,
    broker: Broker,
    start_relay: Callable[..., RelayHandle],
    kafka: KafkaReader,
) -> None:
    """Another producer of the slot's transactional.id fences the relay's between its records
    and its commit. The fencing init_transactions ended the transaction; Tansu 0.6 leaves the
    old epoch's abort unanswered, so aborting held the slot down for the whole transaction
    timeout (a CI run's frozen-relay test waited 60 s for the woken relay)."""
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

    admin = AdminClient({"bootstrap.servers": broker.bootstrap_servers})
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(30)  # the fence's partition
    prefix = f"fenced-{uuid.uuid4().hex[:6]}"
    intruders: list[Producer] = []

    def fenced_first(producer: FaultyProducer, timeout: float) -> None:
        if not intruders:
            intruder = Producer(
                {"bootstrap.servers": broker.bootstrap_servers, "transactional.id": f"{prefix}-0"}
            )
            intruder.init_transactions(30)
            intruders.append(intruder)
            # A record of the open transaction finds the newer epoch: PRODUCER_FENCED, "the
            # transaction must be aborted" (not fatal), as the woken frozen relay met it.
            producer.real.produce(topic, value=b"after the fence", partition=0)
            producer.real.flush(30)
        producer.real.commit_transaction(timeout)

    ids = _publish(engine, topic, [f"v{i}" for i in range(5)])
    handle = start_relay(
        slots=1, transactional_id_prefix=prefix, seams=Faults(commit=fenced_first).seams()
    )
    wait_for(
        lambda: handle.relay.stats.fenced >= 1,
        timeout=20,
        what="the fenced relay to give its slot up (it waited out a 60 s abort before the fix)",
    )
    wait_for(lambda: _pending(engine) == 0, what="the relay takes the slot again and publishes")
    ours = [r for r in kafka.read_every(topic, ids) if "outbox-event-id" in r.headers]
    assert_exactly_once(ours, ids, aborted_copies_visible=not broker.filters_aborts)


@pytest.mark.needs_apache_kafka
def test_i12_a_fenced_relay_that_drops_its_producer_unaborted_holds_no_reader_back(
    engine: Engine,
    make_topic: Callable[..., str],
    bootstrap_servers: str,
    start_relay: Callable[..., RelayHandle],
    kafka: KafkaReader,
) -> None:
    """What dropping a fenced producer without an abort rests on, where users run: the fencing
    init_transactions itself ends the relay's open transaction (its records, its marker), so
    no read_committed reader of the partition waits for the transaction timeout (I12). A
    record written to the partition right after the fence, before the relay learns of it, is
    readable at once. (Tansu is the other test's broker: it ends the transaction too.)"""
    from confluent_kafka import Consumer, Producer

    topic = make_topic(partitions=1)  # the relay's records and the sample share the partition
    prefix = f"fenced-{uuid.uuid4().hex[:6]}"
    reader = Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": f"lso-{uuid.uuid4().hex[:8]}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    reader.assign([TopicPartition(topic, 0, 0)])
    plain = Producer({"bootstrap.servers": bootstrap_servers})
    intruders: list[Producer] = []
    waits: list[float] = []

    def fenced_first(producer: FaultyProducer, timeout: float) -> None:
        if not intruders:  # the batch's records are acknowledged; its transaction is open
            intruder = Producer(
                {"bootstrap.servers": bootstrap_servers, "transactional.id": f"{prefix}-0"}
            )
            intruder.init_transactions(30)
            intruders.append(intruder)
            sample = uuid.uuid4().bytes
            plain.produce(topic, value=sample, partition=0)
            plain.flush(10)
            written = time.monotonic()
            while time.monotonic() - written < 10:
                msg = reader.poll(0.1)
                if msg is not None and not msg.error() and msg.value() == sample:
                    waits.append(time.monotonic() - written)
                    break
            else:
                waits.append(float("inf"))
        producer.real.commit_transaction(timeout)

    try:
        ids = _publish(engine, topic, [f"v{i}" for i in range(5)])
        handle = start_relay(
            slots=1, transactional_id_prefix=prefix, seams=Faults(commit=fenced_first).seams()
        )
        wait_for(lambda: handle.relay.stats.fenced >= 1, timeout=60, what="the relay fenced")
    finally:
        reader.close()
    assert waits, "the fence was never made"
    assert waits[0] < 5, (
        f"a read_committed reader waited {waits} s for a record written after the fence: the "
        "fenced relay's transaction stayed open"
    )
    wait_for(lambda: _pending(engine) == 0, what="the relay takes the slot again and publishes")
    records = kafka.read(topic, len(ids) + 1)  # read_committed; the sample has no event id
    ours = [r for r in records if "outbox-event-id" in r.headers]
    assert_exactly_once(ours, ids, aborted_copies_visible=False)


@pytest.mark.both_brokers
@pytest.mark.parametrize("guarantee", [Guarantee.EXACTLY_ONCE, ALO])
def test_i6_a_missing_topic_is_held_then_buried_while_the_other_topics_flow(
    engine: Engine,
    topic: str,
    start_relay: Callable[..., RelayHandle],
    kafka: KafkaReader,
    guarantee: Guarantee,
) -> None:
    """A row for a topic that does not exist (auto-create off) was retried forever as
    transient, and every other topic of its slot waited behind it."""
    missing = f"{topic}.DLT"
    seams = _inject(
        lambda producer, batch: {
            i: KafkaError.UNKNOWN_TOPIC_OR_PART for i, r in enumerate(batch) if r.topic == missing
        },
    )
    lost = _publish(engine, missing, ["m1", "m2"], keys=1)
    flowing = _publish(engine, topic, [f"v{i}" for i in range(20)], keys=1)
    handle = start_relay(
        slots=1,
        guarantee=guarantee,
        seams=seams,
        missing_topic_timeout=10.0,
        # On Apache Kafka the topic really is missing: librdkafka reports it after this.
        producer_overrides={
            "request.timeout.ms": "40000",
            "topic.metadata.propagation.max.ms": "1000",
        },
    )
    wait_for(lambda: _pending(engine, topic) == 0, timeout=20, what="the other topic flowed")
    assert _pending(engine, missing) == 2, "the missing topic's rows were buried before its time"
    wait_for(lambda: len(_dead(engine)) == 2, timeout=30, what="rows of the missing topic buried")
    handle.stop()
    dead = _dead(engine)
    assert sorted(str(d.event_id) for d in dead) == sorted(lost)
    assert all("--missing-topic-timeout=10s" in d.error for d in dead)
    records = kafka.read(topic, 20)
    assert {r.event_id for r in records} >= set(flowing)


def test_i6_a_request_wide_refusal_buries_only_the_row_at_fault_in_key_order(
    engine: Engine,
    topic: str,
    drain: Callable[..., Relay],
    kafka: KafkaReader,
) -> None:
    """A topic's max.message.bytes below the producer's refuses the whole request: every row
    of it was buried as poison, innocent ones included."""

    def refuse_requests_holding_the_big_one(
        producer: FaultyProducer, batch: list[Sent]
    ) -> dict[int, int]:
        if any(r.value in {b'"big"', b"big"} for r in batch):
            return dict.fromkeys(range(len(batch)), KafkaError.MSG_SIZE_TOO_LARGE)
        return {}

    values = [f"v{i}" for i in range(12)]
    values[5] = "big"
    ids = _publish(engine, topic, values)
    drain(slots=1, seams=_inject(refuse_requests_holding_the_big_one))
    dead = _dead(engine)
    assert [str(d.event_id) for d in dead] == [ids[5]]
    assert "MSG_SIZE_TOO_LARGE" in dead[0].error
    committed = {r.event_id: r for r in sorted(kafka.read(topic, 11), key=lambda r: r.offset)}
    assert set(committed) >= set(ids) - {ids[5]}
    by_key: dict[bytes | None, list[int]] = defaultdict(list)
    for r in sorted(committed.values(), key=lambda r: (r.partition, r.offset)):
        if r.event_id in ids:
            by_key[r.key].append(ids.index(r.event_id))
    assert all(order == sorted(order) for order in by_key.values())


def test_every_kafka_client_of_the_relay_gets_the_connection_settings(
    engine: Engine,
    topic: str,
    drain: Callable[..., Relay],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before the fix the admin client and the marker consumer got bootstrap.servers only, so
    the default relay could not start against a SASL_SSL cluster."""
    secured = {
        "security.protocol": "plaintext",
        "client.dns.lookup": "use_all_dns_ips",
        "socket.keepalive.enable": "true",
        "reconnect.backoff.max.ms": "2000",
    }
    received: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def spy(name: str, real: Any) -> Any:
        def make(settings: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
            received[name].append(dict(settings))
            return real(settings, *args, **kwargs)

        return make

    # every module of the relay that makes a client
    for module in (coordinator, relay_seams, kafka_probe, marker_reader):
        for name in ("Producer", "AdminClient", "Consumer"):
            if hasattr(module, name):
                monkeypatch.setattr(module, name, spy(name, getattr(module, name)))
    _publish(engine, topic, ["v"])
    drain(slots=1, producer_overrides={"request.timeout.ms": "40000", **secured})
    assert _pending(engine) == 0
    assert set(received) == {"Producer", "AdminClient", "Consumer"}
    for name, made in received.items():
        for settings in made:
            assert {k: settings.get(k) for k in secured} == secured, name


def test_a_claim_stops_at_its_byte_budget_and_leaves_huge_values_unloaded(
    engine: Engine,
) -> None:
    saved = configure().max_message_bytes
    configure(max_message_bytes=None)
    try:
        with Session(engine) as session, session.begin():
            for size in (100_000, 100_000, 100_000, 2_000_000, 100_000):
                publish(session, topic="t", key="k", value=b"x" * size)
    finally:
        configure(max_message_bytes=saved)
    claim = sql.claim_batch(range(32))
    params = {"limit": 1000, "held": [], "max_value_bytes": 1_000_000, "max_bytes": 250_000}
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(claim, params).all()
        # The first row always, then rows while the running total stays under the budget.
        assert [r.value_bytes for r in rows] == [100_000] * 3
        params["max_bytes"] = 10_000_000
        rows = conn.exec_driver_sql(claim, params).all()
        assert [r.value_bytes for r in rows] == [100_000] * 3 + [2_000_000, 100_000]
        assert rows[3].value is None  # above the relay's limit: never loaded
    with engine.begin() as conn:  # a backlog behind them, so the planner's choice matters
        conn.execute(
            text(
                "INSERT INTO outbox_events (event_id, topic, shard, key, value, header_names, "
                "header_values) SELECT gen_random_uuid(), 't', i % 32, NULL, 'v', '{}', '{}' "
                "FROM generate_series(1, 5000) AS i"
            )
        )
        conn.execute(text("ANALYZE outbox_events"))
        params["limit"] = 100
        plan = conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + claim, params).scalar_one()
    # The budget is a window over the claim's index scan, stopped by its LIMIT.
    assert "outbox_events_pkey" in json.dumps(plan) or "Index Scan" in json.dumps(plan)
    assert "Seq Scan" not in json.dumps(plan)
    assert '"Limit"' in json.dumps(plan)


def test_i6_a_row_too_large_for_the_relay_is_buried_without_being_loaded(
    engine: Engine,
    topic: str,
    drain: Callable[..., Relay],
    kafka: KafkaReader,
) -> None:
    saved = configure().max_message_bytes
    configure(max_message_bytes=None)
    try:
        ids = _publish(engine, topic, ["before", "x" * 3_000_000, "after"], keys=1)
    finally:
        configure(max_message_bytes=saved)
    claimed: list[Row] = []
    drain(slots=1, seams=Faults(claimed=lambda session, rows: claimed.extend(rows)).seams())
    dead = _dead(engine)
    assert [r.value for r in claimed if str(r.event_id) == ids[1]] == [None]
    assert [str(d.event_id) for d in dead] == [ids[1]]
    assert len(dead[0].value) == 3_000_000  # moved aside whole, by the database
    assert "exceeds message.max.bytes=1000000" in dead[0].error
    assert [r.value for r in kafka.read(topic, 2)] == [b"before", b"after"]


# -- on Apache Kafka: what Tansu cannot show -------------------------------------------


@pytest.mark.needs_apache_kafka
def test_the_relay_publishes_through_a_sasl_listener(
    engine: Engine, topic: str, broker: Broker, drain: Callable[..., Relay], kafka: KafkaReader
) -> None:
    """SCRAM-SHA-512 on every client: before, the admin client that creates the state topic
    and the marker consumer got bootstrap.servers only and could not connect."""
    secured = broker.cluster.sasl_client_config()
    bootstrap = secured.pop("bootstrap.servers")
    ids = _publish(engine, topic, [f"v{i}" for i in range(10)])
    drain(
        slots=1,
        bootstrap_servers=bootstrap,
        state_topic=f"outbox.sasl-state.{uuid.uuid4().hex[:6]}",
        producer_overrides={"request.timeout.ms": "40000", **secured},
    )
    assert _pending(engine) == 0
    assert sorted(r.event_id for r in kafka.read(topic, 10)) == sorted(ids)


@pytest.mark.needs_apache_kafka
def test_i6_a_topic_that_does_not_exist_is_buried_after_its_timeout_on_apache_kafka(
    engine: Engine, topic: str, start_relay: Callable[..., RelayHandle], kafka: KafkaReader
) -> None:
    """auto.create.topics.enable=false: before, its rows blocked the slot forever."""
    missing = f"{topic}.DLT"
    lost = _publish(engine, missing, ["m1", "m2"], keys=1)
    flowing = _publish(engine, topic, [f"v{i}" for i in range(10)], keys=1)
    handle = start_relay(
        slots=1,
        missing_topic_timeout=8.0,
        producer_overrides={
            "request.timeout.ms": "40000",
            "topic.metadata.propagation.max.ms": "1000",
        },
    )
    wait_for(lambda: _pending(engine, topic) == 0, timeout=60, what="the other topic flowed")
    wait_for(lambda: len(_dead(engine)) == 2, timeout=90, what="the missing topic's rows buried")
    handle.stop()
    assert sorted(str(d.event_id) for d in _dead(engine)) == sorted(lost)
    assert sorted(r.event_id for r in kafka.read(topic, 10)) == sorted(flowing)


@pytest.mark.needs_apache_kafka
def test_i6_a_topics_max_message_bytes_buries_only_the_large_row_on_apache_kafka(
    engine: Engine, make_topic: Callable[..., str], drain: Callable[..., Relay], kafka: KafkaReader
) -> None:
    """The broker refuses the whole request holding the large record: before, every row of it
    was buried, innocent ones included."""
    topic = make_topic(config={"max.message.bytes": "20000"})
    values: list[Any] = [f"v{i}" for i in range(12)]
    values[5] = os.urandom(60_000)  # incompressible: too large for the topic, not the producer
    with Session(engine) as session, session.begin():
        ids = [str(publish(session, topic=topic, key="k", value=v)) for v in values]
    drain(slots=1)
    assert [str(d.event_id) for d in _dead(engine)] == [ids[5]]
    records = kafka.read(topic, 11)
    assert [r.event_id for r in records] == ids[:5] + ids[6:]  # one key: in order


def test_i8_a_database_lost_during_start_up_is_waited_for_by_the_daemon(
    engine: Engine,
    database_url: str,
    topic: str,
    kafka: KafkaReader,
    start_relay: Callable[..., RelayHandle],
) -> None:
    """A PostgreSQL restart while a relay starts used to end the daemon with a traceback."""
    ids = _publish(engine, topic, [f"v{i}" for i in range(20)])
    database = engine.url.database
    with engine.connect() as locker:
        # The relay's start-up reads the identity row: hold it there, then cut its connection.
        locker.execute(text("LOCK TABLE outbox_identity IN ACCESS EXCLUSIVE MODE"))

        def blocked_backend() -> int | None:
            with engine.connect() as conn:
                return conn.execute(
                    text(
                        "SELECT pid FROM pg_stat_activity WHERE datname = :db "
                        "AND wait_event_type = 'Lock' AND application_name LIKE 'outbox-relay:%'"
                    ),
                    {"db": database},
                ).scalar()

        handle = start_relay()
        pid = wait_for(blocked_backend, what="the relay's start-up blocked on the identity row")
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        locker.rollback()
    wait_for(lambda: _pending(engine) == 0, timeout=60, what="the relay to publish after all")
    assert handle.thread.is_alive()
    assert handle.error is None
    assert_exactly_once(kafka.read(topic, len(ids)), ids)


def test_i4_a_failed_marker_read_is_retried_with_new_kafka_clients(
    engine: Engine,
    topic: str,
    kafka: KafkaReader,
    drain: Callable[..., Relay],
    relay_config: Callable[..., RelayConfig],
) -> None:
    """A marker reader stuck on stale metadata after a node restart (``_UNKNOWN_PARTITION`` on
    every retry, found by the chaos run on Apache Kafka) kept its slot from publishing."""
    ids = _publish(engine, topic, [f"a{i}" for i in range(5)])
    drain(slots=1)  # the slot's first marker: the next owner reads it
    ids += _publish(engine, topic, [f"b{i}" for i in range(10)])
    config = relay_config(once=True, slots=1)
    real = kafka_consumers(
        config.producer_plan().connection, lambda: f"{config.transactional_id_prefix}-markers"
    )
    used: list[_StaleOnce] = []  # the clients themselves, so no id is reused

    def consumers(isolation: str) -> MarkerConsumer:
        if isolation != "read_committed":  # the takeover's read is the read_committed one
            return real(isolation)
        return _StaleOnce(real(isolation), used)

    relay = Relay(config, markers=KafkaMarkerReader(config.state_topic, consumers))
    relay.run()
    assert len(used) >= 2, "the marker was read once: the injected failure did not strike"
    assert all(c is not used[0] for c in used[1:]), "a retry read with the client that failed"
    assert _pending(engine) == 0
    assert_exactly_once(kafka.read(topic, len(ids)), ids)


class _StaleOnce:
    """A real marker consumer; the first one built answers its first read with the error a
    client stuck on stale metadata returns (``_UNKNOWN_PARTITION``)."""

    def __init__(self, real: MarkerConsumer, used: list[_StaleOnce]) -> None:
        self.real = real
        self.used = used
        self.stale = not used

    def assign(self, partitions: list[TopicPartition], /) -> None:
        self.used.append(self)
        self.real.assign(partitions)

    def poll(self, timeout: float = -1, /) -> Message | None:
        if self.stale:  # once: a retry with this client fails the test by its assertions
            self.stale = False
            return Message(offset=0, error=KafkaError(KafkaError._UNKNOWN_PARTITION))
        return self.real.poll(timeout)

    def unassign(self) -> None:
        self.real.unassign()

    def position(self, partitions: list[TopicPartition], /) -> list[TopicPartition]:
        return self.real.position(partitions)

    def get_watermark_offsets(
        self, partition: TopicPartition, /, timeout: float = -1, cached: bool = False
    ) -> tuple[int, int]:
        return self.real.get_watermark_offsets(partition, timeout=timeout, cached=cached)

    def close(self) -> None:
        self.real.close()
