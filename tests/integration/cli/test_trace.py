"""``outbox trace``: where one event went and who applied it, on the real database and broker."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any, ClassVar

from sqlalchemy import Engine
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from consumer import Event, IdempotentConsumer, RetryPolicy
from outbox import publish
from outbox.cli import app
from outbox.relay import Relay
from tests.support import InThread, KafkaReader, wait_for

GROUP_SETTINGS = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"}


class Refuses(IdempotentConsumer):
    """Applies every event but those whose value is b"poison" (dead-lettered)."""

    topics: ClassVar[list[str]] = ["set-per-test"]
    group_id = "set-per-test"

    def handle(self, session: Session, event: Event) -> None:
        if event.value == b"poison":
            raise ValueError("refused")


def _trace(database_url: str, *args: str, code: int = 0) -> Any:
    result = CliRunner().invoke(app, ["trace", *args, "--db", database_url])
    assert result.exit_code == code, result.output
    return result.stdout if code == 0 else result.output  # a consumer thread may log meanwhile


def test_i5_trace_names_the_partition_and_offset_of_the_record_and_the_group_that_applied_it(
    engine: Engine,
    database_url: str,
    bootstrap_servers: str,
    topic: str,
    make_topic: Callable[..., str],
    drain: Callable[..., Relay],
    kafka: KafkaReader,
) -> None:
    make_topic(f"{topic}.DLT")
    with Session(engine) as session, session.begin():
        good = publish(session, topic=topic, key=b"k1", value=b"fine")
        bad = publish(session, topic=topic, key=b"k2", value=b"poison")
    assert json.loads(_trace(database_url, str(good), "--json"))["state"] == "pending"
    drain()
    record = {r.event_id: r for r in kafka.read(topic, 2)}[str(good)]
    group = f"g-{uuid.uuid4().hex[:8]}"
    consumer = Refuses(
        engine,
        bootstrap_servers,
        topics=[topic],
        group_id=group,
        settings=GROUP_SETTINGS,
        retry=RetryPolicy(attempts=2, initial_backoff=0.01, max_backoff=0.05, jitter=0),
    )
    running = InThread(consumer, what="consumer")
    running.thread.start()
    try:
        wait_for(
            lambda: (
                len(json.loads(_trace(database_url, str(bad), "--json"))["groups"]) == 1
                and len(json.loads(_trace(database_url, str(good), "--json"))["groups"]) == 1
            ),
            timeout=60,
            what="the group applies both events",
        )
    finally:
        running.stop()
    drain()  # publishes the dead letter the consumer wrote to the outbox

    seen = json.loads(_trace(database_url, str(good), "--json"))
    assert seen["state"] == "published"
    [where] = seen["deliveries"]
    assert (where["topic"], where["partition"], where["offset"]) == (
        record.topic,
        record.partition,
        record.offset,
    )
    [applied] = seen["groups"]
    assert (applied["group"], applied["dead_letter"]) == (group, None)
    text = _trace(database_url, str(good))
    assert f"partition {record.partition} offset {record.offset}" in text
    assert group in text

    letter = json.loads(_trace(database_url, str(bad), "--json"))["groups"][0]["dead_letter"]
    assert letter is not None
    assert letter["state"] == "published"


def test_trace_says_unknown_for_an_event_it_has_no_trace_of_and_refuses_a_non_uuid(
    database_url: str,
) -> None:
    assert json.loads(_trace(database_url, str(uuid.uuid4()), "--json"))["state"] == "unknown"
    assert "not a UUID" in _trace(database_url, "4711", code=2)


def test_i2_trace_and_verify_find_publishes_v7_ids_and_callers_ids_of_any_version_alike(
    engine: Engine,
    database_url: str,
    bootstrap_servers: str,
    topic: str,
    drain: Callable[..., Relay],
    kafka: KafkaReader,
) -> None:
    """publish() makes time-ordered v7 ids; ids recorded before it made them (random v4) and a
    caller's own ids of any version are traced and verified the same way, in one record."""
    own = [uuid.uuid4(), uuid.uuid1(), uuid.UUID(int=1), uuid.UUID(int=2**128 - 1)]
    with Session(engine) as session, session.begin():
        ids: list[uuid.UUID] = []
        for n in range(12):  # interleaved, on two keys, so the keys' order mixes both kinds
            key = f"k{n % 2}"
            ids.append(publish(session, topic=topic, key=key, value={"n": n}))
            if n < len(own):
                ids.append(publish(session, topic=topic, key=key, value={"n": n}, event_id=own[n]))
    assert {i.version for i in ids} == {7, 4, 1, None}
    drain()
    records = {r.event_id: r for r in kafka.read(topic, len(ids))}
    for event_id in ids:
        seen = json.loads(_trace(database_url, str(event_id), "--json"))
        assert seen["state"] == "published", event_id
        [where] = seen["deliveries"]
        record = records[str(event_id)]
        assert (where["partition"], where["offset"]) == (record.partition, record.offset)
    args = ["verify", "--db", database_url, "--bootstrap-servers", bootstrap_servers]
    result = CliRunner().invoke(app, [*args, "--topic", topic, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert (report["clean"], report["recorded"], report["read"]) == (True, len(ids), len(ids))
    assert report["order_violations"] == report["lost"] == []
