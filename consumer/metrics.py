"""Prometheus metrics of a consumer (``outbox consume --metrics-port``, or your own registry:
``ConsumerMetrics(consumer, registry)``), read at scrape time."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from consumer.consumer import IdempotentConsumer, runner_of
from consumer.stats import ConsumerStats

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


class _Named(Protocol):
    @property
    def group_id(self) -> str: ...


class Observed(Protocol):
    """What the collector reads: a ``ConsumerRunner`` (an ``IdempotentConsumer`` is read
    through its runner)."""

    @property
    def config(self) -> _Named: ...

    @property
    def stats(self) -> ConsumerStats: ...

    def lag(self) -> dict[tuple[str, int], int]: ...


class ConsumerMetrics:
    """A consumer's registry: its counters and its lag, read at scrape time."""

    def __init__(
        self,
        consumer: IdempotentConsumer | Observed,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        runner = runner_of(consumer) if isinstance(consumer, IdempotentConsumer) else consumer
        self.registry.register(_ConsumerCollector(runner))


class _ConsumerCollector(Collector):
    """Reads the runner, never the user's object (whose names are the user's)."""

    def __init__(self, consumer: Observed) -> None:
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
