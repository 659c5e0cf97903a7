"""I5 and I7 against real PostgreSQL and a real broker: effects once, failures dead-lettered once.

Each consumer runs in a thread of the test process. The effects table has no
unique constraint on purpose: an effect applied twice shows up as two rows.
"""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from consumer import (
    ConsumerStats,
    Event,
    EventTypes,
    IdempotentConsumer,
    Record,
    RetryPolicy,
    purge_processed,
    runner_of,
)
from consumer.dedup import mark_processed
from outbox import publish
from outbox.errors import ConfigError
from tests.support import InThread, KafkaReader, stop_all, wait_for

GROUP_SETTINGS = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"}
"""The group join takes ~3 s on Tansu with these, ~23 s with the defaults."""

FAST_RETRY = RetryPolicy(attempts=3, initial_backoff=0.01, max_backoff=0.05, jitter=0)


class Projector(IdempotentConsumer):
    """Writes one effect row per handled event; fails on demand; counts handler calls."""

    topics: ClassVar[list[str]] = ["set-per-test"]
    group_id = "set-per-test"

    def __init__(
        self, *args: Any, fail: Callable[[Event], Exception | None] | None = None, **kw: Any
    ) -> None:
        super().__init__(*args, **kw)
        self.fail = fail
        self.calls: Counter[str] = Counter()
        self.seen: list[Event] = []

    def handle(self, session: Session, event: Event) -> None:
        self.calls[event.id] += 1
        self.seen.append(event)
        error = self.fail(event) if self.fail else None
        if error is not None:
            raise error
        session.execute(
            text("INSERT INTO effects (event_id, consumer) VALUES (:event_id, :consumer)"),
            {"event_id": event.id, "consumer": self.config.group_id + "/" + str(id(self))},
        )


class Running(InThread[ConsumerStats]):
    """A consumer in a thread; ``stop()`` returns its counters (and re-raises its failure)."""

    def __init__(self, consumer: Projector) -> None:
        super().__init__(consumer, what="consumer")
        self.consumer = consumer
        self.thread.start()

    @property
    def stats(self) -> ConsumerStats:
        if self.error is not None:
            raise self.error
        return runner_of(self.consumer).stats


@dataclass
class Fixture:
    engine: Engine
    database_url: str
    bootstrap_servers: str
    topic: str
    group: str


