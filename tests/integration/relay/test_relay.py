"""The relay: I2 (no loss), I3 (per-key order), I4 (recovery marker, fencing), I6 (poison rows)."""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import KafkaError
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from outbox import publish, sql
from outbox.embedded import EmbeddedBroker, free_port
from outbox.errors import ConfigError
from outbox.partitioner import partition_for, shard_for, shards_of_slot, slot_of_shard
from outbox.relay import Relay
from outbox.relay.config import Guarantee, RelayConfig
from tests.conftest import Broker, RelayHandle
from tests.integration.relay.faults import Faults, FaultyProducer, Sent
from tests.support import KafkaReader, TcpProxy, assert_exactly_once, read_topic, wait_for


def _pending(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM outbox_events")).scalar_one())


def _publish_many(
    engine: Engine, topic: str, n: int, *, keys: int = 5, per_tx: int = 1
) -> list[str]:
    ids: list[str] = []
    for start in range(0, n, per_tx):
        with Session(engine) as session, session.begin():
            for i in range(start, min(n, start + per_tx)):
                ids.append(
                    str(
                        publish(
                            session,
                            topic=topic,
                            key=f"key-{i % keys}",
                            value={"i": i, "key": f"key-{i % keys}"},
                        )
                    )
                )
    return ids


def test_i2_committed_events_reach_kafka_intact(
    engine: Engine, topic: str, drain: Callable[..., Relay], kafka: KafkaReader
) -> None:
    with Session(engine) as session, session.begin():
        e1 = publish(
            session,
            topic=topic,
            key="order-1",
            value={"total": "12.50"},
            headers=[("event-type", "OrderPlaced"), ("bin", b"\x00\xff")],
        )
        e2 = publish(session, topic=topic, key=b"\x01\x02", value=b"\x00raw")
        e3 = publish(session, topic=topic, key=None, value="plain text")
        created = session.execute(text("SELECT now()")).scalar_one()
    relay = drain()
    assert relay.stats.published == 3
    assert _pending(engine) == 0
    published = kafka.read(topic, 3)
    assert_exactly_once(published, [str(e1), str(e2), str(e3)])
    records = {r.event_id: r for r in published}
    r1, r2, r3 = records[str(e1)], records[str(e2)], records[str(e3)]
    assert (r1.key, json.loads(r1.value or b"")) == (b"order-1", {"total": "12.50"})
    assert r1.headers["event-type"] == b"OrderPlaced"
    assert r1.headers["bin"] == b"\x00\xff"
    assert r1.headers["content-type"] == b"application/json"
    assert (r2.key, r2.value, r2.headers["content-type"]) == (
        b"\x01\x02",
        b"\x00raw",
        b"application/octet-stream",
    )
    assert (r3.key, r3.value) == (None, b"plain text")
    assert abs(r1.timestamp_ms - created.timestamp() * 1000) < 1000
    # Java-compatible partitioner: the same key lands where a Java producer would put it
    partitions = 4  # Tansu auto-creates topics with 4 partitions; Kafka tests create them so
    assert r1.partition == partition_for(b"order-1", partitions)
    assert r2.partition == partition_for(b"\x01\x02", partitions)


def test_i3_per_key_order_across_batches_and_slots(
    engine: Engine, topic: str, drain: Callable[..., Relay], kafka: KafkaReader
) -> None:
    ids = _publish_many(engine, topic, 300, keys=7, per_tx=3)
    drain(slots=3, batch_size=17)
    records = kafka.read(topic, 300)
    assert sorted(r.event_id for r in records) == sorted(ids)
    seen: dict[bytes | None, list[int]] = defaultdict(list)
    partitions: dict[bytes | None, set[int]] = defaultdict(set)
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        seen[r.key].append(json.loads(r.value or b"")["i"])
        partitions[r.key].add(r.partition)
    for key, values in seen.items():
        assert values == sorted(values), f"key {key!r} out of order"
        assert len(partitions[key]) == 1


@pytest.mark.parametrize("guarantee", [Guarantee.AT_LEAST_ONCE, Guarantee.AT_MOST_ONCE])
def test_other_guarantees_deliver_everything_on_a_healthy_broker(
    engine: Engine,
    topic: str,
    drain: Callable[..., Relay],
    kafka: KafkaReader,
    guarantee: Guarantee,
) -> None:
    ids = _publish_many(engine, topic, 50)
    drain(guarantee=guarantee)
    assert _pending(engine) == 0
    assert sorted(r.event_id for r in kafka.read(topic, 50)) == sorted(ids)


QUIET_POLL = 3600.0
"""The relay's poll interval where a test shows that something else wakes it: an hour."""
WAKE_UP = 60.0
"""How long such a test waits for the wake-up: far below `QUIET_POLL`, far above the
milliseconds it takes, so a busy machine cannot fail the test and a missing wake-up does."""


def test_notify_wakes_the_slot_owning_each_shard(
    engine: Engine, topic: str, start_relay: Callable[..., RelayHandle], kafka: KafkaReader
) -> None:
    # Polling alone would take an hour: only a NOTIFY can wake a slot within the wait below,
    # which is generous for a busy machine.
    handle = start_relay(slots=4, poll_interval=QUIET_POLL)
    wait_for(lambda: len(handle.relay.workers) == 4, what="relay owns all slots")
    wait_for(handle.relay.listening.is_set, what="relay LISTENs")  # or a NOTIFY goes unheard
    keys: dict[int, str] = {}  # one key per slot: each wake-up must reach its own slot
    for i in range(1000):
        key = f"key-{i}"
        keys.setdefault(slot_of_shard(shard_for(key.encode(), uuid.uuid4()), 4), key)
    assert sorted(keys) == [0, 1, 2, 3]
    ids = []
    for _ in range(3):
        for key in keys.values():
            with Session(engine) as session, session.begin():
                ids.append(str(publish(session, topic=topic, key=key, value="v")))
        wait_for(
            lambda: _pending(engine) == 0, timeout=WAKE_UP, what="NOTIFY wakes the owning slot"
        )
    handle.stop()
    assert sorted(r.event_id for r in kafka.read(topic, len(ids))) == sorted(ids)


def test_without_notify_a_busy_relay_polls_again_within_milliseconds(
    engine: Engine, topic: str, start_relay: Callable[..., RelayHandle], kafka: KafkaReader
) -> None:
    """The adaptive poll: no LISTEN, an hour's interval, yet a busy outbox is relayed at once."""
    ids = _publish_many(engine, topic, 5)
    handle = start_relay(slots=1, listen=False, poll_interval=QUIET_POLL)
    for _ in range(3):
        wait_for(lambda: _pending(engine) == 0, timeout=WAKE_UP, what="the relay found the rows")
        ids += _publish_many(engine, topic, 5)  # the interval's poll would find these in an hour
    wait_for(lambda: _pending(engine) == 0, timeout=WAKE_UP, what="the relay polled again at once")
    handle.stop()
    assert not handle.relay.listening.is_set()
    assert sorted(r.event_id for r in kafka.read(topic, len(ids))) == sorted(ids)


@pytest.fixture
def proxied_broker(broker: Broker) -> Iterator[tuple[EmbeddedBroker, TcpProxy]]:
    """A broker that clients reach only through a proxy we can cut (it advertises the proxy)."""
    if broker.name == "kafka":
        pytest.skip("starts its own Tansu behind a proxy: once, in the [tansu] run")
    proxy_port = free_port()
    tansu = EmbeddedBroker(advertised_port=proxy_port)
    proxy: TcpProxy | None = None
    try:
        tansu.start()
        proxy = TcpProxy(tansu.port, proxy_port)
        yield tansu, proxy
    finally:
        if proxy is not None:
            proxy.close()
        tansu.stop()


def test_i2_rows_stay_in_outbox_until_the_broker_has_them(
    engine: Engine,
    topic: str,
    proxied_broker: tuple[EmbeddedBroker, TcpProxy],
    start_relay: Callable[..., RelayHandle],
) -> None:
    broker, proxy = proxied_broker
    handle = start_relay(
        bootstrap_servers=broker.bootstrap_servers,
        transaction_timeout=5.0,
        producer_overrides={"request.timeout.ms": "2000", "socket.timeout.ms": "2000"},
    )
    first = _publish_many(engine, topic, 10)
    wait_for(lambda: _pending(engine) == 0, what="first events published")
    proxy.cut()
    second = _publish_many(engine, topic, 10)
    retries_before = handle.relay.stats.retries
    wait_for(
        lambda: handle.relay.stats.retries >= retries_before + 2,
        timeout=60,
        what="relay retried publishing while the broker is unreachable",
    )
    assert _pending(engine) == 10, "rows left the outbox while Kafka could not have them"
    proxy.restore()
    wait_for(
        lambda: _pending(engine) == 0, timeout=90, what="outbox drained after the broker is back"
    )
    handle.stop()
    # The retried transactions may have been aborted; this broker (Tansu) shows their records.
    records = read_topic(broker.bootstrap_servers, topic, expected=20)
    assert_exactly_once(records, first + second, aborted_copies_visible=True)


@pytest.mark.both_brokers
def test_i4_crash_between_kafka_commit_and_delete_is_not_published_again(
    engine: Engine,
    topic: str,
    start_relay: Callable[..., RelayHandle],
    kafka: KafkaReader,
) -> None:
    """The recovery marker: the next owner deletes the rows instead of publishing them again."""
    crashed: list[int] = []

    def lose_connection_after_the_kafka_commit(producer: FaultyProducer, timeout: float) -> None:
        producer.real.commit_transaction(timeout)
        if not crashed:
            crashed.append(producer.slot)
            faults.lose_connection()  # the DB transaction that deleted the rows never commits

    faults = Faults(commit=lose_connection_after_the_kafka_commit)
    ids = _publish_many(engine, topic, 40, per_tx=40)
    handle = start_relay(slots=1, seams=faults.seams())
    wait_for(lambda: _pending(engine) == 0, what="new owner recovers and drains")
    handle.stop()
    assert crashed, "the fault was not injected"
    assert handle.relay.stats.recovered == 40
    assert_exactly_once(kafka.read(topic, 40), ids)  # nothing was aborted: on any broker


def test_i2_a_batch_leaves_the_outbox_only_after_its_kafka_commit(
    engine: Engine,
    topic: str,
    drain: Callable[..., Relay],
    kafka: KafkaReader,
) -> None:
    """The delete runs while the broker acknowledges the batch but commits after Kafka's."""
    pending_at_kafka_commit: list[int] = []

    def look_from_another_session(producer: FaultyProducer, timeout: float) -> None:
        pending_at_kafka_commit.append(_pending(engine))
        producer.real.commit_transaction(timeout)

    ids = _publish_many(engine, topic, 30)
    drain(slots=1, batch_size=10, seams=Faults(commit=look_from_another_session).seams())
    assert pending_at_kafka_commit == [30, 20, 10]
    assert _pending(engine) == 0
    assert sorted(r.event_id for r in kafka.read(topic, 30)) == sorted(ids)


@pytest.mark.both_brokers
def test_i3_a_failed_batch_is_published_again_before_the_batch_claimed_after_it(
    engine: Engine,
    topic: str,
    drain: Callable[..., Relay],
    kafka: KafkaReader,
    broker: Broker,
) -> None:
    """In a backlog the next batch is claimed while one is in flight; a failure drops it."""
    batches: list[int] = []
    failed: list[int] = []

    def second_batch_fails_once(producer: FaultyProducer, batch: list[Sent]) -> dict[int, int]:
        batches.append(len(batch))
        if not failed and len(batches) == 2:  # the 2nd batch; the 3rd is claimed while it is
            failed.append(len(batches))  # in flight, then dropped with it
            return {0: KafkaError._MSG_TIMED_OUT}
        return {}

    ids = _publish_many(engine, topic, 40, keys=3, per_tx=40)
    relay = drain(slots=1, batch_size=10, seams=Faults(reports=second_batch_fails_once).seams())
    assert failed, "the fault was not injected"
    assert relay.stats.aborts == 1
    assert relay.stats.published == 40
    # Tansu shows the aborted attempt's records too: each event's last copy is its committed one.
    records = kafka.read(topic, 40)
    assert_exactly_once(records, ids, aborted_copies_visible=not broker.filters_aborts)
    committed = {r.event_id: r for r in sorted(records, key=lambda r: r.offset)}
    by_key: dict[bytes | None, list[int]] = defaultdict(list)
    for r in sorted(committed.values(), key=lambda r: (r.partition, r.offset)):
        by_key[r.key].append(json.loads(r.value or b"")["i"])
    assert all(values == sorted(values) for values in by_key.values())


def test_i6_poison_row_is_moved_aside_and_its_shard_moves_on(
    engine: Engine, topic: str, drain: Callable[..., Relay], kafka: KafkaReader
) -> None:
    with Session(engine) as session, session.begin():
        before = publish(session, topic=topic, key="k", value="before")
        poison = publish(session, topic=topic, key="k", value=b"x" * 20_000)
        after = publish(session, topic=topic, key="k", value="after")
    relay = drain(  # a batch's marker must fit message.max.bytes too: a smaller batch
        producer_overrides={"message.max.bytes": "10000", "request.timeout.ms": "40000"},
        batch_size=100,
    )
    assert relay.stats.dead == 1
    assert _pending(engine) == 0
    with engine.connect() as conn:
        dead = conn.execute(text("SELECT event_id, error FROM outbox_dead_events")).one()
    assert dead.event_id == poison
    assert "message.max.bytes=10000" in dead.error
    records = kafka.read(topic, 2)
    assert [r.value for r in records] == [b"before", b"after"]
    assert_exactly_once(records, [str(before), str(after)])


def test_i8_relays_with_different_slot_counts_refuse_to_run_together(
    start_relay: Callable[..., RelayHandle], relay_config: Callable[..., RelayConfig]
) -> None:
    handle = start_relay(slots=2)
    wait_for(lambda: len(handle.relay.workers) == 2, what="first relay owns its slots")
    with pytest.raises(ConfigError, match="--slots=3, but a running relay uses --slots=2"):
        Relay(relay_config(slots=3)).run()
    handle.stop()


def test_relays_share_slots_and_take_over_when_one_stops(
    engine: Engine, topic: str, start_relay: Callable[..., RelayHandle], kafka: KafkaReader
) -> None:
    prefix = f"share-{uuid.uuid4().hex[:6]}"
    a = start_relay(slots=4, transactional_id_prefix=prefix)
    wait_for(lambda: len(a.relay.workers) == 4, what="a owns all slots")
    b = start_relay(slots=4, transactional_id_prefix=prefix)
    wait_for(
        lambda: len(a.relay.workers) == 2 and len(b.relay.workers) == 2,
        timeout=30,
        what="slots spread over two relays",
    )
    ids = _publish_many(engine, topic, 100, keys=13)
    wait_for(lambda: _pending(engine) == 0, what="both relays drain")
    a.stop()
    wait_for(lambda: len(b.relay.workers) == 4, timeout=30, what="b takes a's slots over")
    more = _publish_many(engine, topic, 50, keys=13)
    wait_for(lambda: _pending(engine) == 0, what="b drains alone")
    b.stop()
    assert sorted(r.event_id for r in kafka.read(topic, 150)) == sorted(ids + more)


@pytest.mark.both_brokers
def test_i4_a_new_owner_fences_the_old_producer_and_the_slot_recovers(
    engine: Engine,
    topic: str,
    bootstrap_servers: str,
    broker: Broker,
    start_relay: Callable[..., RelayHandle],
    kafka: KafkaReader,
) -> None:
    """Another producer with the slot's transactional.id fences the relay; the relay fences back."""
    from confluent_kafka import KafkaException, Producer

    prefix = f"fence-{uuid.uuid4().hex[:6]}"
    handle = start_relay(slots=1, transactional_id_prefix=prefix)
    first = _publish_many(engine, topic, 10)
    wait_for(lambda: _pending(engine) == 0, what="first batch published")
    intruder = Producer({"bootstrap.servers": bootstrap_servers, "transactional.id": f"{prefix}-0"})
    intruder.init_transactions(30)  # bumps the epoch: the relay's producer is now a zombie
    second = _publish_many(engine, topic, 10)
    wait_for(lambda: handle.relay.stats.fenced >= 1, what="relay notices it was fenced")
    wait_for(lambda: _pending(engine) == 0, what="relay re-takes the slot and publishes")
    intruder.begin_transaction()
    intruder.produce(topic, value=b"zombie")
    with pytest.raises(KafkaException):
        intruder.commit_transaction(30)  # fenced in turn by the relay's new producer
    handle.stop()
    records = kafka.read(topic, 20)
    ours = [r for r in records if "outbox-event-id" in r.headers]  # not the intruder's
    # The fenced transaction was aborted: Tansu shows its records, Apache Kafka does not.
    assert_exactly_once(ours, first + second, aborted_copies_visible=not broker.filters_aborts)


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


def test_a_slots_claim_reads_none_of_the_rows_of_a_slot_that_lags(engine: Engine) -> None:
    """Backlog independence: 4000 rows of a lagging slot wait in front of the others' rows."""
    lagging, claiming = shards_of_slot(0, 4), shards_of_slot(1, 4)
    with engine.begin() as conn:
        for shards, n in ((lagging, 4000), (claiming, 50)):
            conn.execute(
                text(
                    "INSERT INTO outbox_events (event_id, topic, shard, key, value, "
                    "header_names, header_values) SELECT gen_random_uuid(), 't', "
                    "(CAST(:shards AS smallint[]))[1 + i % cardinality(CAST(:shards AS "
                    "smallint[]))], NULL, 'v', '{}', '{}' FROM generate_series(1, :n) AS i"
                ),
                {"shards": shards, "n": n},
            )
        conn.execute(text("ANALYZE outbox_events"))
        params = {"limit": 20, "held": [], "max_value_bytes": 1_000_000, "max_bytes": 1 << 24}
        plan = conn.exec_driver_sql(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + sql.claim_batch(claiming), params
        ).scalar_one()[0]["Plan"]
        claimed = conn.exec_driver_sql(sql.claim_batch(claiming), params).all()
    nodes = list(_plan_nodes(plan))
    scans = [n for n in nodes if n["Node Type"] == "Index Scan"]
    assert {n["Index Name"] for n in scans} == {"outbox_events_shard_id"}
    assert len(scans) == len(claiming)
    # It reads what it returns (plus one look-ahead row per shard), not the lagging slot's rows.
    assert sum(n["Actual Rows"] for n in scans) <= 20 + len(claiming)
    assert not any(n.get("Rows Removed by Filter") for n in nodes)
    ids = [row.id for row in claimed]
    assert len(ids) == 20
    assert ids == sorted(ids)
    with engine.connect() as conn:
        first = conn.execute(
            text("SELECT id FROM outbox_events WHERE shard = ANY(:s) ORDER BY id LIMIT 20"),
            {"s": claiming},
        ).scalars()
        assert ids == list(first)


def test_i2_a_relay_whose_slots_own_one_shard_each_publishes_every_shard(
    engine: Engine,
    topic: str,
    start_relay: Callable[..., RelayHandle],
    kafka: KafkaReader,
    broker: Broker,
) -> None:
    """17 slots or more (up to the 32 shards) give slots a single shard each: that slot's claim
    is one shard's range scan, and it must run (a slot whose claim the database refuses
    retries it for ever, and its shard's events are never published)."""
    ids = _publish_many(engine, topic, 64, keys=64, per_tx=64)
    with engine.connect() as conn:
        shards = set(conn.execute(text("SELECT DISTINCT shard FROM outbox_events")).scalars())
    assert {15, 16} & shards  # shards of the slots of 17 that own one
    start_relay(slots=17)
    wait_for(lambda: _pending(engine) == 0, timeout=30, what="every shard's events published")
    # 17 transactional producers at once: on a busy machine a batch may abort and go again,
    # and Tansu shows the aborted copies. Its last stable offset can also stick below the
    # last batches (read_every reads past it there; CI runs read 3 and 6 events short).
    assert_exactly_once(
        kafka.read_every(topic, ids), ids, aborted_copies_visible=not broker.filters_aborts
    )
