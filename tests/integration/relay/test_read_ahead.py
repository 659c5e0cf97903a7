"""The relay claims the next batch while the broker acknowledges the current one (I2, I3):
what it then publishes is what the batch's own DELETE removed from the outbox, nothing else."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from outbox import publish
from outbox.relay import Relay, Row
from tests.integration.relay.faults import Faults, TrackedSession
from tests.support import KafkaReader, assert_exactly_once


def _publish(engine: Engine, topic: str, n: int) -> list[str]:
    with Session(engine) as session, session.begin():
        return [str(publish(session, topic=topic, key=f"k{i % 3}", value=b"v")) for i in range(n)]


def test_i2_a_row_deleted_by_hand_after_its_claim_or_read_ahead_is_never_published(
    engine: Engine, topic: str, drain: Callable[..., Relay], kafka: KafkaReader
) -> None:
    """An operator who deletes a pending row withdraws its event, even when the relay has
    already read the row: the first batch's claim, and the next batch read ahead while the
    first one is acknowledged. The withdrawn events are never on the topic nor in the
    delivery record; every other event is, once."""
    ids = _publish(engine, topic, 20)
    withdrawn: list[str] = []

    def withdraw_one(session: TrackedSession, rows: list[Row]) -> None:
        if len(withdrawn) < 2 and rows:  # the first claim, then the read-ahead
            with engine.begin() as conn:
                conn.execute(text("DELETE FROM outbox_events WHERE id = :id"), {"id": rows[1].id})
            withdrawn.append(str(rows[1].event_id))

    relay = drain(slots=1, batch_size=5, seams=Faults(claimed=withdraw_one).seams())
    kept = [e for e in ids if e not in withdrawn]
    assert len(withdrawn) == 2
    assert_exactly_once(kafka.read(topic, len(kept)), kept)
    assert relay.stats.published == len(kept)
    with engine.connect() as conn:
        recorded = {
            str(e) for e in conn.execute(text("SELECT event_id FROM outbox_deliveries")).scalars()
        }
        pending = conn.execute(text("SELECT count(*) FROM outbox_events")).scalar_one()
    assert recorded == set(kept)
    assert pending == 0
