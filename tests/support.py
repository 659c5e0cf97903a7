"""Helpers shared by the integration and acceptance tests: waiting, reading topics back."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from confluent_kafka import Consumer, TopicPartition

T = TypeVar("T")


def wait_for(condition: Callable[[], T], *, timeout: float = 30.0, what: str = "condition") -> T:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(delay)  # polling interval of a deadline-bounded wait, not synchronisation
        delay = min(delay * 2, 0.2)


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    timestamp_ms: int

    @property
    def event_id(self) -> str:
        return self.headers["outbox-event-id"].decode()


class KafkaReader:
    """An independent read_committed client: what really landed on a topic."""

    def __init__(self, bootstrap_servers: str) -> None:
        self.bootstrap_servers = bootstrap_servers
        self._consumers: list[Consumer] = []

    def read(self, topic: str, expected: int, *, timeout: float = 30.0) -> list[Record]:
        """Read from the beginning until ``expected`` records arrived (then a short extra look)."""
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap_servers,
                "group.id": f"test-reader-{uuid.uuid4().hex}",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        self._consumers.append(consumer)
        md = consumer.list_topics(topic, timeout=10)
        partitions = list(md.topics[topic].partitions) if topic in md.topics else []
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        records: list[Record] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                if len(records) >= expected:
                    break  # nothing more within a poll after reaching the count
                continue
            if msg.error():
                continue
            _ts_type, ts = msg.timestamp()
            records.append(
                Record(
                    topic=msg.topic(),
                    partition=msg.partition(),
                    offset=msg.offset(),
                    key=msg.key(),
                    value=msg.value(),
                    headers={k: v for k, v in (msg.headers() or [])},
                    timestamp_ms=ts,
                )
            )
        consumer.close()
        self._consumers.remove(consumer)
        return records

    def close(self) -> None:
        for c in self._consumers:
            c.close()