@pytest.fixture
def env(
    engine: Engine,
    database_url: str,
    bootstrap_servers: str,
    topic: str,
    make_topic: Callable[..., str],
) -> Fixture:
    make_topic(f"{topic}.DLT")  # Apache Kafka here does not create topics on first use
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE effects (event_id text NOT NULL, consumer text NOT NULL)"))
    return Fixture(engine, database_url, bootstrap_servers, topic, f"g-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def start_consumer(env: Fixture) -> Iterator[Callable[..., Running]]:
    running: list[Running] = []

    def start(cls: type[Projector] = Projector, **kw: Any) -> Running:
        kw.setdefault("topics", [env.topic])
        kw.setdefault("group_id", env.group)
        kw.setdefault("settings", GROUP_SETTINGS)
        kw.setdefault("retry", FAST_RETRY)
        handle = Running(cls(env.engine, env.bootstrap_servers, **kw))
        running.append(handle)
        return handle

    yield start
    stop_all(running)


def _effects(engine: Engine) -> Counter[str]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT event_id FROM effects")).scalars().all()
    return Counter(rows)


def _publish(engine: Engine, topic: str, values: list[dict[str, Any]], **kw: Any) -> list[str]:
    ids = []
    with Session(engine) as session, session.begin():
        for value in values:
            ids.append(
                str(
                    publish(
                        session,
                        topic=topic,
                        key=kw.get("key", "k"),
                        value=value,
                        **{k: v for k, v in kw.items() if k != "key"},
                    )
                )
            )
    return ids


def _committed(bootstrap_servers: str, group: str, topic: str) -> dict[int, int]:
    """The group's committed offsets, by partition (negative: none yet)."""
    reader = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": group})
    try:
        parts = [TopicPartition(topic, p) for p in range(4)]
        return {tp.partition: tp.offset for tp in reader.committed(parts, timeout=10)}
    finally:
        reader.close()


def _produce(
    bootstrap_servers: str, topic: str, records: list[tuple[bytes, bytes, list[Any]]]
) -> None:
    """Records from "another producer" (not through the outbox)."""
    producer = Producer({"bootstrap.servers": bootstrap_servers, "enable.idempotence": True})
    for key, value, headers in records:
        producer.produce(topic, key=key, value=value, headers=headers)
    assert producer.flush(30) == 0


# -- I5: duplicates change the database once --------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 100], ids=["found-in-db", "found-in-same-batch"])
def test_i5_duplicate_delivery_changes_db_once(
    env: Fixture,
    drain: Callable[..., Any],
    kafka: KafkaReader,
    start_consumer: Callable[..., Running],
    batch_size: int,
) -> None:
    """The same event published twice (a relay replay after its row was deleted) is applied once."""
    event_id = uuid.uuid4()
    other = _publish(env.engine, env.topic, [{"n": 0}])
    for attempt in (1, 2):
        with Session(env.engine) as session, session.begin():
            publish(session, topic=env.topic, key="k", value={"n": attempt}, event_id=event_id)
        drain()
    records = kafka.read(env.topic, 3)
    assert Counter(r.event_id for r in records) == {str(event_id): 2, other[0]: 1}

    running = start_consumer(batch_size=batch_size)
    wait_for(
        lambda: running.stats.applied + running.stats.duplicates == 3,
        timeout=60,
        what="3 records handled",
    )
    last = max(r.offset for r in records)
    partition = records[0].partition
    wait_for(
        lambda: _committed(env.bootstrap_servers, env.group, env.topic)[partition] == last + 1,
        what="offsets committed after the DB commit",
    )
    stats = running.stop()
    assert _effects(env.engine) == {str(event_id): 1, other[0]: 1}
    assert running.consumer.calls[str(event_id)] == 1
    assert (stats.applied, stats.duplicates) == (2, 1)
    with env.engine.connect() as conn:
        recorded = conn.execute(
            text("SELECT event_id FROM outbox_processed_events WHERE group_id = :g"),
            {"g": env.group},
        ).scalars()
        assert sorted(recorded) == sorted([str(event_id), other[0]])


def test_i5_other_producers_are_deduplicated_by_the_user_key(
    env: Fixture, start_consumer: Callable[..., Running]
) -> None:
    class ByMessageId(Projector):
        def dedup_key(self, record: Record) -> str | None:
            return record.header("message-id")

    same = [("message-id", b"m-1")]
    _produce(
        env.bootstrap_servers,
        env.topic,
        [(b"k", b'{"n":1}', same), (b"k", b'{"n":1}', same), (b"k", b'{"n":2}', [])],
    )
    running = start_consumer(ByMessageId)
    wait_for(lambda: running.stats.applied + running.stats.duplicates == 3, timeout=60, what="3")
    stats = running.stop()
    effects = _effects(env.engine)
    assert effects["m-1"] == 1
    assert sum(effects.values()) == 2  # m-1 once, and the record without an id by position
    assert any(key.startswith(f"{env.topic}/") for key in effects)
    assert stats.duplicates == 1


def test_i5_position_fallback_skips_rereads_after_an_offset_reset(
    env: Fixture, start_consumer: Callable[..., Running]
) -> None:
    _produce(env.bootstrap_servers, env.topic, [(b"k", b'{"n":%d}' % i, []) for i in range(3)])
    first = start_consumer()
    wait_for(lambda: first.stats.applied == 3, timeout=60, what="first pass")
    first.stop()
    # Rewind the group to the start, as an operator's offset reset would.
    rewind = Consumer({"bootstrap.servers": env.bootstrap_servers, "group.id": env.group})
    committed = _committed(env.bootstrap_servers, env.group, env.topic)
    partition = next(p for p, offset in committed.items() if offset > 0)
    rewind.commit(offsets=[TopicPartition(env.topic, partition, 0)], asynchronous=False)
    rewind.close()
    second = start_consumer()
    wait_for(lambda: second.stats.duplicates == 3, timeout=60, what="re-reads skipped")
    assert second.stop().applied == 0
    assert sorted(_effects(env.engine).values()) == [1, 1, 1]


def test_i5_a_failing_handler_rolls_back_the_batch_and_it_is_redone_one_by_one(
    env: Fixture, drain: Callable[..., Any], start_consumer: Callable[..., Running]
) -> None:
    ids = _publish(env.engine, env.topic, [{"n": i} for i in range(6)])
    drain()
    bad = ids[2]
    running = start_consumer(
        batch_size=100,
        retry=RetryPolicy(attempts=3, initial_backoff=0.01, non_retryable=(KeyError,)),
        fail=lambda e: KeyError("no such customer") if e.id == bad else None,
    )
    wait_for(
        lambda: running.stats.applied == 5 and running.stats.dead_lettered == 1,
        timeout=60,
        what="5 applied and 1 dead letter",
    )
    stats = running.stop()
    assert _effects(env.engine) == {i: 1 for i in ids if i != bad}
    assert running.consumer.calls[bad] == 1  # non-retryable: the batch's call was its only one
    assert stats.fallbacks >= 1


# -- I7: retries, then exactly one dead letter through the outbox ------------------------


def test_i7_handler_failures_retried_then_one_dead_letter_and_the_partition_moves_on(
    env: Fixture,
    drain: Callable[..., Any],
    kafka: KafkaReader,
    start_consumer: Callable[..., Running],
) -> None:
    before, poison, after = _publish(
        env.engine,
        env.topic,
        [{"n": 1}, {"n": 2, "poison": True}, {"n": 3}],
        headers={"event-type": "OrderPlaced"},
    )
    drain()
    originals = {r.event_id: r for r in kafka.read(env.topic, 3)}
    running = start_consumer(
        fail=lambda e: ValueError(f"cannot apply {e.value}") if e.value.get("poison") else None,
    )
    wait_for(
        lambda: running.stats.applied == 2 and running.stats.dead_lettered == 1,
        timeout=60,
        what="the partition past the poison event",
    )
    original = originals[poison]
    wait_for(
        lambda: (
            _committed(env.bootstrap_servers, env.group, env.topic)[original.partition]
            == original.offset + 2
        ),
        what="offsets committed past the poison event",
    )
    stats = running.stop()
    assert running.consumer.calls[poison] == FAST_RETRY.attempts == 3
    assert stats.retries == 2
    assert _effects(env.engine) == {before: 1, after: 1}

    drain()  # the dead letter is an outbox row until the relay publishes it
    dead = kafka.read(f"{env.topic}.DLT", 1, timeout=30)
    assert len(dead) == 1
    letter = dead[0]
    assert (letter.key, letter.value) == (original.key, original.value)
    assert {k: v.decode() for k, v in letter.headers.items() if k != "outbox-event-id"} == {
        "event-type": "OrderPlaced",
        "dlt-reason": "retries-exhausted",
        "dlt-error-type": "ValueError",
        "dlt-error-message": "cannot apply {'n': 2, 'poison': True}",
        "dlt-attempts": "3",
        "dlt-original-topic": env.topic,
        "dlt-original-partition": str(original.partition),
        "dlt-original-offset": str(original.offset),
        "dlt-original-timestamp": str(original.timestamp_ms),
        "dlt-original-event-id": poison,
        "dlt-original-content-type": "application/json",
        "dlt-consumer-group": env.group,
        "content-type": "application/octet-stream",
    }


def test_i7_non_retryable_errors_are_dead_lettered_after_one_attempt(
    env: Fixture,
    drain: Callable[..., Any],
    kafka: KafkaReader,
    start_consumer: Callable[..., Running],
) -> None:
    (bad,) = _publish(env.engine, env.topic, [{"n": 1}])
    drain()
    running = start_consumer(
        batch_size=1,
        retry=RetryPolicy(attempts=5, initial_backoff=0.01, non_retryable=(LookupError,)),
        fail=lambda e: KeyError("missing"),
    )
    wait_for(lambda: running.stats.dead_lettered == 1, timeout=60, what="the dead letter")
    assert running.stop().retries == 0
    assert running.consumer.calls[bad] == 1
    drain()
    (letter,) = kafka.read(f"{env.topic}.DLT", 1, timeout=10)
    assert letter.headers["dlt-reason"] == b"non-retryable"
    assert letter.headers["dlt-error-type"] == b"KeyError"
    assert letter.headers["dlt-attempts"] == b"1"


def test_i7_undecodable_and_unregistered_type_records_go_straight_to_the_dead_letter_topic(
    env: Fixture,
    drain: Callable[..., Any],
    kafka: KafkaReader,
    start_consumer: Callable[..., Running],
) -> None:
    @dataclass(frozen=True)
    class Known:
        n: int

    types = EventTypes()
    types.register("Known", Known)

    class Typed(Projector):
        event_types = types

    broken_id = str(uuid.uuid4())
    _produce(
        env.bootstrap_servers,
        env.topic,
        [
            (
                b"k",
                b"{not json",
                [("outbox-event-id", broken_id.encode()), ("content-type", b"application/json")],
            )
        ],
    )
    known, evil = _publish(env.engine, env.topic, [{"n": 1}], headers={"event-type": "Known"}) + (
        _publish(env.engine, env.topic, [{"n": 2}], headers={"event-type": "os.system"})
    )
    drain()
    running = start_consumer(Typed)
    wait_for(
        lambda: running.stats.applied == 1 and running.stats.dead_lettered == 2,
        timeout=60,
        what="one typed event applied, two dead letters",
    )
    running.stop()
    assert set(running.consumer.calls) == {known}  # the handler never saw the other two
    assert running.consumer.seen[0].value == Known(1)
    drain()
    letters = kafka.read(f"{env.topic}.DLT", 2, timeout=30)
    assert len(letters) == 2  # one dead letter each, no copy
    by_id = {r.headers["dlt-original-event-id"].decode(): r for r in letters}
    assert set(by_id) == {broken_id, evil}
    for letter in letters:
        assert letter.headers["dlt-reason"] == b"undecodable"
        assert letter.headers["dlt-attempts"] == b"0"
    assert by_id[broken_id].value == b"{not json"
    assert b"is not registered" in by_id[evil].headers["dlt-error-message"]


# -- I5 through a rebalance ----------------------------------------------------------------


class OffsetCommitsNeverLand(Projector):
    """A member whose offset commits are all lost, as when a rebalance refuses them.

    Everything it applies is delivered again to whoever owns the partition next
    (the other member, or itself after a rebalance): only the dedup records
    stand between those redeliveries and doubled effects.
    """

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        runner_of(self).group.commit = lambda kafka, offsets: None  # the runner's seam


@pytest.mark.both_brokers
def test_i5_two_consumers_in_one_group_through_rebalances_apply_every_effect_once(
    env: Fixture,
    drain: Callable[..., Any],
    start_consumer: Callable[..., Running],
) -> None:
    def publish_batch(n: int, start: int) -> list[str]:
        ids = []
        for i in range(start, start + n, 50):  # several keys -> every partition
            ids += _publish(
                env.engine,
                env.topic,
                [{"n": j} for j in range(i, min(i + 50, start + n))],
                key=f"key-{i}",
            )
        drain()
        return ids

    ids = publish_batch(200, 0)
    a = start_consumer(OffsetCommitsNeverLand, batch_size=20)
    wait_for(lambda: a.stats.applied >= 100, timeout=60, what="A applying")
    b = start_consumer(batch_size=20)  # joins: partitions move, B re-reads what A applied
    wait_for(lambda: b.stats.duplicates > 0, timeout=60, what="B re-reading A's records")
    ids += publish_batch(200, 200)
    wait_for(lambda: len(_effects(env.engine)) == 400, timeout=90, what="400 effects")
    a_stats = a.stop()  # leaves: B takes every partition over and re-reads A's again
    ids += publish_batch(200, 400)
    wait_for(lambda: len(_effects(env.engine)) == 600, timeout=90, what="600 effects")
    b_stats = b.stop()
    effects = _effects(env.engine)
    assert set(effects) == set(ids)
    assert set(effects.values()) == {1}
    assert a_stats.applied + b_stats.applied == 600
    assert a_stats.applied > 0
    assert b_stats.applied > 0
    assert b_stats.duplicates >= a_stats.applied  # B re-read everything A applied


def test_i5_two_members_applying_the_same_event_at_once_apply_it_once(engine: Engine) -> None:
    """A zombie and the new owner race on one event: the second insert waits for the first
    transaction on the primary key, then finds the record and skips the handler."""
    first = Session(engine)
    first.begin()
    assert mark_processed(first, "g", ["e-1"]) == {"e-1"}
    result: list[set[str]] = []

    def second_member() -> None:
        with Session(engine) as session, session.begin():
            result.append(mark_processed(session, "g", ["e-1", "e-2"]))

    racer = threading.Thread(target=second_member)
    racer.start()
    wait_for(lambda: _waiting_on_a_lock(engine), what="the second insert to wait for the first")
    assert not result
    first.commit()
    first.close()
    racer.join(10)
    assert result == [{"e-2"}]


def _waiting_on_a_lock(engine: Engine) -> bool:
    with engine.connect() as conn:
        return bool(
            conn.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            ).scalar_one()
        )


