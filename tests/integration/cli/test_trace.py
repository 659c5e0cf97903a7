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
