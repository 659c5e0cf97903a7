"""Recovery reads markers ``read_committed``: an aborted batch's marker never deletes a row.

The relay writes each batch's recovery marker in the batch's own Kafka transaction. When that
transaction aborts, its marker must be invisible to the next owner of the slot, or recovery
deletes rows whose records were aborted too: silent loss (I2). Only a broker that hides aborted
records from ``read_committed`` readers can show this (Apache Kafka); Tansu shows them to every
reader, so there the test is skipped (``needs_abort_filtering``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from outbox import publish
from outbox.relay import Relay
from outbox.relay.config import RelayConfig
from outbox.relay.marker_reader import KafkaMarkerReader, MarkerReader, kafka_consumers
from tests.conftest import RelayHandle
from tests.integration.relay.faults import Faults, FaultyProducer
from tests.support import KafkaReader, assert_exactly_once, wait_for


def _pending(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM outbox_events")).scalar_one())


@pytest.mark.needs_abort_filtering
def test_i2_the_marker_of_an_aborted_batch_deletes_nothing(
    engine: Engine,
    topic: str,
    relay_config: Callable[..., RelayConfig],
    kafka: KafkaReader,
) -> None:
    """Abort the first batch's Kafka transaction (records and marker) and lose the slot's DB
    connection: the next owner must find no marker and publish the rows, not delete them."""
    aborted: list[int] = []

    def abort_instead_then_lose_the_connection(producer: FaultyProducer, timeout: float) -> None:
        if aborted:
            producer.real.commit_transaction(timeout)
            return
        aborted.append(producer.slot)
        assert producer.real.flush(30) == 0  # the marker reaches the broker ...
        producer.real.abort_transaction(30)  # ... in a transaction that aborts
        faults.lose_connection()  # the slot is lost; its next owner runs recovery

    faults = Faults(commit=abort_instead_then_lose_the_connection)
    config = relay_config(slots=1)
    recoveries: list[int] = []
    markers = _CountingReads(
        KafkaMarkerReader(
            config.state_topic,
            kafka_consumers(config.producer_plan().connection, lambda: f"{topic}-markers"),
        ),
        recoveries,
    )
    relay = Relay(config, markers=markers, seams=faults.seams())
    with Session(engine) as session, session.begin():
        ids = [
            str(publish(session, topic=topic, key=f"k{i % 3}", value={"i": i})) for i in range(40)
        ]
    handle = RelayHandle(relay)
    handle.thread.start()
    try:
        wait_for(lambda: _pending(engine) == 0, timeout=60, what="the slot's next owner drains")
    finally:
        handle.stop()
    assert aborted, "the fault was not injected"
    assert len(recoveries) >= 2, "the slot's next owner did not read the marker"
    assert handle.relay.stats.recovered == 0, "recovery trusted the marker of an aborted batch"
    assert_exactly_once(kafka.read(topic, 40), ids)


class _CountingReads:
    """A marker reader that counts a slot's recovery reads (the committed ones; the
    coordinator's own reads are not)."""

    def __init__(self, real: MarkerReader, recoveries: list[int]) -> None:
        self.real = real
        self.recoveries = recoveries

    def read(
        self,
        slot: int,
        tid: str,
        interrupt: threading.Event,
        *,
        committed: bool = True,
        since: int = 0,
    ) -> bytes | None:
        if committed:
            self.recoveries.append(slot)
        return self.real.read(slot, tid, interrupt, committed=committed, since=since)

    def ends(self, partitions: int) -> dict[int, int]:
        return self.real.ends(partitions)

    def close(self) -> None:
        self.real.close()
