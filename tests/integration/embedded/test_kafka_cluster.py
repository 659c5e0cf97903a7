"""The Apache Kafka test cluster is what the suite claims: RF 3, min ISR 2, no auto-create,
SCRAM on its own listener, and nodes that can crash and come back."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from confluent_kafka import KafkaError, Producer
from confluent_kafka.admin import AdminClient, ConfigResource  # type: ignore[attr-defined]

from outbox.embedded.kafka_cluster import KafkaCluster, create_topic, pinned_kafka_version
from tests.conftest import Broker
from tests.support import wait_for

pytestmark = pytest.mark.needs_apache_kafka


@pytest.fixture
def cluster(broker: Broker) -> KafkaCluster:
    assert isinstance(broker.cluster, KafkaCluster)
    return broker.cluster


def _produce(config: dict[str, Any], topic: str, timeout_ms: int = 10000) -> KafkaError | None:
    """Produce one record with acks=all; the delivery error, or None when it was written."""
    errors: list[KafkaError | None] = []
    producer = Producer({**config, "acks": "all", "message.timeout.ms": timeout_ms})
    producer.produce(topic, b"v", on_delivery=lambda err, _msg: errors.append(err))
    producer.flush(timeout_ms / 1000 + 10)
    assert errors, f"no delivery report within {timeout_ms / 1000 + 10:.0f} s"
    return errors[0]


def test_pinned_version_is_a_kafka_4(cluster: KafkaCluster) -> None:
    assert pinned_kafka_version().startswith("4.")
    assert cluster.version == pinned_kafka_version()
    assert cluster.startup_seconds is not None
    assert cluster.startup_seconds > 0


def test_data_and_internal_topics_are_replicated_3_with_min_isr_2(cluster: KafkaCluster) -> None:
    topic = create_topic(cluster.bootstrap_servers, f"test.{uuid.uuid4().hex[:12]}")
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap_servers})
    md = admin.list_topics(topic, timeout=10).topics[topic]
    assert all(len(p.replicas) == 3 for p in md.partitions.values())
    resource = ConfigResource(ConfigResource.Type.BROKER, str(cluster.node_ids[0]))
    configs = admin.describe_configs([resource])[resource].result(timeout=10)
    expected = {
        "min.insync.replicas": "2",
        "default.replication.factor": "3",
        "offsets.topic.replication.factor": "3",
        "transaction.state.log.replication.factor": "3",
        "transaction.state.log.min.isr": "2",
        "auto.create.topics.enable": "false",
    }
    assert {k: configs[k].value for k in expected} == expected


def test_a_missing_topic_is_not_created_on_produce(cluster: KafkaCluster) -> None:
    missing = f"test.missing.{uuid.uuid4().hex[:8]}"
    err = _produce({"bootstrap.servers": cluster.bootstrap_servers}, missing, timeout_ms=2000)
    assert err is not None
    assert err.code() in {KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._MSG_TIMED_OUT}, err
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap_servers})
    assert missing not in admin.list_topics(timeout=10).topics


def test_scram_listener_takes_the_formatted_user_and_refuses_a_wrong_password(
    cluster: KafkaCluster,
) -> None:
    topic = create_topic(cluster.bootstrap_servers, f"test.{uuid.uuid4().hex[:12]}")
    for mechanism in ("SCRAM-SHA-256", "SCRAM-SHA-512"):
        assert _produce(cluster.sasl_client_config(mechanism), topic) is None, mechanism
    errors: list[KafkaError] = []
    wrong = {**cluster.sasl_client_config(), "sasl.password": "wrong", "error_cb": errors.append}
    producer = Producer(wrong)
    wait_for(
        lambda: (
            producer.poll(0.1) >= 0 and any(e.code() == KafkaError._AUTHENTICATION for e in errors)
        ),
        timeout=20,
        what="a wrong SCRAM password is refused",
    )
    assert cluster.scram_user.password not in repr(cluster.scram_user)


def test_a_killed_node_leaves_a_writable_cluster_and_comes_back(cluster: KafkaCluster) -> None:
    topic = create_topic(cluster.bootstrap_servers, f"test.{uuid.uuid4().hex[:12]}")
    admin = AdminClient({"bootstrap.servers": cluster.bootstrap_servers})
    victim = cluster.node_ids[-1]
    cluster.kill_node(victim)
    try:
        assert victim not in cluster.running_nodes()
        wait_for(
            lambda: all(
                p.leader != victim
                for p in admin.list_topics(topic, timeout=5).topics[topic].partitions.values()
            ),
            timeout=60,
            what=f"leaders moved off killed node {victim}",
        )
        # Two in-sync replicas of three are enough for acks=all (min.insync.replicas=2), once the
        # leader has dropped the dead node from the ISR (replica.lag.time.max.ms): on a loaded
        # machine that can take longer than the default 10 s the other tests give a record.
        config = {"bootstrap.servers": cluster.bootstrap_servers}
        assert _produce(config, topic, timeout_ms=60000) is None
    finally:
        cluster.start_node(victim)
    assert victim in admin.list_topics(timeout=10).brokers
    wait_for(
        lambda: all(
            len(p.isrs) == 3
            for p in admin.list_topics(topic, timeout=5).topics[topic].partitions.values()
        ),
        timeout=60,
        what=f"node {victim} back in every ISR",
    )