# -- dedup window purge --------------------------------------------------------------------


def _insert_processed(engine: Engine, group: str, n: int, age: timedelta) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox_processed_events (group_id, event_id, processed_at) "
                "SELECT :g, :prefix || i, now() - :age FROM generate_series(1, :n) AS i"
            ),
            {"g": group, "prefix": f"{group}-{age.days}-", "age": age, "n": n},
        )


def _processed(engine: Engine) -> Counter[str]:
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT group_id FROM outbox_processed_events")).scalars()
        return Counter(rows)


def test_purge_deletes_only_the_groups_records_older_than_the_window_in_small_batches(
    engine: Engine,
) -> None:
    _insert_processed(engine, "g", 2500, timedelta(days=10))
    _insert_processed(engine, "g", 10, timedelta(days=1))
    _insert_processed(engine, "other", 5, timedelta(days=10))
    window = timedelta(days=7)
    assert purge_processed(engine, "g", window, batch_size=1000, max_batches=1) == (1000, False)
    assert purge_processed(engine, "g", window, batch_size=1000) == (1500, True)
    assert _processed(engine) == {"g": 10, "other": 5}


def test_the_consumer_purges_its_dedup_records_periodically(
    env: Fixture, start_consumer: Callable[..., Running]
) -> None:
    _insert_processed(env.engine, env.group, 30, timedelta(days=3))
    _insert_processed(env.engine, env.group, 5, timedelta(hours=1))
    running = start_consumer(dedup_window=timedelta(days=2), purge_interval=0.5)
    wait_for(lambda: _processed(env.engine)[env.group] == 5, timeout=30, what="old records purged")
    assert running.stop().purged == 30


