"""I10 around the consumer group: after a revoke nothing of the revoked partitions is
processed or committed; the logs say what is assigned and revoked; a broker outage
writes one line per backoff step; the dedup window is checked against the topics'
redelivery horizon the broker reports."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourceType,
)
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from consumer import Event, RetryLater, runner_of
from tests.integration.consumer.test_consumer_effects import GROUP_SETTINGS, Running
from tests.integration.consumer.test_consumer_hostile import PositionProjector
from tests.support import stop_all, wait_for

PARTITIONS = 4
PER_PARTITION = 5


class MidBatchRebalance:
    """Holds the member's first batch until the group rebalanced under it: the revoke lands
    between the consume() calls of one batch. Plugged into the runner's seams (its group's
    ``fetch`` and ``listeners``)."""

    def __init__(self) -> None:
        self.fetched = threading.Event()
        self.revoke_seen = threading.Event()
        self.reassigned = threading.Event()
        self._first = True

    def fetch(self, kafka: Any, default: Callable[[], list[Any]]) -> list[Any]:
        if not self._first:
            return default()
        self._first = False
        messages: list[Any] = []
        deadline = time.monotonic() + 60
        while len({m.partition() for m in messages}) < PARTITIONS:
            assert time.monotonic() < deadline, "never fetched every partition"
            messages += kafka.consume(num_messages=100, timeout=0.5)
        self.fetched.set()
        while not self.reassigned.is_set():  # the test starts a second member now
            assert time.monotonic() < deadline, "no rebalance"
            messages += kafka.consume(num_messages=1, timeout=0.2)
        return messages

    def revoked(self, partitions: list[TopicPartition]) -> None:
        self.revoke_seen.set()

    def assigned(self, partitions: list[TopicPartition]) -> None:
        if self.revoke_seen.is_set():
            self.reassigned.set()


class RevokedMidBatch(PositionProjector):
    """A member whose first batch is held over a rebalance; notes every record handled
    outside its assignment."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.hooks = MidBatchRebalance()
        self.outside: list[str] = []
        group = runner_of(self).group
        group.fetch = self.hooks.fetch
        group.listeners.append(self.hooks)

    def handle(self, session: Session, event: Event) -> None:
        if (event.topic, event.partition) not in self.assignment:
            self.outside.append(f"{event.topic}/{event.partition}/{event.offset}")
        super().handle(session, event)


@pytest.fixture
def members(
    effects: Engine, bootstrap_servers: str, topic: str
) -> Iterator[Callable[..., Running]]:
    group = f"g-{uuid.uuid4().hex[:8]}"
    handles: list[Running] = []

    def start(cls: type[PositionProjector] = PositionProjector, **kw: Any) -> Running:
        kw.setdefault("bootstrap", bootstrap_servers)
        consumer = cls(
            effects,
            kw.pop("bootstrap"),
            topics=[topic],
            group_id=group,
            **({"settings": GROUP_SETTINGS} | kw),
        )
        handle = Running(consumer)  # type: ignore[arg-type]
        handles.append(handle)
        return handle

    yield start
    stop_all(handles)


def _committed(bootstrap_servers: str, group: str, topic: str) -> dict[int, int]:
    reader = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": group})
    try:
        parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        return {tp.partition: tp.offset for tp in reader.committed(parts, timeout=10)}
    finally:
        reader.close()


@pytest.mark.both_brokers
def test_i10_after_a_revoke_mid_batch_nothing_of_the_revoked_partitions_is_processed(
    effects: Engine,
    bootstrap_servers: str,
    topic: str,
    members: Callable[..., Running],
    caplog: pytest.LogCaptureFixture,
) -> None:
    producer = Producer({"bootstrap.servers": bootstrap_servers})
    for p in range(PARTITIONS):
        for i in range(PER_PARTITION):
            producer.produce(topic, value=json.dumps({"i": i}).encode(), partition=p)
    assert producer.flush(30) == 0

    caplog.set_level(logging.INFO, logger="outbox.consumer")
    a = members(RevokedMidBatch)
    first = a.consumer
    assert isinstance(first, RevokedMidBatch)
    wait_for(first.hooks.fetched.is_set, timeout=60, what="A to fetch records of every partition")
    b = members()
    wait_for(first.hooks.reassigned.is_set, timeout=60, what="the rebalance")

    def all_applied() -> bool:
        with effects.connect() as conn:
            n = conn.execute(text("SELECT count(DISTINCT position) FROM effects")).scalar_one()
        return bool(n == PARTITIONS * PER_PARTITION)

    wait_for(all_applied, timeout=60, what="every record applied by its owner")
    group = first.config.group_id
    wait_for(
        lambda: (
            _committed(bootstrap_servers, group, topic)
            == dict.fromkeys(range(PARTITIONS), PER_PARTITION)
        ),
        timeout=30,
        what="every partition committed to its end",
    )
    a.stop()
    b.stop()
    assert first.outside == []  # nothing handled of a partition A no longer owned
    assert first.assignment == frozenset()
    assert "dropped" in caplog.text  # the in-hand records of B's partitions
    assert "waiting for a partition assignment" in caplog.text
    assert "revoked " in caplog.text
    assert "assigned " in caplog.text


class Rebalances:
    """Notes a member's revokes and the assignment that follows one (its group's listener)."""

    def __init__(self) -> None:
        self.revoke_seen = threading.Event()
        self.reassigned = threading.Event()

    def revoked(self, partitions: list[TopicPartition]) -> None:
        self.revoke_seen.set()

    def assigned(self, partitions: list[TopicPartition]) -> None:
        if self.revoke_seen.is_set():
            self.reassigned.set()


