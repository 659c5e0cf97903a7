"""The relay learns whether the broker hides aborted transactions (I2, I4, I12).

Where it does (Apache Kafka), a slot sends its recovery marker with the batch's records: an
aborted batch's marker is as invisible as its records, and no replicated round trip follows
the flush. Where it does not (Tansu), the marker must wait until every record is acknowledged,
so that a visible marker never names a record that did not land. The probe must give the
right answer on each, and never leave its transaction open.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

import pytest
from confluent_kafka import Producer

from outbox.relay.abort_probe import aborts_hidden
from tests.conftest import Broker
from tests.support import read_topic


@pytest.mark.both_brokers
def test_i2_the_probe_tells_a_broker_that_hides_aborts_from_one_that_shows_them(
    broker: Broker, bootstrap_servers: str, make_topic: Callable[..., str]
) -> None:
    topic = make_topic()
    tid = f"probe-{uuid.uuid4().hex[:8]}"
    producer = Producer({"bootstrap.servers": bootstrap_servers, "transactional.id": tid})
    producer.init_transactions(60)

    hidden = aborts_hidden(
        producer, {"bootstrap.servers": bootstrap_servers}, topic, 0, tid.encode()
    )

    assert hidden is broker.filters_aborts
    # I12: the probe's transaction is closed, so a read_committed reader reads to the end.
    records = read_topic(bootstrap_servers, topic, timeout=30)
    assert all(r.value == b"" for r in records)
    assert len(records) == (0 if broker.filters_aborts else 1)


def test_the_probes_reader_logs_through_the_process_logger(
    bootstrap_servers: str, make_topic: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    """librdkafka's lines of the probe's reader go through ``outbox.librdkafka`` (JSON lines,
    redaction, repeats held back), not straight to stderr as plain text."""
    topic = make_topic()
    tid = f"probe-{uuid.uuid4().hex[:8]}"
    producer = Producer({"bootstrap.servers": bootstrap_servers, "transactional.id": tid})
    producer.init_transactions(60)
    # debug=consumer makes the reader log on a healthy cluster: its group id names it.
    connection = {"bootstrap.servers": bootstrap_servers, "debug": "consumer"}

    with caplog.at_level(logging.DEBUG, logger="outbox.librdkafka"):
        aborts_hidden(producer, connection, topic, 0, tid.encode())

    lines = [r.getMessage() for r in caplog.records if r.name == "outbox.librdkafka"]
    assert any("outbox-abort-probe-" in line for line in lines), lines[:5]
