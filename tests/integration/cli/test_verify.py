"""``outbox verify``: the delivery record against the topic and the groups, on real services."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import ClassVar

import pytest
from confluent_kafka import Producer, TopicPartition
from confluent_kafka.admin import AdminClient
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from consumer import Event, IdempotentConsumer
from outbox.relay import Relay
from tests.conftest import Broker
from tests.integration.delivery_record import published as _published
from tests.integration.delivery_record import verify_json as _verify
from tests.support import InThread, KafkaReader, Record, wait_for

GROUP_SETTINGS = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"}


def _copy(bootstrap_servers: str, records: list[Record]) -> None:
    """Another producer writes these records again, headers and all, on their partitions."""
    producer = Producer({"bootstrap.servers": bootstrap_servers})
    for r in records:
        producer.produce(
            r.topic,
            key=r.key,
            value=r.value,
            headers=list(r.headers.items()),
            partition=r.partition,
        )
    assert producer.flush(30) == 0


def test_i2_a_relayed_topic_verifies_clean(
    engine: Engine,
    database_url: str,
    bootstrap_servers: str,
    topic: str,
    drain: Callable[..., Relay],
) -> None:
    ids = _published(engine, topic, 30)
    drain()
    code, report = _verify(database_url, bootstrap_servers, topic)
    assert (code, report["clean"], report["recorded"], report["read"]) == (0, True, 30, 30)
    assert report["lost"] == report["order_violations"] == []
    assert report["duplicates"] == {}
    assert len(ids) == 30


def test_i4_a_record_copied_onto_the_topic_by_another_producer_is_a_duplicate(
    engine: Engine,
    database_url: str,
    bootstrap_servers: str,
    topic: str,
    drain: Callable[..., Relay],
    kafka: KafkaReader,
) -> None:
    _published(engine, topic, 10)
    drain()
    records = kafka.read(topic, 10)
    last = max(records, key=lambda r: r.offset)
    _copy(bootstrap_servers, [last])
    code, report = _verify(database_url, bootstrap_servers, topic)
    assert code == 1
    assert report["duplicates"] == {last.event_id: 2}
    assert report["order_violations"] == []  # a copy after the original keeps the key's order
    assert report["lost"] == []


def test_i3_a_reordered_copy_is_reported_out_of_key_order(
    engine: Engine,
    database_url: str,
    bootstrap_servers: str,
    topic: str,
    drain: Callable[..., Relay],
    kafka: KafkaReader,
) -> None:
    _published(engine, topic, 2, keys=1)
    drain()
    records = sorted(kafka.read(topic, 2), key=lambda r: r.offset)
    first, second = records[0], records[1]
    _copy(bootstrap_servers, [second, first])  # the later event, then the earlier one
    code, report = _verify(database_url, bootstrap_servers, topic)
    assert code == 1
    assert [v["event_id"] for v in report["order_violations"]] == [first.event_id]
    assert report["duplicates"] == {first.event_id: 2, second.event_id: 2}


def test_foreign_records_are_counted_not_findings(
    engine: Engine,
    database_url: str,
    bootstrap_servers: str,
    topic: str,
    drain: Callable[..., Relay],
) -> None:
    _published(engine, topic, 5)
    drain()
    producer = Producer({"bootstrap.servers": bootstrap_servers})
    producer.produce(topic, key=b"other", value=b"not the outbox's")
    assert producer.flush(30) == 0
    code, report = _verify(database_url, bootstrap_servers, topic)
    assert (code, report["foreign"], report["clean"]) == (0, 1, True)


class Applies(IdempotentConsumer):
    topics: ClassVar[list[str]] = ["set-per-test"]
    group_id = "set-per-test"

    def handle(self, session: Session, event: Event) -> None:
        pass


def _consume_all(engine: Engine, bootstrap_servers: str, topic: str, group: str, n: int) -> None:
    consumer = Applies(
        engine, bootstrap_servers, topics=[topic], group_id=group, settings=GROUP_SETTINGS
    )
    running = InThread(consumer, what="consumer")
    running.thread.start()
    try:
        wait_for(lambda: consumer.stats.applied >= n, timeout=60, what="the group applies all")
    finally:
        running.stop()


def test_i5_a_group_that_applied_everything_has_no_lag_and_a_group_behind_has_lag(
    engine: Engine,
    database_url: str,
    bootstrap_servers: str,
    topic: str,
    drain: Callable[..., Relay],
) -> None:
    _published(engine, topic, 12)
    drain()
    group = f"g-{uuid.uuid4().hex[:8]}"
    _consume_all(engine, bootstrap_servers, topic, group, 12)
    idle = f"idle-{uuid.uuid4().hex[:8]}"
    code, report = _verify(
        database_url, bootstrap_servers, topic, "--group", group, "--group", idle
    )
    assert code == 0
    by_name = {g["group"]: g for g in report["groups"]}
    assert (by_name[group]["applied"], by_name[group]["lag"]) == (12, 0)
    assert (by_name[idle]["applied"], by_name[idle]["lag"]) == (0, 12)


def test_i5_records_deleted_before_a_group_read_them_are_unreadable_for_that_group(
    broker: Broker,
    engine: Engine,
    database_url: str,
    bootstrap_servers: str,
    make_topic: Callable[..., str],
    drain: Callable[..., Relay],
    kafka: KafkaReader,
) -> None:
    if broker.name != "kafka":
        pytest.skip("delete_records needs Apache Kafka")
    topic = make_topic(partitions=1)
    _published(engine, topic, 6)
    drain()
    records = sorted(kafka.read(topic, 6), key=lambda r: r.offset)
    cut = records[3].offset  # the first three records go
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    futures = admin.delete_records([TopicPartition(topic, 0, cut)])
    for future in futures.values():
        future.result(30)
    group = f"late-{uuid.uuid4().hex[:8]}"  # never read: everything it lacks is lag or gone
    code, report = _verify(database_url, bootstrap_servers, topic, "--group", group)
    assert code == 1
    gone = {r.event_id for r in records[:3]}
    assert {x["event_id"] for x in report["lost"]} == gone
    [g] = report["groups"]
    assert set(g["unreadable"]) == gone
    assert g["lag"] == 3


def test_i2_since_reads_the_topic_from_that_time_not_from_its_start(
    broker: Broker,
    engine: Engine,
    database_url: str,
    bootstrap_servers: str,
    topic: str,
    drain: Callable[..., Relay],
) -> None:
    """``--since 1h`` reads only the last hour of the topic (offsets_for_times): the records
    of older events (written and recorded two days ago) are neither read nor reported."""
    old = _published(engine, topic, 10)
    with engine.begin() as conn:
        conn.execute(text("UPDATE outbox_events SET created_at = now() - interval '2 days'"))
    drain()
    with engine.begin() as conn:
        conn.execute(text("UPDATE outbox_deliveries SET published_at = now() - interval '2 days'"))
    new = _published(engine, topic, 10)
    drain()
    code, report = _verify(database_url, bootstrap_servers, topic, "--since", "1h")
    assert (code, report["clean"], report["recorded"]) == (0, True, len(new))
    if broker.name == "tansu":  # Tansu answers a lookup by time with the partition's start
        assert (report["read"], report["unrecorded"]) == (20, len(old))
    else:
        assert (report["read"], report["unrecorded"]) == (len(new), 0)
    code, whole = _verify(database_url, bootstrap_servers, topic)
    assert (code, whole["recorded"], whole["read"]) == (0, len(old) + len(new), 20)
