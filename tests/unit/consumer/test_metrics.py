"""The consumer's Prometheus collector reads its counters and lag at scrape time."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import generate_latest

from consumer import ConsumerStats
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
