"""The recovery marker sent with the batch's records (where the broker hides aborts, I2/I4/I12).

On Apache Kafka the abort probe lets a slot produce its marker right after the batch's
records, before the flush: the producer's queue then still holds every record of the batch.
A queue bounded by the user (``-X queue.buffering.max.messages``/``.kbytes``, to cap the
relay's memory) must not turn that one extra record into a batch that can never be sent.
On Apache Kafka the real abort probe chooses that order; on Tansu the test takes it through
the ``Seams.aborts_hidden`` seam (the producer's queue is the same client-side either way).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from outbox import publish
from outbox.relay import Seams
from tests.conftest import Broker, RelayHandle, _libpq
from tests.support import KafkaReader, assert_exactly_once, wait_for


def _pending(database_url: str) -> int:
    with psycopg.connect(_libpq(database_url), autocommit=True, row_factory=dict_row) as conn:
        row = conn.execute("SELECT count(*) AS n FROM outbox_events").fetchone()
    return int(row["n"]) if row else -1


def _hidden(*args: Any, **kwargs: Any) -> bool:
    """The abort probe's answer on Apache Kafka: aborted transactions are hidden."""
    return True


@pytest.mark.both_brokers
def test_i12_a_full_producer_queue_does_not_stop_the_marker_sent_with_the_records(
    broker: Broker,
    engine: Engine,
    database_url: str,
    topic: str,
    start_relay: Callable[..., RelayHandle],
    kafka: KafkaReader,
) -> None:
    """A batch as large as the producer's queue: the records fill it, and the marker that
    follows them must wait for room (as the records do), not fail the batch every time."""
    with Session(engine) as session, session.begin():
        ids = [str(publish(session, topic=topic, key=f"k{i}", value=b"v")) for i in range(30)]
    handle = start_relay(
        slots=1,
        batch_size=10,
        producer_overrides={
            "request.timeout.ms": "40000",
            "queue.buffering.max.messages": "10",
        },
        seams=None if broker.filters_aborts else Seams(aborts_hidden=_hidden),
    )
    wait_for(lambda: not _pending(database_url), timeout=60, what="the outbox drained")
    handle.stop()
    assert_exactly_once(kafka.read(topic, 30), ids)
    assert handle.relay.stats.published == 30
