"""What the product promises when Apache Kafka itself fails (only the 3-node cluster can fail so).

- A broker node SIGKILLed while the relay has a batch in flight, its partition leaders moving
  to the other nodes: no event lost, none twice on the topic for read_committed readers, each
  effect applied once, and the relay and the consumer carry on without being restarted (I2, I4,
  I5).
- The whole cluster stopped and started under load: the same.
- A consumer member stalled in its handler while holding a batch, past max.poll.interval.ms:
  the group gives its partition to another member, the stalled member's late offset commit is
  rejected, and every effect is still applied once (I5).

They share the session's cluster: a test that stops nodes starts them again before it ends,
pass or fail, and waits until every replica is back in sync, so the next test meets a whole
cluster.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from consumer import ConsumerStats, Event, IdempotentConsumer
from outbox import publish
from outbox.embedded.kafka_cluster import KafkaCluster
from tests.conftest import Broker, RelayHandle
from tests.support import InThread, KafkaReader, stop_all, wait_for

pytestmark = [pytest.mark.needs_apache_kafka, pytest.mark.timeout(420)]

GROUP_SETTINGS = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"}


class Effects(IdempotentConsumer):
    """One effect row per applied event; the table has no unique key, so a repeat shows."""

    topics: ClassVar[list[str]] = ["set-per-test"]
    group_id = "set-per-test"

    def handle(self, session: Session, event: Event) -> None:
        session.execute(
            text("INSERT INTO effects (event_id, member) VALUES (:e, :m)"),
            {"e": event.id, "m": threading.current_thread().name},
        )


class Member(InThread[ConsumerStats]):
    """A consumer running in a named thread (log records carry the name)."""

    def __init__(self, consumer: IdempotentConsumer, name: str) -> None:
        super().__init__(consumer, what=name, name=name)
        self.consumer = consumer
        self.thread.start()


@pytest.fixture
def cluster(broker: Broker) -> Iterator[KafkaCluster]:
    """The session's cluster; every node is running again when the test ends."""
    assert isinstance(broker.cluster, KafkaCluster)
    cluster = broker.cluster
    yield cluster
    stopped = [n for n in cluster.node_ids if n not in cluster.running_nodes()]
    if stopped:
        cluster.start_all()
    _wait_in_sync(cluster)


def _wait_in_sync(cluster: KafkaCluster) -> None:
    """Every partition of every topic has all its replicas in sync (the cluster is whole)."""
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap_servers})

    def whole() -> bool:
        md = admin.list_topics(timeout=10)
        return len(md.brokers) == cluster.node_count and all(
            len(p.isrs) == len(p.replicas) and p.leader >= 0
            for t in md.topics.values()
            for p in t.partitions.values()
        )

    wait_for(whole, timeout=120, what="every replica back in sync")


@pytest.fixture
def effects(engine: Engine) -> Engine:
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE effects (event_id text NOT NULL, member text NOT NULL)"))
    return engine


@pytest.fixture
def start_member(effects: Engine, bootstrap_servers: str) -> Iterator[Callable[..., Member]]:
    members: list[Member] = []

    def start(cls: type[IdempotentConsumer], name: str, **kw: Any) -> Member:
        kw.setdefault("settings", GROUP_SETTINGS)
        member = Member(cls(effects, bootstrap_servers, **kw), name)
        members.append(member)
        return member

    yield start
    stop_all(members)


class Writers:
    """Publishes events in small transactions at a steady pace until stopped."""

    def __init__(self, engine: Engine, topic: str, *, per_tx: int = 5, pause: float = 0.02):
        self.engine = engine
        self.topic = topic
        self.per_tx = per_tx
        self.pause = pause
        self.ids: list[str] = []
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="writers", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        n = 0
        try:
            while not self._stop.is_set():
                batch = []
                with Session(self.engine) as session, session.begin():
                    for _ in range(self.per_tx):
                        key = f"k{n % 16}"
                        batch.append(str(publish(session, topic=self.topic, key=key, value=n)))
                        n += 1
                self.ids += batch
                self._stop.wait(self.pause)  # the pace of the load, not a synchronisation
        except BaseException as exc:
            self.error = exc

    def stop(self) -> list[str]:
        """Stop writing (again is fine); the ids of every committed event."""
        self._stop.set()
        self.thread.join(30)
        if self.error is not None:
            raise self.error
        return list(self.ids)


def _outbox_rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM outbox_events")).scalar_one())


def _effect_counts(engine: Engine) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(conn.execute(text("SELECT event_id FROM effects")).scalars())