# -- I8 --------------------------------------------------------------------------------------


def test_i8_missing_dedup_table_fails_before_joining_the_group(env: Fixture) -> None:
    with env.engine.begin() as conn:
        conn.execute(text("DROP TABLE outbox_processed_events"))
    consumer = Projector(env.engine, env.bootstrap_servers, topics=[env.topic], group_id=env.group)
    with pytest.raises(ConfigError, match="outbox migrate"):
        consumer.run()


def test_i8_a_setting_librdkafka_does_not_know_is_a_config_error(env: Fixture) -> None:
    consumer = Projector(
        env.engine,
        env.bootstrap_servers,
        topics=[env.topic],
        group_id=env.group,
        settings={"session.timeout.milliseconds": "6000"},
    )
    with pytest.raises(ConfigError, match=r"property: \"session\.timeout\.milliseconds\""):
        consumer.run()


def test_migrations_create_exactly_the_schema_metadata(engine: Engine) -> None:
    """Applications that include ``outbox.metadata`` get the tables ``outbox migrate`` makes."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from outbox.relay.deliveries import DEFAULT_PARTITION, partition_day
    from outbox.schema import VERSION_TABLE, metadata

    def not_a_partition(obj: object, name: str | None, type_: str, *_: object) -> bool:
        """The delivery record's partitions are made by the relay, not declared in metadata."""
        table = getattr(obj, "table", obj) if type_ == "index" else obj
        table_name = getattr(table, "name", name) or ""
        return table_name != DEFAULT_PARTITION and partition_day(table_name) is None

    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"include_object": not_a_partition})
        diff = compare_metadata(context, metadata)
    assert [d for d in diff if VERSION_TABLE not in repr(d)] == []


class TracedProjector(Projector):
    """Records the trace id current inside handle()."""

    def handle(self, session: Session, event: Event) -> None:
        from opentelemetry import trace

        self.trace_ids = [*getattr(self, "trace_ids", []), trace.get_current_span()]
        super().handle(session, event)


def test_trace_context_written_at_publish_is_restored_around_the_handler(
    env: Fixture, drain: Callable[..., object], start_consumer: Callable[..., Running]
) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("request") as span:
        _publish(env.engine, env.topic, [{"n": 1}])
        trace_id = span.get_span_context().trace_id
    drain()
    running = start_consumer(TracedProjector)
    wait_for(lambda: running.stats.applied == 1, timeout=60, what="event applied")
    running.stop()
    consumer = running.consumer
    assert isinstance(consumer, TracedProjector)
    [current] = consumer.trace_ids
    assert current.get_span_context().trace_id == trace_id
