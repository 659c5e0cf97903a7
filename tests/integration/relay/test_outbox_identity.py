"""I9: recovery deletes only its own rows, and outboxes sharing a Kafka cluster never collide.

Every relay here runs with the DEFAULT transactional-id prefix and state topic unless the
test is about an explicit prefix: the layout most teams deploy (many services, one cluster).
"""

from __future__ import annotations

import contextlib
import json
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from confluent_kafka import Producer
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from outbox import publish, sql
from outbox.errors import ConfigError
from outbox.migrate import upgrade
from outbox.partitioner import shard_for, slot_of_shard
from outbox.relay import Relay, Seams
from outbox.relay.config import Guarantee, RelayConfig
from outbox.relay.marker import Marker
from outbox.relay.marker_reader import KafkaMarkerReader, kafka_consumers
from outbox.schema import VERSION_TABLE, metadata
from tests.conftest import RelayHandle, Services, create_database, drop_database
from tests.integration.relay.faults import Faults, FaultyProducer
from tests.support import KafkaReader, wait_for

STATE_TOPIC = "outbox.relay-state"  # the default


@pytest.fixture
def other_db(services: Services) -> Iterator[str]:
    """A second service's database, migrated by `outbox migrate`'s code (its own identity)."""
    url = create_database(services, "outbox_other")
    upgrade(url)
    yield url
    drop_database(services, url)


@pytest.fixture
def other_engine(other_db: str) -> Iterator[Engine]:
    eng = create_engine(other_db)
    yield eng
    eng.dispose()


@dataclass(frozen=True)
class Two:
    """Two services' outboxes (databases of their own) on one Kafka cluster."""

    a: Engine
    b: Engine
    a_url: str
    b_url: str
    bootstrap_servers: str


@pytest.fixture
def two(
    engine: Engine, other_engine: Engine, database_url: str, other_db: str, bootstrap_servers: str
) -> Two:
    return Two(engine, other_engine, database_url, other_db, bootstrap_servers)


def _config(dsn: str, bootstrap_servers: str, **overrides: Any) -> RelayConfig:
    """Default settings: no transactional-id prefix, the default state topic."""
    fields: dict[str, Any] = {
        "dsn": dsn,
        "bootstrap_servers": bootstrap_servers,
        "slots": 2,
        "poll_interval": 0.2,
        "producer_overrides": {"request.timeout.ms": "40000"},
    }
    fields.update(overrides)
    return RelayConfig(**fields)


def _drain(
    dsn: str,
    bootstrap_servers: str,
    *,
    seams: Seams | None = None,
    stop: threading.Event | None = None,
    **overrides: Any,
) -> Relay:
    relay = Relay(_config(dsn, bootstrap_servers, once=True, **overrides), seams=seams, stop=stop)
    relay.run()
    return relay


def _publish_many(engine: Engine, topic: str, n: int, *, key: str | None = None) -> list[str]:
    ids = []
    with Session(engine) as session, session.begin():
        for i in range(n):
            k = key if key is not None else f"key-{i % 7}"
            ids.append(str(publish(session, topic=topic, key=k, value={"i": i})))
    return ids


