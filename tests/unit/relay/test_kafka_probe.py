"""Kafka at the relay's start (I8): each outcome of the probe, through scripted clients.

Fake producers and admin clients stand in for confluent-kafka's; a stop event that never
sleeps records the backoff. The real clients are covered by the integration tests.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from outbox.errors import ConfigError, KafkaUnavailable
from outbox.partitioner import SHARD_COUNT
from outbox.relay.kafka_probe import KafkaProbe

TOPIC = "outbox.relay-state"


class NoSleep(threading.Event):
    """A stop event whose waits return at once (and are recorded)."""

    def __init__(self, stop_after: int | None = None) -> None:
        super().__init__()
        self.waits: list[float] = []
        self.stop_after = stop_after

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout or 0.0)
        if self.stop_after is not None and len(self.waits) >= self.stop_after:
            self.set()
        return self.is_set()


@dataclass
class FakeProducer:
    """A producer whose metadata requests fail ``failures`` times (each with ``errors``)."""

    settings: dict[str, Any]
    failures: int = 0
    errors: list[KafkaError] = field(default_factory=list)
    purged: bool = False

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        if self.failures:
            self.failures -= 1
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "Connection refused"))
        return SimpleNamespace(topics={})

    def poll(self, timeout: float = -1) -> int:
        for err in self.errors:
            self.settings["error_cb"](err)
        return 0

    def purge(self, in_queue: bool = True, in_flight: bool = True, blocking: bool = True) -> None:
        self.purged = True


@dataclass
class Producers:
    failures: int = 0
    errors: list[KafkaError] = field(default_factory=list)
    refuse: bool = False  # librdkafka refuses the settings themselves
    built: list[FakeProducer] = field(default_factory=list)

    def __call__(self, settings: dict[str, Any]) -> FakeProducer:
        if self.refuse:
            raise KafkaException(KafkaError(KafkaError._INVALID_ARG, "No such configuration"))
        producer = FakeProducer(settings, min(self.failures, 1), self.errors)
        self.failures = max(0, self.failures - 1)
        self.built.append(producer)
        return producer


@dataclass
class FakeAdmin:
    """A cluster of ``brokers`` with the state topic at ``partitions`` (None: missing)."""

    brokers: int = 3
    partitions: int | None = None
    create_error: int | None = None
    created: list[Any] = field(default_factory=list)

    def __call__(self, settings: dict[str, Any]) -> FakeAdmin:
        return self

    def list_topics(self, *args: Any, **kwargs: Any) -> Any:
        topics = {}
        if self.partitions is not None:
            parts = dict.fromkeys(range(self.partitions))
            topics[TOPIC] = SimpleNamespace(error=None, partitions=parts)
        return SimpleNamespace(topics=topics, brokers=dict.fromkeys(range(self.brokers)))

    def create_topics(self, new_topics: list[Any], **kwargs: Any) -> dict[str, Any]:
        self.created.extend(new_topics)
        error = self.create_error

        def result() -> None:
            if error is not None:
                raise KafkaException(KafkaError(error))

        return {t.topic: SimpleNamespace(result=result) for t in new_topics}


def _probe(
    producers: Callable[[dict[str, Any]], Any],
    admin: FakeAdmin | None = None,
    *,
    once: bool = False,
    state_topic: str | None = TOPIC,
) -> KafkaProbe:
    return KafkaProbe(
        settings={"bootstrap.servers": "k:9092", "transactional.id": "x"},
        connection={"bootstrap.servers": "k:9092"},
        bootstrap_servers="k:9092",
        state_topic=state_topic,
        once=once,
        producers=producers,
        admins=admin or FakeAdmin(partitions=SHARD_COUNT),
    )


def test_i8_a_setting_librdkafka_refuses_stops_the_start_naming_the_fix() -> None:
    with pytest.raises(ConfigError, match=r"Kafka setting refused: .*-X or --producer-config"):
        _probe(Producers(refuse=True)).wait(NoSleep())


def test_i8_refused_credentials_stop_the_start_naming_the_fix() -> None:
    auth = KafkaError(KafkaError.SASL_AUTHENTICATION_FAILED, "Authentication failed")
    producers = Producers(failures=1, errors=[auth])
    with pytest.raises(ConfigError, match=r"Kafka refused the relay: .*check sasl.username"):
        _probe(producers).wait(NoSleep())
    assert producers.built[0].purged


def test_i8_an_unreachable_cluster_fails_a_once_run_naming_the_servers() -> None:
    producers = Producers(failures=5)
    with pytest.raises(KafkaUnavailable, match=r"Kafka at k:9092 is unreachable .*--bootstrap"):
        _probe(producers, once=True).wait(NoSleep())
    assert len(producers.built) == 1, "--once retried"


def test_i8_a_daemon_waits_for_an_unreachable_cluster_with_growing_pauses() -> None:
    producers = Producers(failures=3)
    stop = NoSleep()
    assert _probe(producers).wait(stop) is True
    assert len(producers.built) == 4
    assert len(stop.waits) == 3
    assert stop.waits[0] < stop.waits[2], "the pauses do not grow"
    assert all(p.purged for p in producers.built)


def test_i8_a_daemon_told_to_stop_while_waiting_for_kafka_reports_not_ready() -> None:
    producers = Producers(failures=100)
    assert _probe(producers).wait(NoSleep(stop_after=2)) is False
    assert len(producers.built) == 2


def test_i4_a_missing_state_topic_is_created_compacted_one_partition_per_possible_slot() -> None:
    admin = FakeAdmin(brokers=5)
    assert _probe(Producers(), admin).wait(NoSleep())
    [topic] = admin.created
    assert topic.topic == TOPIC
    assert topic.num_partitions == SHARD_COUNT
    assert topic.replication_factor == 3
    assert topic.config == {"cleanup.policy": "compact"}


def test_i4_a_state_topic_created_meanwhile_by_another_relay_is_used() -> None:
    admin = FakeAdmin(brokers=1, create_error=KafkaError.TOPIC_ALREADY_EXISTS)
    assert _probe(Producers(), admin).wait(NoSleep())
    assert admin.created[0].replication_factor == 1


def test_i8_a_state_topic_that_cannot_be_created_is_not_ignored() -> None:
    admin = FakeAdmin(create_error=KafkaError.TOPIC_AUTHORIZATION_FAILED)
    stop = NoSleep(stop_after=1)
    assert _probe(Producers(), admin).wait(stop) is False  # a daemon waits and retries
    assert len(stop.waits) == 1


def test_i8_a_state_topic_with_too_few_partitions_is_refused_naming_the_fix() -> None:
    admin = FakeAdmin(partitions=SHARD_COUNT - 1)
    with pytest.raises(ConfigError, match="delete it or pick another --state-topic"):
        _probe(Producers(), admin).wait(NoSleep())
    assert not admin.created


def test_i4_an_existing_state_topic_is_left_as_it_is() -> None:
    admin = FakeAdmin(partitions=SHARD_COUNT)
    assert _probe(Producers(), admin).wait(NoSleep())
    assert not admin.created


def test_a_guarantee_without_markers_needs_no_state_topic() -> None:
    admin = FakeAdmin(partitions=None)
    assert _probe(Producers(), admin, state_topic=None).wait(NoSleep())
    assert not admin.created
