"""The one topic reader every test stands on: to the end of each partition, every copy, loud.

An exactly-once assert is only as good as the read behind it: a reader that stops once it has
the expected count misses the duplicates at the end of a topic, and one that skips errors
checks part of a topic as if it were all of it.
"""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Producer

from tests.conftest import Broker
from tests.support import (
    AbortedCopiesVisible,
    KafkaReader,
    Record,
    assert_exactly_once,
    copies,
    read_topic,
)

# Tansu under-reports ListOffsets and shows aborted records; the reader must be right on both.
pytestmark = pytest.mark.both_brokers


def _produce(bootstrap: str, topic: str, ids: list[str], partition: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for event_id in ids:
        producer.produce(
            topic, value=b"v", partition=partition, headers=[("outbox-event-id", event_id)]
        )
    assert producer.flush(30) == 0


def test_the_reader_returns_every_copy_to_the_end_of_each_partition(
    bootstrap_servers: str, topic: str
) -> None:
    ids = [str(uuid.uuid4()) for _ in range(300)]
    _produce(bootstrap_servers, topic, ids, partition=0)
    _produce(bootstrap_servers, topic, ids[:2], partition=3)  # copies at the end of the topic
    records = read_topic(bootstrap_servers, topic, expected=len(ids))
    assert len(records) == 302
    assert copies(records)[ids[0]] == copies(records)[ids[1]] == 2
    with pytest.raises(AssertionError, match="2 extra copies"):
        assert_exactly_once(records, ids)


def test_the_reader_waits_for_expected_records_and_sees_a_missing_topic_as_empty(
    bootstrap_servers: str, topic: str
) -> None:
    assert read_topic(bootstrap_servers, f"{topic}.absent", timeout=10) == []
    _produce(bootstrap_servers, topic, ["a", "b"], partition=1)
    assert [r.event_id for r in read_topic(bootstrap_servers, topic, expected=2)] == ["a", "b"]


def test_the_reader_reads_to_the_last_stable_offset_not_past_an_open_transaction(
    bootstrap_servers: str, topic: str
) -> None:
    _produce(bootstrap_servers, topic, ["committed"], partition=2)
    open_tx = Producer(
        {"bootstrap.servers": bootstrap_servers, "transactional.id": f"reader-{uuid.uuid4()}"}
    )
    open_tx.init_transactions(30)
    open_tx.begin_transaction()
    open_tx.produce(topic, value=b"v", partition=2, headers=[("outbox-event-id", "open")])
    assert open_tx.flush(30) == 0
    try:
        records = read_topic(bootstrap_servers, topic, timeout=20)
    finally:
        open_tx.abort_transaction(30)
    assert [r.event_id for r in records] == ["committed"]


def _record(event_id: str, offset: int) -> Record:
    return Record("t", 0, offset, None, None, {"outbox-event-id": event_id.encode()}, 0)


@pytest.mark.parametrize(
    ("on_topic", "expected", "aborted_visible", "outcome"),
    [
        (["a", "b"], ["a", "b"], False, 0),
        (["a", "b", "a"], ["a", "b"], False, "1 extra copies"),
        (["a", "b", "a"], ["a", "b"], True, 1),  # reported as a warning, returned
        (["a"], ["a", "b"], True, "1 events missing"),
        (["a", "b", "c"], ["a", "b"], True, "not expected"),
    ],
)
def test_exactly_once_counts_copies(
    on_topic: list[str], expected: list[str], aborted_visible: bool, outcome: int | str
) -> None:
    records = [_record(e, i) for i, e in enumerate(on_topic)]
    if isinstance(outcome, str):
        with pytest.raises(AssertionError, match=outcome):
            assert_exactly_once(records, expected, aborted_copies_visible=aborted_visible)
    elif outcome:
        with pytest.warns(AbortedCopiesVisible):
            assert assert_exactly_once(records, expected, aborted_copies_visible=True) == outcome
    else:
        assert assert_exactly_once(records, expected, aborted_copies_visible=aborted_visible) == 0


def test_the_reader_waits_for_records_that_land_after_its_first_pass(
    bootstrap_servers: str, topic: str
) -> None:
    """``expected``: records produced while the read is under way are read too, also on a
    partition already read to its end (Tansu under-reports its end, so only reading on sees
    them)."""
    import threading

    early, late = [f"early-{i}" for i in range(5)], [f"late-{i}" for i in range(5)]
    _produce(bootstrap_servers, topic, early, partition=0)
    producing = threading.Timer(2.0, _produce, (bootstrap_servers, topic, late, 0))
    producing.start()
    try:
        records = read_topic(bootstrap_servers, topic, expected=10, timeout=30)
    finally:
        producing.join()
    assert [r.event_id for r in records] == early + late


def test_read_every_reads_past_a_stable_offset_that_sticks(broker: Broker, topic: str) -> None:
    """Tansu 0.6 can leave a partition's last stable offset below committed transactions for
    good (``KafkaReader.read_every``). A transaction held open stands in for that here: the
    events committed after it must still be read where the broker's offset sticks."""
    if not broker.stable_offset_sticks:
        pytest.skip("this broker's last stable offset moves on once transactions end")
    held = Producer({"bootstrap.servers": broker.bootstrap_servers, "transactional.id": topic})
    held.init_transactions(30)
    held.begin_transaction()
    held.produce(topic, value=b"v", partition=0, headers=[("outbox-event-id", "held")])
    assert held.flush(30) == 0
    ids = [f"after-{i}" for i in range(3)]
    try:
        _produce(broker.bootstrap_servers, topic, ids, partition=0)
        reader = KafkaReader(broker.bootstrap_servers, stable_offset_sticks=True)
        records = reader.read_every(topic, ids, timeout=20)
    finally:
        held.abort_transaction(30)
    assert {r.event_id for r in records} >= set(ids)
