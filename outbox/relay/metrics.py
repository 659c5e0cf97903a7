"""Prometheus metrics of the relay, read from its counters at scrape time.

Counters live in ``RelayStats`` (plain ints the tests and the demo read too); a
custom collector exports them, so nothing is counted twice. The backlog (pending
rows, oldest pending age) is queried on scrape through its own connection and
cached briefly, so a scrape storm cannot load the database.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any, Protocol

import psycopg
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from outbox import sql
from outbox.db import connect, show_stored_text


class Source(Protocol):
    """What the collector reads from the relay at scrape time (no import of the relay, so
    this module and the coordinator do not import each other)."""

    @property
    def config(self) -> Any: ...  # its ``dsn`` names the database the backlog is read from

    @property
    def stats(self) -> Any: ...  # RelayStats: the counters

    @property
    def workers(self) -> Any: ...  # the slot workers this process runs (their count)


BATCH_SIZE_BUCKETS = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000)

# (name, help, RelayStats field): every counter the relay exports.
RELAY_COUNTERS = (
    (
        "outbox_relay_events_published",
        "Events in committed Kafka transactions (then deleted).",
        "published",
    ),
    ("outbox_relay_batches", "Batches published (one Kafka transaction each).", "batches"),
    ("outbox_relay_kafka_aborts", "Kafka transactions aborted (the batch is retried).", "aborts"),
    ("outbox_relay_fenced", "Times a slot's producer was fenced by a newer owner.", "fenced"),
    (
        "outbox_relay_foreign_fences",
        "Fences while the slot's lock was still held: by a relay of another database with this "
        "outbox's identity (a copy) or transactional-id prefix (I9).",
        "foreign_fences",
    ),
    ("outbox_relay_dead_rows", "Poison rows moved to outbox_dead_events.", "dead"),
    (
        "outbox_relay_recovered_rows",
        "Rows deleted on takeover: the last marker named them.",
        "recovered",
    ),
    ("outbox_relay_retries", "Transient failures retried with backoff.", "retries"),
    (
        "outbox_relay_markers_ignored",
        "Recovery markers ignored: another outbox's, another layout's, malformed or forged (I9).",
        "markers_ignored",
    ),
)


class RelayMetrics:
    """The relay's registry: histograms observed by the workers plus the stats collector."""

    def __init__(self, relay: Source, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.batch_size = Histogram(
            "outbox_relay_batch_size",
            "Rows per published batch.",
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "outbox_relay_batch_duration_seconds",
            "Claim + produce + Kafka commit + delete of one batch.",
            registry=self.registry,
        )
        self.registry.register(_RelayCollector(relay))


class _RelayCollector(Collector):
    def __init__(self, relay: Source) -> None:
        self.relay = relay
        self._lock = threading.Lock()
        self._conn: psycopg.Connection[dict[str, Any]] | None = None
        self._backlog: tuple[float, list[dict[str, Any]]] = (0.0, [])

    def _pending(self) -> list[dict[str, Any]]:
        with self._lock:
            fetched_at, rows = self._backlog
            if time.monotonic() - fetched_at < 5.0:
                return rows
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = connect(self.relay.config.dsn, application_name="outbox-metrics")
                    self._conn.execute("SET statement_timeout = '2s'")
                    # Every topic, one a SQL_ASCII database holds that is not UTF-8 included
                    # (a UTF8 session is refused the whole result until the relay buries it).
                    show_stored_text(self._conn)
                rows = self._conn.execute(sql.PENDING_BY_TOPIC).fetchall()
            except (psycopg.Error, ConnectionError):
                self._conn = None
                rows = []
            self._backlog = (time.monotonic(), rows)
            return rows

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        stats = self.relay.stats
        for name, help_text, field in RELAY_COUNTERS:
            yield CounterMetricFamily(name, help_text, value=getattr(stats, field))
        yield GaugeMetricFamily(
            "outbox_relay_slots_owned", "Slots this process owns.", value=len(self.relay.workers)
        )
        pending = GaugeMetricFamily(
            "outbox_pending_rows", "Committed events not yet published.", labels=["topic"]
        )
        oldest = GaugeMetricFamily(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest pending event: the outbox lag.",
            labels=["topic"],
        )
        for row in self._pending():
            pending.add_metric([row["topic"]], row["pending"])
            oldest.add_metric([row["topic"]], row["oldest_age_s"] or 0.0)
        yield pending
        yield oldest
