"""The state topic holds the recovery markers (I4): the relay creates it replicated as far as
the cluster allows (up to 3), and says so when it cannot be (one broker)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

import pytest
from confluent_kafka.admin import AdminClient

from outbox.relay import Relay
from outbox.relay.kafka_probe import state_topic_replicas


@pytest.mark.parametrize(("brokers", "replicas"), [(1, 1), (2, 2), (3, 3), (5, 3)])
def test_i4_the_state_topic_is_replicated_up_to_three_times(brokers: int, replicas: int) -> None:
    assert state_topic_replicas(brokers) == replicas


def test_i4_the_relay_creates_its_state_topic_with_the_replicas_the_cluster_has(
    bootstrap_servers: str,
    drain: Callable[..., Relay],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="outbox.relay")
    state_topic = f"state.{uuid.uuid4().hex[:8]}"
    drain(state_topic=state_topic)
    md = AdminClient({"bootstrap.servers": bootstrap_servers}).list_topics(timeout=30)
    brokers = len(md.brokers)
    partitions = md.topics[state_topic].partitions.values()
    assert {len(p.replicas) for p in partitions} == {min(3, brokers)}
    warned = any("replication factor 1" in r.getMessage() for r in caplog.records)
    assert warned == (brokers == 1)