def _dedup_counts(engine: Engine, group: str) -> Counter[str]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT event_id FROM outbox_processed_events WHERE group_id = :g"), {"g": group}
        ).scalars()
        return Counter(rows)


def _assert_exactly_once(
    engine: Engine, kafka: KafkaReader, topic: str, group: str, ids: list[str]
) -> None:
    """Every event once on the topic (read_committed), once as an effect, once as dedup row."""
    wait_for(lambda: _outbox_rows(engine) == 0, timeout=120, what="the outbox drained")
    wait_for(
        lambda: set(_effect_counts(engine)) >= set(ids),
        timeout=120,
        what=f"all {len(ids)} events applied",
    )
    on_topic = Counter(r.event_id for r in kafka.read(topic, len(ids), timeout=60))
    assert set(on_topic) == set(ids), f"lost: {len(set(ids) - set(on_topic))}"
    twice = {e: c for e, c in on_topic.items() if c != 1}
    assert not twice, f"{len(twice)} events on the topic more than once"
    effects = _effect_counts(engine)
    assert set(effects) == set(ids)
    assert {e: c for e, c in effects.items() if c != 1} == {}, "an effect applied twice"
    assert set(_dedup_counts(engine, group).values()) == {1}


def _assert_still_running(relay: RelayHandle, member: Member) -> None:
    """Neither the relay nor the consumer stopped or was restarted on the way."""
    assert relay.error is None, relay.error
    assert relay.thread.is_alive()
    assert member.error is None, member.error
    assert member.thread.is_alive()


def _leaders(cluster: KafkaCluster, topic: str) -> dict[int, int]:
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap_servers})
    partitions = admin.list_topics(topic, timeout=10).topics[topic].partitions
    return {p: md.leader for p, md in partitions.items()}


@dataclass
class Pipeline:
    """Writers -> outbox -> relay -> topic -> consumer, all running, events flowing."""

    relay: RelayHandle
    member: Member
    writers: Writers
    group: str
    topic: str

    def check(self, engine: Engine, kafka: KafkaReader) -> None:
        """Stop writing; nothing was restarted, and every event went through exactly once."""
        ids = self.writers.stop()
        _assert_still_running(self.relay, self.member)
        _assert_exactly_once(engine, kafka, self.topic, self.group, ids)
        self.relay.stop()
        self.member.stop()


@pytest.fixture
def pipeline(
    effects: Engine,
    topic: str,
    start_relay: Callable[..., RelayHandle],
    start_member: Callable[..., Member],
) -> Iterator[Pipeline]:
    group = f"g-{uuid.uuid4().hex[:8]}"
    relay = start_relay(slots=2, poll_interval=0.05)
    member = start_member(Effects, "consumer", topics=[topic], group_id=group)
    wait_for(lambda: member.consumer.joined, timeout=60, what="the consumer joined its group")
    writers = Writers(effects, topic)
    try:
        wait_for(lambda: relay.relay.stats.published >= 200, timeout=60, what="a steady flow")
        yield Pipeline(relay, member, writers, group, topic)
    finally:
        writers.stop()


def _restart_stopped(cluster: KafkaCluster) -> None:
    if len(cluster.running_nodes()) < cluster.node_count:
        cluster.start_all()


def test_a_node_killed_mid_transaction_loses_and_repeats_nothing_and_nobody_restarts(
    cluster: KafkaCluster, pipeline: Pipeline, effects: Engine, kafka: KafkaReader
) -> None:
    stats = pipeline.relay.relay.stats
    consumed = pipeline.member.consumer.stats
    try:
        # The node leading most of the topic's partitions: killing it moves leaders.
        victim = Counter(_leaders(cluster, pipeline.topic).values()).most_common(1)[0][0]
        # A batch is claimed and not yet committed to Kafka: the kill lands in a transaction.
        wait_for(
            lambda: stats.claimed > stats.published + stats.dead,
            timeout=30,
            what="a batch in flight",
        )
        cluster.kill_node(victim)
        published_at_kill, applied_at_kill = stats.published, consumed.applied
        wait_for(
            lambda: victim not in _leaders(cluster, pipeline.topic).values(),
            timeout=60,
            what=f"leaders moved off killed node {victim}",
        )
        wait_for(
            lambda: stats.published >= published_at_kill + 200,
            timeout=120,
            what="the relay publishing again with a node down",
        )
        wait_for(
            lambda: consumed.applied >= applied_at_kill + 100,
            timeout=120,
            what="the consumer applying again with a node down",
        )
    finally:
        _restart_stopped(cluster)
    pipeline.check(effects, kafka)


