"""Prometheus metrics of a consumer (``outbox consume --metrics-port``, or your own registry:
``ConsumerMetrics(consumer, registry)``), read at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# (name, help, ConsumerStats field)
CONSUMER_COUNTERS = (
    ("outbox_consumer_events_applied", "Events whose handler ran and committed.", "applied"),
    (
        "outbox_consumer_duplicates_skipped",
        "Deliveries skipped: already processed.",
        "duplicates",
    ),
    ("outbox_consumer_retries", "Handler re-runs after a failure.", "retries"),
    (
        "outbox_consumer_dead_letters",
        "Events sent to <topic>.DLT through the outbox.",
        "dead_lettered",
    ),
    (
        "outbox_consumer_db_outages",
        "Database failures retried without charging the event.",
        "outages",
    ),
    (
        "outbox_consumer_not_dead_lettered",
        "Failed records of a dead-letter topic: logged and marked processed, not dead-lettered.",
        "not_dead_lettered",
    ),
    ("outbox_consumer_transactions", "Database transactions committed.", "transactions"),
    (
        "outbox_consumer_offset_commits",
        "Kafka offset commits (after the DB commit).",
        "offset_commits",
    ),
    ("outbox_consumer_dedup_rows_purged", "Dedup records purged after the dedup window.", "purged"),
)


class ConsumerMetrics:
    """A consumer's registry: its counters and its lag, read at scrape time."""

    def __init__(self, consumer: Any, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.registry.register(_ConsumerCollector(consumer))


class _ConsumerCollector(Collector):
    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        labels = ["group"]
        group = [self.consumer.config.group_id]
        for name, help_text, field in CONSUMER_COUNTERS:
            family = CounterMetricFamily(name, help_text, labels=labels)
            family.add_metric(group, getattr(self.consumer.stats, field))
            yield family
        lag = GaugeMetricFamily(
            "outbox_consumer_lag",
            "Records between the committed position and the end of each assigned partition.",
            labels=["group", "topic", "partition"],
        )
        for (topic, partition), behind in self.consumer.lag().items():
            lag.add_metric([group[0], topic, str(partition)], behind)
        yield lag
