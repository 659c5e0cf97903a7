"""The database refuses the relay's work on a live session (a read-only database during a
maintenance freeze, a revoked privilege, a trigger that raises): I12, no Kafka transaction
stays open past the batch that failed, the worker keeps its slot and retries, nothing is lost
or published twice once the database accepts the delete again (I2, I4)."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from outbox import publish
from outbox.partitioner import partition_for
from tests.conftest import TOPIC_PARTITIONS, RelayHandle
from tests.support import KafkaReader, assert_exactly_once, wait_for

REFUSE_DELETES = """
CREATE SEQUENCE refused_deletes;
CREATE FUNCTION refuse_outbox_deletes() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  PERFORM nextval('refused_deletes');  -- outlives the rollback: counts the refusals
  RAISE EXCEPTION 'outbox_events is frozen for maintenance';
END $$;
CREATE TRIGGER refuse_outbox_deletes BEFORE DELETE ON outbox_events
FOR EACH STATEMENT EXECUTE FUNCTION refuse_outbox_deletes();
"""
ACCEPT_DELETES = "DROP TRIGGER refuse_outbox_deletes ON outbox_events"


def _pending(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM outbox_events")).scalar_one())


def _refuse_deletes(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(REFUSE_DELETES)


def _accept_deletes(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.exec_driver_sql(ACCEPT_DELETES)


def _refusals(engine: Engine) -> int:
    with engine.connect() as conn:
        row = conn.execute(text("SELECT last_value, is_called FROM refused_deletes")).one()
    return int(row.last_value) if row.is_called else 0


def _publish(engine: Engine, topic: str, n: int, key: str) -> list[str]:
    with Session(engine) as session, session.begin():
        return [str(publish(session, topic=topic, key=key, value=f"v{i}")) for i in range(n)]


@pytest.fixture
def relay_logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="outbox.relay")
    return caplog


def test_i12_a_refused_delete_is_retried_in_one_line_per_step_and_delivers_exactly_once(
    engine: Engine,
    topic: str,
    start_relay: Callable[..., RelayHandle],
    kafka: KafkaReader,
    relay_logs: pytest.LogCaptureFixture,
) -> None:
    """A trigger refuses the rows' DELETE: the worker survives (no crash, no traceback, one
    warning per backoff step naming the database's reason) and holds its slot; once the
    database accepts deletes again every event is on the topic exactly once, on every
    broker (a refused batch sends no record, so even a broker that shows aborted records
    shows no copy)."""
    _refuse_deletes(engine)
    handle = start_relay(slots=1)
    wait_for(lambda: len(handle.relay.workers) == 1, what="the relay owns its slot")
    worker = handle.relay.workers[0]
    ids = _publish(engine, topic, 10, "k")
    wait_for(lambda: handle.relay.stats.retries >= 3, timeout=60, what="three retries")
    assert handle.relay.workers.get(0) is worker, "the worker ended instead of retrying"
    assert _pending(engine) == 10
    _accept_deletes(engine)
    wait_for(lambda: _pending(engine) == 0, timeout=60, what="the rows published and deleted")
    handle.stop()
    assert_exactly_once(kafka.read(topic, 10), ids)
    assert not worker.failed
    assert handle.relay.stats.dead == 0
    tracebacks = [r for r in relay_logs.records if r.exc_info]
    assert not tracebacks, f"a traceback was logged: {tracebacks[0].getMessage()}"
    retried = [r for r in relay_logs.records if "retrying" in r.getMessage()]
    assert retried, "no retry line"
    assert all(r.levelno == logging.WARNING for r in retried)
    assert all("\n" not in r.getMessage() for r in retried)
    assert any("frozen for maintenance" in r.getMessage() for r in retried)


def _visible_after(
    producer: Producer, reader: Consumer, topic: str, key: bytes, deadline: float
) -> float:
    """Write one record with a plain producer; seconds until a read_committed reader sees it
    (inf if not before ``deadline``)."""
    value = uuid.uuid4().bytes
    producer.produce(topic, key=key, value=value)
    producer.flush(10)
    written = time.monotonic()
    while time.monotonic() < deadline:
        msg = reader.poll(0.1)
        if msg is not None and not msg.error() and msg.value() == value:
            return time.monotonic() - written
    return float("inf")


@pytest.mark.needs_apache_kafka
def test_i12_a_refused_delete_does_not_hold_back_read_committed_readers_of_the_partition(
    engine: Engine,
    topic: str,
    bootstrap_servers: str,
    start_relay: Callable[..., RelayHandle],
) -> None:
    """While a trigger refuses the relay's DELETE (for ~10 s), another producer writes to the
    partition the relay's batch goes to: a read_committed reader keeps seeing its records
    within a few seconds each, because the relay leaves no Kafka transaction open there (an
    open one holds the partition's last stable offset back for everyone)."""
    key = b"shared-key"
    partition = partition_for(key, TOPIC_PARTITIONS)
    _refuse_deletes(engine)
    handle = start_relay(slots=1)
    _publish(engine, topic, 20, key.decode())
    wait_for(lambda: _refusals(engine) >= 1, timeout=60, what="the first refusal")
    producer = Producer({"bootstrap.servers": bootstrap_servers, "partitioner": "murmur2_random"})
    reader = Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": f"lso-{uuid.uuid4().hex[:8]}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    _, end = reader.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
    reader.assign([TopicPartition(topic, partition, end)])  # every sample is written past it
    try:
        latencies = []
        fault_ends = time.monotonic() + 10
        while time.monotonic() < fault_ends:
            latencies.append(
                _visible_after(producer, reader, topic, key, deadline=time.monotonic() + 6)
            )
            assert _pending(engine) == 20, "the trigger let a delete through"
    finally:
        reader.close()
    _accept_deletes(engine)
    wait_for(lambda: _pending(engine) == 0, timeout=60, what="the rows published after the fault")
    handle.stop()
    assert len(latencies) >= 3
    assert max(latencies) < 5, f"read_committed readers were held back: {latencies}"
