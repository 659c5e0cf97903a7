"""The abort probe's answer belongs to a cluster, not to the address it was reached at (I2).

A relay keeps the probe's clear answer for the process, so a slot taken over again starts
without a probe. The address is the relay's ``--bootstrap-servers``: a DNS name or a load
balancer that another cluster can answer behind (a migration, a disaster-recovery switch,
``outbox dev`` restarted with the other broker on the same ``--broker-port``). An answer kept
from Apache Kafka ("aborts are hidden") then sends the marker with the records on a broker
that shows aborted transactions (Tansu): the marker of a batch whose record failed stays
visible, and recovery deletes a row that was never published.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
from confluent_kafka import Producer

from outbox.embedded import EmbeddedBroker
from outbox.relay.abort_probe import aborts_hidden
from tests.conftest import Broker
from tests.integration.forwarding import forwarding


def _probe(bootstrap_servers: str, topic: str) -> bool | None:
    """What a slot's worker asks at the start of a producer (``SlotWorker.probe_aborts``)."""
    tid = f"probe-{uuid.uuid4().hex[:8]}"
    producer = Producer({"bootstrap.servers": bootstrap_servers, "transactional.id": tid})
    try:
        producer.init_transactions(60)
        return aborts_hidden(
            producer,
            {"bootstrap.servers": bootstrap_servers},
            topic,
            0,
            tid.encode(),
            timeout=20,
            remember_as=bootstrap_servers,
        )
    finally:
        producer.flush(5)


@pytest.mark.needs_apache_kafka
def test_i2_an_answer_from_apache_kafka_is_not_kept_for_tansu_behind_the_same_address(
    broker: Broker, make_topic: Callable[..., str]
) -> None:
    state_topic = make_topic(partitions=1)
    with EmbeddedBroker() as tansu, forwarding(broker.bootstrap_servers) as address:
        assert _probe(address.address, state_topic) is True  # Apache Kafka hides aborts
        address.switch(tansu.bootstrap_servers)
        assert _probe(address.address, state_topic) is False  # Tansu shows them