def test_the_whole_cluster_restarted_under_load_loses_and_repeats_nothing(
    cluster: KafkaCluster, pipeline: Pipeline, effects: Engine, kafka: KafkaReader
) -> None:
    stats = pipeline.relay.relay.stats
    try:
        cluster.stop_all()
        backlog = _outbox_rows(effects)
        wait_for(
            lambda: _outbox_rows(effects) > backlog + 100,
            timeout=60,
            what="writers committing while the cluster is down",
        )
        cluster.start_all()
        published = stats.published
        wait_for(
            lambda: stats.published >= published + 200,
            timeout=180,
            what="the relay publishing again after the restart",
        )
    finally:
        _restart_stopped(cluster)
    pipeline.check(effects, kafka)


class Stalling(Effects):
    """Blocks in its handler on the first event it sees, inside the batch's DB transaction."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.stalled_on: str | None = None

    def handle(self, session: Session, event: Event) -> None:
        super().handle(session, event)
        if self.stalled_on is None:
            self.stalled_on = event.id
            self.entered.set()
            self.release.wait(120)


def _committed(bootstrap_servers: str, group: str, topic: str) -> int:
    reader = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": group})
    try:
        (tp,) = reader.committed([TopicPartition(topic, 0)], timeout=10)
        return int(tp.offset)
    finally:
        reader.close()


def test_a_stalled_member_loses_its_partition_its_late_commit_is_rejected_effects_once(
    effects: Engine,
    bootstrap_servers: str,
    make_topic: Callable[..., str],
    drain: Callable[..., Any],
    start_member: Callable[..., Member],
    caplog: pytest.LogCaptureFixture,
) -> None:
    topic = make_topic(partitions=1)
    group = f"g-{uuid.uuid4().hex[:8]}"
    # Heartbeats go on from librdkafka's own thread; a member whose application thread does
    # not come back to poll within max.poll.interval.ms leaves the group, like one whose
    # heartbeats stopped after session.timeout.ms.
    settings = {**GROUP_SETTINGS, "max.poll.interval.ms": "6000"}
    caplog.set_level(logging.WARNING, logger="outbox.consumer")
    first = _publish(effects, topic, 5)
    drain()
    stalled = start_member(Stalling, "stalled", topics=[topic], group_id=group, settings=settings)
    assert isinstance(stalled.consumer, Stalling)
    wait_for(stalled.consumer.entered.is_set, timeout=60, what="the member holding a batch")
    other = start_member(Effects, "other", topics=[topic], group_id=group, settings=settings)
    wait_for(
        lambda: (topic, 0) in other.consumer.assignment,
        timeout=60,
        what="the partition handed to the other member",
    )
    # The other member now reads the batch the stalled one holds; its dedup insert waits for
    # the stalled transaction. Let the stalled member finish: its transaction commits first.
    stalled.consumer.release.set()
    wait_for(
        lambda: _committed(bootstrap_servers, group, topic) >= len(first),
        timeout=60,
        what="the group's offset past the first batch",
    )

    def late_commits() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.threadName == "stalled" and "offset commit" in r.getMessage()
        ]

    # The other member's commit can move the offset before the stalled one even tries its own;
    # a refused late commit is logged, an accepted one is not (then this wait fails).
    wait_for(late_commits, timeout=60, what="the stalled member's late offset commit to be refused")
    rejected = late_commits()
    assert all("failed" in m for m in rejected), rejected
    # Both members keep working: more events, each applied once by one of them.
    second = _publish(effects, topic, 5)
    drain()
    ids = first + second
    wait_for(
        lambda: set(_effect_counts(effects)) >= set(ids), timeout=90, what="all events applied"
    )
    # Offsets count the transactions' commit markers too: past the records is enough.
    wait_for(
        lambda: _committed(bootstrap_servers, group, topic) >= len(ids),
        timeout=60,
        what="the group's offset past every event",
    )
    counts = _effect_counts(effects)
    assert {e: c for e, c in counts.items() if c != 1} == {}, "an effect applied twice"
    assert set(counts) == set(ids)
    assert set(_dedup_counts(effects, group).values()) == {1}
    assert other.consumer.stats.duplicates >= 1, "the other member never met the held batch"
    stalled.stop()
    other.stop()


def _publish(engine: Engine, topic: str, n: int) -> list[str]:
    with Session(engine) as session, session.begin():
        return [str(publish(session, topic=topic, key="one", value=i)) for i in range(n)]
