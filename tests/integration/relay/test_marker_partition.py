"""The state partition joins each batch's Kafka transaction together with the records.

A partition joins a Kafka transaction through the coordinator (``AddPartitionsToTxn``, a
replicated write on Apache Kafka) before any record may go to it. The recovery marker can only
be written once every record of the batch is acknowledged (on a broker that shows aborted
transactions, a marker sent earlier could name a record that never landed), so if it were the
first record for the state partition, every batch would wait for that extra round trip after
the flush: ~40 % of the relay's commit -> readable at 50 events/s on a 3-node cluster
(benchmarks/latency_stages.py). An empty marker, produced first, registers the partition with
the records; it names no event, so even visible after an abort it deletes nothing (I2, I4).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from outbox import publish
from outbox.relay import Relay
from outbox.relay.marker import Marker
from tests.support import read_topic


def test_i4_each_batch_opens_with_an_empty_marker_then_names_its_events_last(
    engine: Engine,
    topic: str,
    bootstrap_servers: str,
    drain: Callable[..., Relay],
) -> None:
    state_topic = f"state.{uuid.uuid4().hex[:8]}"
    batches = 3
    for n in range(batches):
        with Session(engine) as session, session.begin():
            publish(session, topic=topic, key="k", value={"n": n})
        drain(state_topic=state_topic, slots=1)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM outbox_events")).scalar_one() == 0

    records = read_topic(bootstrap_servers, state_topic, expected=2 * batches)
    markers = [Marker.decode(r.value or b"") for r in sorted(records, key=lambda r: r.offset)]
    assert [len(m.ids) for m in markers] == [0, 1] * batches
    assert all(m.slot == 0 and m.slots == 1 for m in markers)
    named = [m.ids[0] for m in markers if m.ids]
    assert named == sorted(named)
    assert len(set(named)) == batches
