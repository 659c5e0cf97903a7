"""Commit -> handler latency, the consumer's share: a fetched record goes to the handler
without waiting for its batch to fill, and a batch still takes everything already fetched
(the batch grows by itself when the handler falls behind)."""

from __future__ import annotations

import threading
from typing import Any

from consumer.config import ConsumerConfig
from consumer.group import GroupMember
from consumer.stats import ConsumerStats

POLL_TIMEOUT = 1.0


class LocalQueue:
    """librdkafka's consume() over its local queue of fetched messages: ``queued`` are there
    already, ``arriving`` come with the next fetch, which only a waiting call sees."""

    def __init__(self, queued: int = 0, arriving: int = 0) -> None:
        self.queued = [f"m{i}" for i in range(queued)]
        self.arriving = [f"a{i}" for i in range(arriving)]
        self.calls: list[tuple[int, float]] = []

    def consume(self, num_messages: int, timeout: float) -> list[str]:
        self.calls.append((num_messages, timeout))
        if not self.queued and timeout > 0:
            self.queued, self.arriving = self.arriving, []
        taken, self.queued = self.queued[:num_messages], self.queued[num_messages:]
        return taken


def next_batch(queue: LocalQueue, batch_size: int = 100) -> list[str]:
    """One batch as the runner fetches it (through the public ``fetch`` seam)."""
    config = ConsumerConfig(
        bootstrap_servers="localhost:9092",
        topics=("orders",),
        group_id="g",
        batch_size=batch_size,
        poll_timeout=POLL_TIMEOUT,
    )
    member = GroupMember(config, threading.Event(), ConsumerStats())
    member.kafka = queue
    batch: list[str] = []

    def fetch(_kafka: Any, default: Any) -> list[Any]:
        batch.extend(default())
        return []  # the fake messages are not converted to records

    member.fetch = fetch
    member.next_records()
    return batch


def waits(queue: LocalQueue) -> list[float]:
    return [timeout for _n, timeout in queue.calls if timeout > 0]


def test_latency_a_record_on_a_quiet_topic_waits_for_no_batch_to_fill() -> None:
    queue = LocalQueue(arriving=1)
    assert next_batch(queue) == ["a0"]
    # Only the wait for the first record: nothing holds the record in hand back afterwards.
    assert waits(queue) == [POLL_TIMEOUT]


def test_latency_a_batch_takes_the_whole_fetch_the_first_record_came_with() -> None:
    queue = LocalQueue(arriving=7)
    assert next_batch(queue) == [f"a{i}" for i in range(7)]
    assert waits(queue) == [POLL_TIMEOUT]


def test_throughput_a_backlog_fills_the_batch_without_waiting() -> None:
    queue = LocalQueue(queued=250)
    assert next_batch(queue, batch_size=100) == [f"m{i}" for i in range(100)]
    assert waits(queue) == []
    assert len(queue.queued) == 150