def _pending(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM outbox_events")).scalar_one())


def _identity(engine: Engine) -> uuid.UUID:
    with engine.connect() as conn:
        return uuid.UUID(str(conn.execute(text("SELECT outbox_id FROM outbox_identity")).one()[0]))


def _on_topic(kafka: KafkaReader, topic: str, expected: int) -> Counter[str]:
    return Counter(r.event_id for r in kafka.read(topic, expected))


def test_i9_migrate_gives_every_outbox_its_own_identity_shown_by_status(
    engine: Engine, other_engine: Engine, other_db: str
) -> None:
    from outbox.cli.views import read_status, render_status

    ours, theirs = _identity(engine), _identity(other_engine)
    assert ours != theirs
    upgrade(other_db)  # migrating again keeps it
    assert _identity(other_engine) == theirs
    with other_engine.begin() as conn:  # dropped and created again: another outbox
        # Back to what revision 0002 left: what the later revisions added is undone.
        conn.execute(text("DROP TABLE outbox_identity, outbox_consumer_attempts"))
        conn.execute(text("ALTER TABLE outbox_events DROP COLUMN dead_attempts"))
        conn.execute(text("DROP TABLE outbox_deliveries"))
        conn.execute(text("UPDATE outbox_alembic_version SET version_num = '0002'"))
    upgrade(other_db)
    assert _identity(other_engine) != theirs
    theirs = _identity(other_engine)
    shown = render_status(read_status(other_db))
    assert str(theirs) in shown
    assert f"outbox-{theirs.hex[:12]}" in shown


def test_i9_two_outboxes_with_default_settings_relayed_one_after_the_other_lose_nothing(
    two: Two, kafka: KafkaReader, make_topic: Callable[..., str]
) -> None:
    """The issue's smallest case: B's relay used to delete B's rows named by A's marker."""
    topic_a, topic_b = make_topic(), make_topic()  # Apache Kafka creates none on use
    ids_a = _publish_many(two.a, topic_a, 200)
    ids_b = _publish_many(two.b, topic_b, 200)
    relay_a = _drain(two.a_url, two.bootstrap_servers)
    relay_b = _drain(two.b_url, two.bootstrap_servers)
    assert (relay_a.stats.published, relay_b.stats.published) == (200, 200)
    assert relay_b.stats.recovered == 0
    assert _on_topic(kafka, topic_a, 200) == Counter(ids_a)
    assert _on_topic(kafka, topic_b, 200) == Counter(ids_b)


def test_i9_two_outboxes_with_default_settings_side_by_side_lose_nothing_and_never_fence(
    two: Two, kafka: KafkaReader, make_topic: Callable[..., str]
) -> None:
    topic_a, topic_b = make_topic(), make_topic()  # Apache Kafka creates none on use
    with contextlib.ExitStack() as running:
        handles = [
            running.enter_context(RelayHandle(Relay(_config(dsn, two.bootstrap_servers))))
            for dsn in (two.a_url, two.b_url)
        ]
        wait_for(
            lambda: all(len(h.relay.workers) == 2 for h in handles), what="relays own their slots"
        )
        ids_a: list[str] = []
        ids_b: list[str] = []
        for _ in range(8):  # both services write while both relays run
            ids_a += _publish_many(two.a, topic_a, 100)
            ids_b += _publish_many(two.b, topic_b, 100)
        wait_for(
            lambda: _pending(two.a) == 0 and _pending(two.b) == 0,
            timeout=60,
            what="both outboxes drained",
        )
    assert [h.relay.stats.fenced for h in handles] == [0, 0]
    assert [h.relay.stats.recovered for h in handles] == [0, 0]
    assert _on_topic(kafka, topic_a, 800) == Counter(ids_a)
    assert _on_topic(kafka, topic_b, 800) == Counter(ids_b)


def test_i9_an_outbox_dropped_and_migrated_again_loses_nothing_to_its_old_markers(
    engine: Engine, database_url: str, bootstrap_servers: str, topic: str, kafka: KafkaReader
) -> None:
    first = _publish_many(engine, topic, 30)
    _drain(database_url, bootstrap_servers)  # its markers name outbox ids 1..30
    with engine.begin() as conn:
        tables = [t.name for t in metadata.sorted_tables] + [VERSION_TABLE]
        conn.execute(text(f"DROP TABLE IF EXISTS {', '.join(tables)}"))
    upgrade(database_url)  # a new outbox: a new identity (see the test above)
    second = _publish_many(engine, topic, 30)  # outbox ids 1..30 again
    relay = _drain(database_url, bootstrap_servers)
    assert relay.stats.recovered == 0
    assert relay.stats.published == 30
    assert _on_topic(kafka, topic, 60) == Counter(first + second)


def test_i9_a_restored_database_loses_nothing_to_a_marker_naming_its_reused_ids(
    engine: Engine, database_url: str, bootstrap_servers: str, topic: str, kafka: KafkaReader
) -> None:
    """A restore keeps the identity but moves the id sequence back under the last marker."""
    first = _publish_many(engine, topic, 40)
    _drain(database_url, bootstrap_servers, slots=1)  # the marker: ids 1..40, these events
    with engine.begin() as conn:
        conn.execute(text("ALTER TABLE outbox_events ALTER COLUMN id RESTART WITH 1"))
    second = _publish_many(engine, topic, 40)  # ids 1..40, other events
    relay = _drain(database_url, bootstrap_servers, slots=1)
    assert relay.stats.recovered == 0
    assert relay.stats.published == 40
    assert _on_topic(kafka, topic, 80) == Counter(first + second)


def _ensure_state_topic(bootstrap_servers: str, database_url: str) -> None:
    Relay(_config(database_url, bootstrap_servers)).kafka.ensure_state_topic(STATE_TOPIC)


def _forged(kind: str, outbox_id: uuid.UUID, tid: str) -> bytes:
    ids = list(range(1, 201))
    if kind == "version-1 marker naming the ids":
        return json.dumps({"tid": tid, "slot": 0, "ranges": [[1, 200]]}).encode()
    if kind == "another outbox's marker":
        return Marker.of_batch(uuid.uuid4(), tid, 0, 1, [(i, uuid.uuid4()) for i in ids]).encode()
    if kind == "our identity, other events":
        return Marker.of_batch(outbox_id, tid, 0, 1, [(i, uuid.uuid4()) for i in ids]).encode()
    if kind == "deeply nested JSON":
        return b"[" * 5000 + b"]" * 5000
    if kind == "huge garbage":
        return b"\x00" * 900_000
    if kind == "more events than a batch":
        raw = Marker.of_batch(outbox_id, tid, 0, 1, [(1, uuid.uuid4())]).encode()
        head = 4 + 16 + 2 + 2 + 1 + len(tid)
        return raw[:head] + (10**6).to_bytes(4, "big") + raw[head + 4 :]
    raise AssertionError(kind)


@pytest.mark.parametrize(
    ("kind", "ignored"),
    [
        ("version-1 marker naming the ids", 1),
        ("another outbox's marker", 1),
        ("our identity, other events", 0),  # applied: no row is one of its events
        ("deeply nested JSON", 1),
        ("huge garbage", 1),
        ("more events than a batch", 1),
    ],
)
def test_i9_a_forged_or_malformed_marker_deletes_nothing_and_stalls_nothing(
    kind: str,
    ignored: int,
    engine: Engine,
    database_url: str,
    bootstrap_servers: str,
    topic: str,
    kafka: KafkaReader,
) -> None:
    ids = _publish_many(engine, topic, 200)
    _ensure_state_topic(bootstrap_servers, database_url)
    with engine.begin() as conn:  # an outbox whose relays ran before: they read markers
        conn.execute(text("UPDATE outbox_identity SET slot_count = 1"))
    tid = f"outbox-{_identity(engine).hex[:12]}-0"
    forger = Producer({"bootstrap.servers": bootstrap_servers, "message.max.bytes": 2_000_000})
    forger.produce(
        STATE_TOPIC, key=tid.encode(), value=_forged(kind, _identity(engine), tid), partition=0
    )
    assert forger.flush(30) == 0
    relay = _drain(database_url, bootstrap_servers, slots=1)
    assert relay.stats.published == 200
    assert _on_topic(kafka, topic, 200) == Counter(ids)
    assert relay.stats.recovered == 0
    assert relay.stats.markers_ignored == ignored
    sample = relay.metrics.registry.get_sample_value("outbox_relay_markers_ignored_total")
    assert sample == ignored


def test_i9_two_outboxes_given_the_same_prefix_are_refused_before_fencing_the_other(
    two: Two, kafka: KafkaReader, make_topic: Callable[..., str]
) -> None:
    prefix = f"shared-{uuid.uuid4().hex[:6]}"
    topic_a, topic_b = make_topic(), make_topic()  # Apache Kafka creates none on use
    config = _config(two.a_url, two.bootstrap_servers, transactional_id_prefix=prefix)
    with RelayHandle(Relay(config)) as a:
        ids_a = _publish_many(two.a, topic_a, 50)
        wait_for(lambda: _pending(two.a) == 0, what="A publishes (its markers name A)")
        ids_b = _publish_many(two.b, topic_b, 50)
        with pytest.raises(ConfigError) as refused:
            _drain(two.b_url, two.bootstrap_servers, transactional_id_prefix=prefix)
        ids_a += _publish_many(two.a, topic_a, 50)
        wait_for(lambda: _pending(two.a) == 0, what="A goes on publishing")
    assert a.relay.stats.fenced == 0  # B refused before its init_transactions
    message = str(refused.value)
    assert f"--transactional-id-prefix={prefix}" in message
    assert str(_identity(two.a)) in message
    assert f"--replaces-outbox {_identity(two.a)}" in message
    assert _pending(two.b) == 50  # nothing deleted, nothing published
    assert _on_topic(kafka, topic_a, 100) == Counter(ids_a)
    # Deliberately taking the prefix over (e.g. A's outbox was re-created as B's):
    gone = _identity(two.a)
    relay = _drain(
        two.b_url, two.bootstrap_servers, transactional_id_prefix=prefix, replaces_outbox=gone
    )
    assert relay.stats.recovered == 0
    assert _on_topic(kafka, topic_b, 50) == Counter(ids_b)


def _lose_the_first_delete(
    faults: Faults | None = None, *, slot: int | None = None, stop: threading.Event | None = None
) -> tuple[Faults, list[int]]:
    """From now on, the first batch (of ``slot``) committed to Kafka loses its database
    delete, as if the relay died in between (and the relay is told to ``stop``); the faults
    to run the relay with (``faults``, armed, or new ones) and the slots it happened to."""
    crashed: list[int] = []
    faults = faults or Faults()

    def commit_then_lose_the_connection(producer: FaultyProducer, timeout: float) -> None:
        producer.real.commit_transaction(timeout)
        if not crashed and slot in (None, producer.slot):
            crashed.append(producer.slot)
            if stop is not None:
                stop.set()
            faults.lose_connection()  # the delete never commits

    faults.commit = commit_then_lose_the_connection
    return faults, crashed


def _keys_of_slot(slot: int, slots: int, n: int) -> list[str]:
    keys: list[str] = []
    i = 0
    while len(keys) < n:
        key = f"key-{i}"
        if slot_of_shard(shard_for(key.encode(), uuid.uuid4()), slots) == slot:
            keys.append(key)
        i += 1
    return keys


def test_i4_a_slot_count_change_with_a_batch_in_flight_loses_and_duplicates_nothing(
    engine: Engine,
    database_url: str,
    bootstrap_servers: str,
    topic: str,
    kafka: KafkaReader,
) -> None:
    """A 4-slot relay dies between slot 3's Kafka commit and its delete; the operator
    restarts with --slots=2, whose slots never use slot 3's transactional id."""
    stop = threading.Event()
    faults, crashed = _lose_the_first_delete(slot=3, stop=stop)
    ids: list[str] = []
    for key in _keys_of_slot(3, 4, 5):
        ids += _publish_many(engine, topic, 8, key=key)
    _drain(database_url, bootstrap_servers, slots=4, seams=faults.seams(), stop=stop)
    assert crashed
    assert _pending(engine) == 40
    relay = _drain(database_url, bootstrap_servers, slots=2)
    assert relay.stats.markers_ignored == 0  # the old layout's markers are expected
    assert relay.stats.recovered == 40
    assert _pending(engine) == 0
    assert _on_topic(kafka, topic, 40) == Counter(ids)  # each exactly once


def test_i8_relays_started_together_with_different_slot_counts_cannot_both_run(
    database_url: str, bootstrap_servers: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The check and the announcement are one step: a slow announcement cannot let both in."""
    monkeypatch.setattr(
        sql, "LOCK_SLOT_COUNT", "SELECT pg_sleep(1), " + sql.LOCK_SLOT_COUNT.removeprefix("SELECT ")
    )
    relays = [
        Relay(
            _config(
                database_url,
                bootstrap_servers,
                slots=n,
                transactional_id_prefix=f"race-{uuid.uuid4().hex[:6]}",
            )
        )
        for n in (2, 3)
    ]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def run(relay: Relay) -> None:
        barrier.wait()
        try:
            relay.run()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in relays]
    for t in threads:
        t.start()
    try:
        wait_for(
            lambda: errors or all(len(r.workers) for r in relays),
            timeout=30,
            what="one relay refused, or both running",
        )
        running = [r for r in relays if r.workers]
        assert len(errors) == 1, f"both relays run: {[r.config.slots for r in running]}"
        assert isinstance(errors[0], ConfigError)
        assert "every relay of one database must use the same slot count" in str(errors[0])
    finally:
        for r in relays:
            r.stop.set()
        for t in threads:
            t.join(60)


@pytest.mark.both_brokers
def test_i4_a_takeover_applies_the_slots_last_marker_even_behind_an_open_transaction(
    engine: Engine,
    database_url: str,
    bootstrap_servers: str,
    topic: str,
    kafka: KafkaReader,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another producer's open transaction in the state partition holds read_committed
    readers back below the slot's last marker: the takeover waits (and retries) instead
    of settling for the older marker and publishing the last batch twice."""
    prefix = f"lso-{uuid.uuid4().hex[:6]}"
    config = _config(database_url, bootstrap_servers, slots=1, transactional_id_prefix=prefix)
    consumers = kafka_consumers(config.producer_plan().connection, lambda: f"{prefix}-markers")
    markers = KafkaMarkerReader(config.state_topic, consumers, timeout=1.0)
    faults = Faults()
    with RelayHandle(Relay(config, markers=markers, seams=faults.seams())) as handle:
        intruder = Producer(
            {"bootstrap.servers": bootstrap_servers, "transactional.id": f"intruder-{prefix}"}
        )
        first = _publish_many(engine, topic, 10)
        wait_for(lambda: _pending(engine) == 0, what="first batch published (marker 1)")
        intruder.init_transactions(30)
        intruder.begin_transaction()
        intruder.produce(STATE_TOPIC, key=b"intruder", value=b"open", partition=0)
        assert intruder.flush(30) == 0
        _, crashed = _lose_the_first_delete(faults)  # marker 2 follows the open transaction
        second = _publish_many(engine, topic, 10)
        wait_for(lambda: crashed, what="second batch committed to Kafka, its delete lost")
        wait_for(
            lambda: handle.relay.stats.retries >= 1,
            what="the takeover waits for the open transaction instead of using marker 1",
        )
        assert _pending(engine) == 10
        intruder.commit_transaction(30)
        wait_for(lambda: _pending(engine) == 0, what="marker 2 applied")
    assert handle.relay.stats.recovered == 10
    assert _on_topic(kafka, topic, 20) == Counter(first + second)  # each exactly once


def test_i4_the_first_relay_of_a_new_outbox_still_recovers_the_batches_it_wrote(
    engine: Engine,
    database_url: str,
    bootstrap_servers: str,
    topic: str,
    kafka: KafkaReader,
) -> None:
    """A new outbox's first relay skips reading markers (none exist under its new default
    ids) only until it wrote one: a slot it takes again recovers as always."""
    faults, crashed = _lose_the_first_delete()
    ids = _publish_many(engine, topic, 40)
    config = _config(database_url, bootstrap_servers, slots=1)
    with RelayHandle(Relay(config, seams=faults.seams())) as handle:
        wait_for(lambda: _pending(engine) == 0, what="the slot is taken again and recovered")
    assert handle.relay.first_run
    assert crashed
    assert handle.relay.stats.recovered == 40
    assert _on_topic(kafka, topic, 40) == Counter(ids)  # each exactly once


def test_i9_another_outbox_with_its_own_settings_never_refuses_one_with_defaults(
    two: Two, kafka: KafkaReader, make_topic: Callable[..., str]
) -> None:
    """The settings relays of one outbox announce to each other are per outbox: a service
    whose relay uses another guarantee, prefix, state topic and slot count does not stop
    another service's relay with default settings on the same server and cluster."""
    topic_b = make_topic()
    custom = _config(
        two.a_url,
        two.bootstrap_servers,
        slots=3,
        guarantee=Guarantee.AT_LEAST_ONCE,
        transactional_id_prefix=f"custom-{uuid.uuid4().hex[:6]}",
        state_topic=f"custom.state-{uuid.uuid4().hex[:6]}",
    )
    with contextlib.ExitStack() as running:
        a = running.enter_context(RelayHandle(Relay(custom)))
        wait_for(lambda: len(a.relay.workers) == 3, what="the custom relay owns its slots")
        b = running.enter_context(RelayHandle(Relay(_config(two.b_url, two.bootstrap_servers))))
        wait_for(lambda: len(b.relay.workers) == 2, what="the default relay owns its slots")
        ids_b = _publish_many(two.b, topic_b, 50)
        wait_for(lambda: _pending(two.b) == 0, timeout=60, what="the default outbox drained")
        assert a.thread.is_alive()
        assert b.thread.is_alive()
    assert [h.relay.stats.fenced for h in (a, b)] == [0, 0]
    assert _on_topic(kafka, topic_b, 50) == Counter(ids_b)