class WaitsForAGate(PositionProjector):
    """A handler whose dependency is down until the test opens the gate: every record waits
    in the runner's retry (partitions paused) meanwhile."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.gate = threading.Event()
        self.waited = threading.Event()
        self.hooks = Rebalances()
        runner_of(self).group.listeners.append(self.hooks)

    def handle(self, session: Session, event: Event) -> None:
        if not self.gate.is_set():
            self.waited.set()
            raise RetryLater("the dependency is down", delay=0.2)
        super().handle(session, event)


@pytest.mark.both_brokers
def test_i10_partitions_revoked_while_a_record_waits_are_consumed_when_assigned_again(
    effects: Engine,
    bootstrap_servers: str,
    topic: str,
    members: Callable[..., Running],
) -> None:
    """A retry pauses the member's partitions; those a rebalance takes away during the wait
    and gives back later must be fetched again, or their events wait forever."""
    producer = Producer({"bootstrap.servers": bootstrap_servers})

    def produce(round_: int) -> None:
        for p in range(PARTITIONS):
            for i in range(PER_PARTITION):
                value = json.dumps({"round": round_, "i": i}).encode()
                producer.produce(topic, value=value, partition=p)
        assert producer.flush(30) == 0

    produce(0)
    a = members(WaitsForAGate)
    first = a.consumer
    assert isinstance(first, WaitsForAGate)
    wait_for(first.waited.is_set, timeout=60, what="a record of A to wait in its retry")
    b = members()
    wait_for(first.hooks.reassigned.is_set, timeout=60, what="A's rebalance during the wait")
    wait_for(lambda: b.consumer.assignment, timeout=60, what="B to own partitions")
    taken = set(b.consumer.assignment)
    first.gate.set()
    b.stop()  # B's partitions go back to A
    wait_for(lambda: taken <= first.assignment, timeout=60, what="A to own B's partitions again")
    produce(1)

    def applied() -> tuple[int, int]:
        with effects.connect() as conn:
            row = conn.execute(text("SELECT count(*), count(DISTINCT position) FROM effects"))
            total, distinct = row.one()
        return int(total), int(distinct)

    everything = 2 * PARTITIONS * PER_PARTITION
    wait_for(
        lambda: applied()[1] == everything,
        timeout=60,
        what=f"every event applied, {sorted(taken)} (B's, then A's again) included",
    )
    a.stop()
    assert applied() == (everything, everything)  # each exactly once


class DeadBroker:
    """A port that accepts connections and closes them at once: a broker that is down."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = int(self.server.getsockname()[1])
        self.attempts = 0
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.server.accept()
            except OSError:
                continue
            self.attempts += 1
            conn.close()

    def close(self) -> None:
        self.closed.set()
        self.thread.join(5)
        self.server.close()


def test_i10_a_broker_outage_writes_one_line_per_backoff_step(
    members: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="outbox")
    broker = DeadBroker()
    try:
        running = members(
            bootstrap=f"127.0.0.1:{broker.port}",
            settings={
                **GROUP_SETTINGS,
                "reconnect.backoff.ms": "10",
                "reconnect.backoff.max.ms": "50",
            },
        )
        wait_for(lambda: broker.attempts >= 60, timeout=60, what="60 failed connections")
        running.stop()
    finally:
        broker.close()
    lines = [
        r.getMessage()
        for r in caplog.records
        if r.name == "outbox.librdkafka" or r.getMessage().startswith("kafka:")
    ]
    assert lines  # the outage is reported ...
    assert len(lines) <= 15, "\n".join(lines)  # ... once per backoff step of each message


def _reported(admin: AdminClient, topic: str, config: dict[str, str]) -> bool:
    """Whether the broker asked reports ``config`` for ``topic``."""
    resource = ConfigResource(ResourceType.TOPIC, topic)
    entries = admin.describe_configs([resource])[resource].result(30)
    return all(entries[k].value == v for k, v in config.items())


@pytest.mark.both_brokers
@pytest.mark.parametrize(
    ("window", "warned"), [(timedelta(minutes=30), True), (timedelta(hours=2), False)]
)
def test_i10_the_dedup_window_is_checked_against_the_horizon_the_broker_reports(
    members: Callable[..., Running],
    bootstrap_servers: str,
    topic: str,
    caplog: pytest.LogCaptureFixture,
    window: timedelta,
    warned: bool,
) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    config = {"retention.ms": "3600000", "segment.ms": "600000"}
    try:
        for future in admin.create_topics([NewTopic(topic, 1, 1, config=config)]).values():
            future.result(30)
    except KafkaException as exc:  # Apache Kafka: the topic fixture created it already
        if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
            raise
        entries = [
            ConfigEntry(k, v, incremental_operation=AlterConfigOpType.SET)
            for k, v in config.items()
        ]
        resource = ConfigResource(ResourceType.TOPIC, topic, incremental_configs=entries)
        for future in admin.incremental_alter_configs([resource]).values():
            future.result(30)
    # The brokers learn a change from the controller a moment later: wait until the brokers
    # asked (any one per call) report it, as the consumer will ask one of them.
    wait_for(
        lambda: all(_reported(admin, topic, config) for _ in range(3)),
        timeout=30,
        what="the brokers reporting the topic's retention",
    )
    caplog.set_level(logging.INFO, logger="outbox.consumer")
    running = members(dedup_window=window)
    wait_for(lambda: running.consumer.joined, timeout=60, what="the consumer to join")
    running.stop()
    warnings = [r.getMessage() for r in caplog.records if "redelivery horizon" in r.getMessage()]
    if warned:
        (warning,) = warnings
        assert "retention.ms=3600000 + segment.ms=600000" in warning
        assert "dedup_window=0:30:00" in warning
        assert "1:10:00" in warning
    else:
        assert warnings == []
