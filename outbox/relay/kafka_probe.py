"""Kafka at the relay's start: the settings, the cluster's reachability, the state topic.

All before any slot runs, so a refused setting or credential stops the relay in one line
(I8) and an unreachable cluster is waited for, not met by every slot at once. The Kafka
clients come from factories, so each outcome is tested with scripted clients.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from outbox.errors import ConfigError, KafkaUnavailable
from outbox.logs import librdkafka_logger
from outbox.partitioner import SHARD_COUNT
from outbox.relay.backoff import backoff
from outbox.relay.classify import Verdict, classify, config_fix

log = logging.getLogger("outbox.relay")


class ProbeProducer(Protocol):
    """What the probe uses of a producer (``confluent_kafka.Producer``)."""

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any: ...

    def poll(self, timeout: float = -1) -> int: ...

    def purge(
        self, in_queue: bool = True, in_flight: bool = True, blocking: bool = True
    ) -> None: ...


class TopicAdmin(Protocol):
    """What the probe uses of an admin client (``confluent_kafka.admin.AdminClient``)."""

    def list_topics(self, *args: Any, **kwargs: Any) -> Any: ...

    def create_topics(self, new_topics: list[Any], **kwargs: Any) -> dict[str, Any]: ...


def _producer(settings: dict[str, Any]) -> ProbeProducer:
    return Producer(settings)  # looked up when called: a test may spy on the module's clients


def _admin(settings: dict[str, Any]) -> TopicAdmin:
    return AdminClient(settings)


def state_topic_replicas(brokers: int) -> int:
    """The state topic's replication factor: 3 where the cluster has them (a stock broker's
    default is 1, and the markers are what keeps a takeover from publishing twice)."""
    return max(1, min(3, brokers))


class KafkaProbe:
    """Checks Kafka once at start-up; ``wait`` retries until it answers."""

    def __init__(
        self,
        *,
        settings: Mapping[str, Any],
        connection: Mapping[str, Any],
        bootstrap_servers: str,
        state_topic: str | None,
        once: bool,
        producers: Callable[[dict[str, Any]], ProbeProducer] | None = None,
        admins: Callable[[dict[str, Any]], TopicAdmin] | None = None,
    ) -> None:
        """``settings``: the producer's own; ``connection``: what an admin client needs;
        ``state_topic``: None when the guarantee writes no recovery marker; ``producers``,
        ``admins``: client factories, by default confluent-kafka's."""
        self.settings = settings
        self.connection = connection
        self.bootstrap_servers = bootstrap_servers
        self.state_topic = state_topic
        self.once = once
        self._producers = producers or _producer
        self._admins = admins or _admin

    def wait(self, stop: threading.Event) -> bool:
        """Check the Kafka settings and reach the cluster before taking any slot.

        A setting librdkafka does not know, or credentials/ACLs the cluster refuses,
        raise ConfigError (I8). An unreachable cluster is waited for by the daemon
        with backoff, one line per attempt; ``--once`` raises KafkaUnavailable.
        False: told to stop while waiting.
        """
        attempt = 0
        while True:
            try:
                self.probe()
                if self.state_topic is not None:
                    self.ensure_state_topic(self.state_topic)
                return True
            except KafkaException as exc:
                problem = str(exc.args[0].str() if exc.args else exc)
            where = f"Kafka at {self.bootstrap_servers} is unreachable ({problem})"
            if self.once:
                raise KafkaUnavailable(f"{where}; check --bootstrap-servers and the network")
            attempt += 1
            delay = backoff(attempt)
            log.warning("%s; retrying in %.0f s", where, delay)
            if stop.wait(delay):
                return False

    def probe(self) -> None:
        """One metadata request with the producer's own settings; raises KafkaException."""
        errors: list[KafkaError] = []
        settings: dict[str, Any] = dict(self.settings)
        settings |= {"error_cb": errors.append, "logger": librdkafka_logger()}
        try:
            probe = self._producers(settings)
        except KafkaException as exc:
            raise ConfigError(
                f"Kafka setting refused: {exc.args[0].str()}; fix or remove it in -X or "
                "--producer-config"
            ) from None
        try:
            probe.list_topics(timeout=10)
        except KafkaException:
            probe.poll(0)  # serve error_cb: an authentication failure says more than a timeout
            for err in errors:
                if classify(err) is Verdict.CONFIG:
                    raise ConfigError(f"Kafka refused the relay: {config_fix(err)}") from None
            raise
        finally:
            probe.purge()

    def ensure_state_topic(self, topic: str) -> None:
        """The compacted topic holding each slot's last marker, one partition per possible slot."""
        admin = self._admins(dict(self.connection) | {"logger": librdkafka_logger()})
        md = admin.list_topics(timeout=30)
        if topic in md.topics and not md.topics[topic].error:
            have = len(md.topics[topic].partitions)
            if have < SHARD_COUNT:
                raise ConfigError(
                    f"state topic {topic!r} has {have} partitions; the relay needs {SHARD_COUNT} "
                    "(one per possible slot): delete it or pick another --state-topic"
                )
            return
        replicas = state_topic_replicas(len(md.brokers))
        if replicas == 1:
            log.warning(
                "creating the state topic %r with replication factor 1 (the cluster has one "
                "broker): losing that broker's disk loses the recovery markers, and a relay "
                "taking a slot over could publish its last batch again",
                topic,
            )
        futures = admin.create_topics(
            [
                NewTopic(
                    topic,
                    SHARD_COUNT,
                    replication_factor=replicas,
                    config={"cleanup.policy": "compact"},
                )
            ],
            operation_timeout=30,
        )
        for fut in futures.values():
            try:
                fut.result()
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
