"""The consumer's Prometheus collector reads its counters and lag at scrape time."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from prometheus_client import generate_latest

from consumer import ConsumerStats, Event, IdempotentConsumer, runner_of
from consumer.metrics import ConsumerMetrics


@dataclass
class _Config:
    group_id: str = "projector"


@dataclass
class _Consumer:
    config: _Config = field(default_factory=_Config)
    stats: ConsumerStats = field(default_factory=ConsumerStats)

    def lag(self) -> dict[tuple[str, int], int]:
        return {("orders", 0): 7}


def test_counters_and_lag_are_read_at_scrape_time() -> None:
    consumer = _Consumer()
    registry = ConsumerMetrics(consumer).registry
    consumer.stats.applied = 3
    consumer.stats.not_dead_lettered = 1
    text = generate_latest(registry).decode()
    assert 'outbox_consumer_events_applied_total{group="projector"} 3.0' in text
    assert 'outbox_consumer_not_dead_lettered_total{group="projector"} 1.0' in text
    assert 'outbox_consumer_lag{group="projector",partition="0",topic="orders"} 7.0' in text


class _OwnConfig(IdempotentConsumer):
    topics: ClassVar[list[str]] = ["orders"]
    group_id = "projector"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.config = {"greeting": "hello"}  # the user's own

    def handle(self, session: Any, event: Event) -> None:
        """Never called here."""


def test_i11_the_collector_reads_the_runner_not_a_users_own_names() -> None:
    consumer = _OwnConfig("postgresql+psycopg://app@db.invalid/app", "broker.invalid:9092")
    try:
        registry = ConsumerMetrics(consumer).registry
        runner_of(consumer).stats.applied = 2
        text = generate_latest(registry).decode()
    finally:
        consumer.close()
    assert 'outbox_consumer_events_applied_total{group="projector"} 2.0' in text
