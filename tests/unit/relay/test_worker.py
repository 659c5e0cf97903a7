"""The slot worker driven through its seams: a scripted producer and an in-memory outbox.

Each test runs one worker to the end of ``--once`` (or until it loses its slot) in this
thread; what PostgreSQL and the broker do for real is pinned by tests/integration/relay.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import pytest
from confluent_kafka import KafkaError

from outbox.errors import ConfigError, SlotLost
from outbox.relay.config import Guarantee
from outbox.relay.fences import SlotLockState
from outbox.relay.marker import Marker
from outbox.relay.publishers import COMMIT_ATTEMPTS
from outbox.relay.worker import SlotWorker
from tests.unit.relay.fakes import (
    TOPIC,
    Broker,
    FakeProducer,
    FakeSession,
    Message,
    Refusals,
    StateTopic,
    error,
    make_worker,
    row,
)

ALO = Guarantee.AT_LEAST_ONCE
AMO = Guarantee.AT_MOST_ONCE


def _rows(n: int, *, topic: str = TOPIC) -> list:  # type: ignore[type-arg]
    return [row(i, topic=topic, value=f"v{i}".encode()) for i in range(1, n + 1)]


def test_i2_exactly_once_publishes_each_batch_in_a_transaction_with_its_marker() -> None:
    session, broker = FakeSession(_rows(5)), Broker()
    worker = make_worker(session, broker, batch_size=2)
    worker.run()
    assert session.ids() == []
    assert broker.values() == [b"v1", b"v2", b"v3", b"v4", b"v5"]
    markers = [Marker.decode(m.value or b"") for m in broker.log if m.topic != TOPIC]
    assert [list(m.ids) for m in markers] == [[1, 2], [3, 4], [5]]
    assert broker.begun == 3
    assert session.recorded == [1, 2, 3, 4, 5]  # the delivery record, in the same transaction
    assert worker.context.stats.published == 5
    assert session.released


def _marker_order(producer_calls: list[str]) -> list[str]:
    """One batch's calls: where its marker went relative to the flush that awaits the
    records' delivery reports."""
    return [c for c in producer_calls if c in {"produce marker", "flush"}][:2]


def test_i4_where_aborts_are_hidden_the_marker_goes_out_with_the_records() -> None:
    session, broker = FakeSession(_rows(3)), Broker(hides_aborts=True)
    worker = make_worker(session, broker)
    worker.run()
    assert broker.probes == 1  # once, with the slot's first producer
    assert _marker_order(broker.producers[0].calls) == ["produce marker", "flush"]
    assert [list(Marker.decode(m.value or b"").ids) for m in broker.log if m.topic != TOPIC] == [
        [1, 2, 3]
    ]


def test_i4_where_aborts_are_shown_the_marker_waits_for_every_delivery_report() -> None:
    """Tansu shows aborted records: a marker sent before the reports could name a record
    that never landed, and recovery would delete its unpublished row."""
    session, broker = FakeSession(_rows(3)), Broker(hides_aborts=False)
    worker = make_worker(session, broker)
    worker.run()
    assert _marker_order(broker.producers[0].calls) == ["flush", "produce marker"]


def test_i12_a_failed_batch_aborts_its_early_marker_with_its_records() -> None:
    session, broker = FakeSession(_rows(3)), Broker(hides_aborts=True)
    failed: list[int] = []

    def first_batch_times_out(batch: list[Message]) -> dict[int, KafkaError]:
        if failed:
            return {}
        failed.append(len(batch))
        return {1: error(KafkaError._TRANSPORT)}

    broker.reports = first_batch_times_out
    make_worker(session, broker).run()
    assert len(broker.aborts) == 1
    markers = [Marker.decode(m.value or b"") for m in broker.log if m.topic != TOPIC]
    assert [list(m.ids) for m in markers] == [[1, 2, 3]]  # the aborted one never committed
    assert [m.value for m in broker.log if m.topic == TOPIC] == [b"v1", b"v2", b"v3"]


def test_i12_a_failed_report_aborts_the_transaction_and_the_batch_is_sent_again() -> None:
    session, broker = FakeSession(_rows(3)), Broker()
    failed: list[int] = []

    def first_batch_times_out(batch: list[Message]) -> dict[int, KafkaError]:
        if failed:
            return {}
        failed.append(len(batch))
        return {1: error(KafkaError._TRANSPORT)}

    broker.reports = first_batch_times_out
    worker = make_worker(session, broker)
    worker.run()
    assert failed == [3]
    assert len(broker.aborts) == 1  # the failed batch's transaction did not stay open
    assert session.ids() == []
    assert [m.value for m in broker.log if m.topic == TOPIC] == [b"v1", b"v2", b"v3"]
    assert worker.context.stats.retries == 1
    assert worker.context.stats.aborts == 1
    assert session.dead == {}


def test_i6_a_poison_record_is_buried_and_the_rest_of_its_batch_is_published() -> None:
    session, broker = FakeSession(_rows(4)), Broker()
    broker.reports = lambda batch: {
        i: error(KafkaError.INVALID_RECORD) for i, m in enumerate(batch) if m.value == b"v2"
    }
    worker = make_worker(session, broker)
    worker.run()
    assert list(session.dead) == [2]
    assert session.dead[2].startswith("INVALID_RECORD")
    assert [m.value for m in broker.log if m.topic == TOPIC] == [b"v1", b"v3", b"v4"]
    assert session.ids() == []


def test_i6_a_request_wide_refusal_narrows_to_one_row_per_batch_and_buries_only_its_row() -> None:
    session, broker = FakeSession(_rows(6)), Broker()
    broker.reports = lambda batch: (
        dict.fromkeys(range(len(batch)), error(KafkaError.MSG_SIZE_TOO_LARGE))
        if any(m.value == b"v3" for m in batch)
        else {}
    )
    worker = make_worker(session, broker, batch_size=4)
    worker.run()
    assert list(session.dead) == [3]
    assert [m.value for m in broker.log if m.topic == TOPIC] == [b"v1", b"v2", b"v4", b"v5", b"v6"]
    markers = [list(Marker.decode(m.value or b"").ids) for m in broker.log if m.topic != TOPIC]
    assert markers[:2] == [[1], [2]]  # one per batch up to the last refused row (4) ...
    assert markers[-1] == [5, 6]  # ... then full batches again
    assert not worker.failed


def test_i6_a_missing_topic_is_held_while_the_others_flow_then_buried() -> None:
    missing = "gone"
    session = FakeSession([row(0, topic=missing), *_rows(3)])
    broker = Broker()
    broker.reports = lambda batch: {
        i: error(KafkaError.UNKNOWN_TOPIC_OR_PART)
        for i, m in enumerate(batch)
        if m.topic == missing
    }
    worker = make_worker(session, broker, missing_topic_timeout=0.3)
    worker.run()
    assert broker.values() == [b"v1", b"v2", b"v3"]
    assert list(session.dead) == [0]
    assert "--missing-topic-timeout=0.3s" in session.dead[0]


def test_i4_a_fenced_commit_loses_the_slot_and_keeps_the_rows() -> None:
    session, broker = FakeSession(_rows(2)), Broker()
    broker.fail["commit_transaction"] = [error(KafkaError.PRODUCER_FENCED)]
    worker = make_worker(session, broker)
    worker.run()
    assert worker.context.stats.fenced == 1
    assert session.ids() == [1, 2]
    assert broker.log == []
    assert not worker.failed  # a lost slot, not a crash
    assert session.released


def _fenced_abortable() -> KafkaError:
    """PRODUCER_FENCED as librdkafka raises it for a produce that found a newer epoch: the
    transaction "must be aborted", not fatal."""
    return KafkaError(KafkaError.PRODUCER_FENCED, "fenced", txn_requires_abort=True)


def test_i12_a_fenced_commit_gives_the_slot_up_without_aborting_what_the_fencer_ended() -> None:
    """The fencing init_transactions ended the transaction; an abort with the old epoch can go
    unanswered (Tansu 0.6 let it wait out its 60 s while the slot stayed down)."""
    session, broker = FakeSession(_rows(2)), Broker()
    broker.fail["commit_transaction"] = [_fenced_abortable()]
    worker = make_worker(session, broker)
    worker.run()
    assert worker.context.stats.fenced == 1
    assert broker.aborts == []
    assert session.ids() == [1, 2]
    assert session.released


def test_i12_a_batch_whose_reports_say_fenced_gives_the_slot_up_without_aborting() -> None:
    session, broker = FakeSession(_rows(2)), Broker()
    broker.reports = lambda batch: {0: _fenced_abortable()}
    worker = make_worker(session, broker)
    worker.run()
    assert worker.context.stats.fenced == 1
    assert broker.aborts == []
    assert session.ids() == [1, 2]
    assert not worker.failed


def test_i4_a_fencing_that_confluent_kafka_masks_as_a_system_error_is_handled_as_the_fencing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    session, broker = FakeSession(_rows(2)), Broker()
    broker.masked = [error(KafkaError._FENCED, fatal=True)]
    worker = make_worker(session, broker)
    with caplog.at_level(logging.DEBUG, logger="outbox"):
        worker.run()
    assert worker.context.stats.fenced == 1
    assert not worker.failed  # a lost slot, not a crash with a traceback
    assert session.ids() == [1, 2]
    assert broker.log == []
    assert session.released
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_i9_a_fence_while_the_slot_lock_is_still_held_is_counted_as_foreign() -> None:
    session = FakeSession(_rows(1), lock=SlotLockState(holds_slot=True, layout_changing=False))
    broker = Broker()
    broker.fail["commit_transaction"] = [error(KafkaError.PRODUCER_FENCED)]
    worker = make_worker(session, broker)
    worker.run()
    assert worker.context.stats.foreign_fences == 1


def test_i8_a_refused_transactional_id_stops_the_relay_naming_the_fix() -> None:
    session, broker, refusals = FakeSession(_rows(1)), Broker(), Refusals()
    broker.fail["init_transactions"] = [error(KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED)]
    worker = make_worker(session, broker, refusals=refusals)
    worker.run()
    assert len(refusals.refused) == 1
    assert isinstance(refusals.refused[0], ConfigError)
    assert "TransactionalId" in str(refusals.refused[0])
    assert session.ids() == [1]


def test_a_fatal_producer_error_builds_a_new_producer_and_blames_no_row() -> None:
    session, broker = FakeSession(_rows(3)), Broker()
    fatal: list[int] = []

    def first_batch_fatal(batch: list[Message]) -> dict[int, KafkaError]:
        fatal.append(1)
        return {0: error(KafkaError._FATAL, fatal=True)} if len(fatal) == 1 else {}

    broker.reports = first_batch_fatal
    worker = make_worker(session, broker, guarantee=ALO)
    worker.run()
    assert len(broker.producers) == 2
    assert session.dead == {}
    assert session.ids() == []


def test_i4_a_new_producer_first_deletes_the_rows_its_slots_last_marker_names() -> None:
    rows = _rows(4)
    session, broker = FakeSession(rows), Broker()
    marker = Marker.of_batch(uuid.uuid4(), "unit-0", 0, 1, [(r.id, r.event_id) for r in rows[:2]])
    worker = make_worker(session, broker, markers={0: marker.encode()})
    worker.run()
    assert worker.context.stats.recovered == 2
    assert broker.values() == [b"v3", b"v4"]  # the recovered rows are not published again


def test_i4_the_outboxs_first_relay_reads_a_marker_another_relay_wrote_from_its_floor() -> None:
    """The outbox's first relay knows where the state partitions ended before it announced
    itself: no marker of its ids lies below, but one another relay of the outbox wrote since
    (it took a slot, committed a batch and died before its delete) lies above, and names
    rows that must not be published again."""
    rows = _rows(4)
    session, broker = FakeSession(rows), Broker()
    marker = Marker.of_batch(uuid.uuid4(), "unit-0", 0, 1, [(r.id, r.event_id) for r in rows[:2]])
    state = StateTopic({0: marker.encode()})
    worker = make_worker(session, broker, state=state, floor=17)
    worker.run()
    assert state.since == [17]
    assert worker.context.stats.recovered == 2
    assert broker.values() == [b"v3", b"v4"]


def _held_back_marker(rows: list) -> StateTopic:  # type: ignore[type-arg]
    """The slot's last marker names the first two rows, past a stable offset that stays put."""
    marker = Marker.of_batch(uuid.uuid4(), "unit-0", 0, 1, [(r.id, r.event_id) for r in rows[:2]])
    return StateTopic({0: marker.encode()}, held_back=3)


def test_i4_where_aborts_are_shown_recovery_reads_its_marker_past_a_stuck_stable_offset(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Tansu 0.6 can leave a transaction unfinished for good: the state partition's stable
    offset never moves. Where aborted transactions are shown anyway, the slot reads its marker
    uncommitted instead of waiting forever, and deletes the rows it names (not publishing
    them again)."""
    rows = _rows(4)
    session, broker, state = FakeSession(rows), Broker(hides_aborts=False), _held_back_marker(rows)
    worker = make_worker(session, broker, state=state)
    with caplog.at_level(logging.WARNING, logger="outbox.relay"):
        worker.run()
    assert state.reads == [True, False], "one committed read held back, then uncommitted"
    assert worker.context.stats.recovered == 2
    assert broker.values() == [b"v3", b"v4"]
    assert any("reads its marker uncommitted" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("answer", [True, None], ids=["aborts-hidden", "no-clear-answer"])
def test_i2_where_aborts_may_be_hidden_recovery_waits_for_the_stable_offset(
    answer: bool | None,
) -> None:
    """Apache Kafka hides an aborted batch's marker only from read_committed readers: read
    uncommitted, it would delete rows whose records no consumer gets. There, and where the
    probe gave no clear answer, recovery only ever reads committed, retrying until it passes."""
    rows = _rows(4)
    session, broker, state = FakeSession(rows), Broker(hides_aborts=answer), _held_back_marker(rows)
    worker = make_worker(session, broker, state=state)
    worker.run()
    assert state.reads == [True, True, True, True], "never read uncommitted"
    assert worker.context.stats.recovered == 2
    assert broker.values() == [b"v3", b"v4"]


def test_i12_a_probe_without_a_clear_answer_is_asked_again_when_recovery_is_held_back() -> None:
    """The producer's probe gave no clear answer (its read timed out on a loaded machine), and
    the answer is kept as unclear for the cluster for minutes. When recovery is then held at a
    stable offset Tansu never moves, the slot must ask the broker again, not keep reading
    committed for as long as its producer lives (I12)."""
    rows = _rows(4)
    session, broker = FakeSession(rows), Broker()
    state = StateTopic(_held_back_marker(rows).markers, held_back=50)  # moves only late
    answers: list[bool | None] = [None, False]  # unclear at first, then: aborts are shown
    asked_with: list[object] = []

    def probe(*args: object, **kwargs: object) -> bool | None:
        broker.probes += 1
        asked_with.append(kwargs.get("remember_as"))
        return answers.pop(0) if len(answers) > 1 else answers[0]

    broker.aborts_hidden = probe  # type: ignore[method-assign]
    worker = make_worker(session, broker, state=state)
    worker.run()
    assert broker.probes == 2
    assert asked_with[1] is None, "asked past the cluster's kept 'unclear' answer"
    assert state.reads == [True, False]
    assert worker.context.stats.recovered == 2
    assert broker.values() == [b"v3", b"v4"]


def test_i2_at_least_once_deletes_only_acknowledged_rows_not_past_a_failed_one() -> None:
    session, broker = FakeSession(_rows(4)), Broker()
    seen: list[int] = []

    def second_row_fails_once(batch: list[Message]) -> dict[int, KafkaError]:
        seen.append(1)
        return {1: error(KafkaError._TRANSPORT)} if len(seen) == 1 else {}

    broker.reports = second_row_fails_once
    worker = make_worker(session, broker, guarantee=ALO)
    worker.run()
    assert broker.begun == 0  # no transactions
    assert session.ids() == []
    # v1 was deleted after the first try; v3 and v4 waited behind v2 (same topic) and went again.
    assert broker.values() == [b"v1", b"v3", b"v4", b"v2", b"v3", b"v4"]
    assert worker.context.stats.published == 4


def test_at_most_once_deletes_before_sending_and_never_resends() -> None:
    session, broker = FakeSession(_rows(3)), Broker()
    broker.reports = lambda batch: {0: error(KafkaError._TRANSPORT)}
    worker = make_worker(session, broker, guarantee=AMO)
    worker.run()
    assert session.ids() == []
    assert broker.values() == [b"v2", b"v3"]  # v1 is lost, as asked for
    assert broker.begun == 0
    assert worker.context.stats.retries == 0


def test_i12_a_worker_that_loses_its_slot_mid_batch_aborts_the_open_transaction() -> None:
    session, broker = FakeSession(_rows(4)), Broker()

    def lose_the_connection_at_the_claim_ahead(claim: int) -> None:
        if claim == 2:  # the first batch is in flight: its Kafka transaction is open
            raise SlotLost("database connection lost")

    session.on_claim = lose_the_connection_at_the_claim_ahead
    worker = make_worker(session, broker, batch_size=2)
    worker.run()
    assert broker.aborts == [5.0]  # a lost slot's abort does not wait long
    assert broker.log == []
    assert session.ids() == [1, 2, 3, 4]
    assert not worker.failed


def test_i12_a_worker_that_crashes_mid_batch_aborts_the_open_transaction() -> None:
    session, broker = FakeSession(_rows(4)), Broker()

    def crash_at_the_claim_ahead(claim: int) -> None:
        if claim == 2:
            raise RuntimeError("a bug")

    session.on_claim = crash_at_the_claim_ahead
    worker = make_worker(session, broker, batch_size=2)
    worker.run()
    assert len(broker.aborts) == 1
    assert worker.failed
    assert session.ids() == [1, 2, 3, 4]


def test_i12_a_worker_stopped_while_a_transaction_is_open_aborts_it_when_it_closes() -> None:
    session, broker = FakeSession(_rows(2)), Broker()
    worker = make_worker(session, broker)
    worker.producer = broker.producer({})
    worker.producer.begin_transaction()
    worker.span.begin()
    worker.context.stop.set()
    worker.run()
    assert broker.aborts == [5.0]
    assert session.released


def test_i2_a_new_producer_asks_again_how_the_broker_shows_aborted_transactions() -> None:
    """A slot's next producer may reach another cluster behind the same address (the answer
    is kept per cluster, so asking is cheap): it must not inherit the marker order learned
    from the last one, or a broker that shows aborts gets the marker with the records."""
    session, broker = FakeSession(_rows(3)), Broker()
    answers = [True, False]  # Apache Kafka first, then Tansu behind the same address

    def probe(*args: object, **kwargs: object) -> bool:
        broker.probes += 1
        return answers.pop(0) if len(answers) > 1 else answers[0]

    broker.aborts_hidden = probe  # type: ignore[method-assign]
    broker.fail["commit_transaction"] = [error(KafkaError._TIMED_OUT)]  # drops the producer
    worker = make_worker(session, broker)
    worker.run()
    assert len(broker.producers) == 2
    assert broker.probes == 2
    assert _marker_order(broker.producers[0].calls) == ["produce marker", "flush"]
    assert _marker_order(broker.producers[1].calls) == ["flush", "produce marker"]
    assert session.ids() == []


class _LostAfterFirstBatch(FakeSession):
    """A slot's session whose connection is gone once its first batch committed."""

    deletes = 0

    def delete(self, ids: Sequence[int]) -> set[int]:
        if self.deletes:
            raise SlotLost("database connection lost")
        self.deletes += 1
        return super().delete(ids)


def test_i3_a_batch_read_ahead_is_not_published_once_the_slot_is_lost() -> None:
    """The first batch reads the next one ahead while the broker acknowledges it; the slot is
    lost before that next batch's DELETE: none of its records may leave (a new owner publishes
    them), and its rows stay in the outbox."""
    session, broker = _LostAfterFirstBatch(_rows(4)), Broker()
    worker = make_worker(session, broker, batch_size=2)
    worker.run()
    assert session.claims >= 2  # the second batch was read ahead
    assert broker.values() == [b"v1", b"v2"]
    assert session.ids() == [3, 4]
    assert worker.context.stats.published == 2


@pytest.mark.timeout(60)
def test_i12_a_commit_that_keeps_failing_retriably_gives_the_batch_up_within_bounds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A broker that answers every commit of a producer with a retriable error (busy settling
    another producer's transaction of the same transactional.id) does not hold the slot: the
    commit is tried a bounded number of times, each retry is logged, then the batch fails, its
    rows stay in the outbox, and a new producer publishes them once."""
    session, broker = FakeSession(_rows(3)), Broker()
    broker.stuck["commit_transaction"] = KafkaError(
        KafkaError.CONCURRENT_TRANSACTIONS, "settling the fenced producer", retriable=True
    )
    caplog.set_level(logging.WARNING, logger="outbox.relay")
    worker = make_worker(session, broker)
    worker.run()
    assert not worker.failed
    stuck_commits = broker.producers[0].calls.count("commit_transaction")
    assert 1 < stuck_commits <= COMMIT_ATTEMPTS
    retries = [r for r in caplog.records if "trying the commit again" in r.getMessage()]
    assert len(retries) == stuck_commits - 1
    assert all("CONCURRENT_TRANSACTIONS" in r.getMessage() for r in retries)
    assert any("gave up committing" in r.getMessage() for r in caplog.records)
    assert len(broker.producers) == 2  # the stuck one dropped; its commit settled by the next
    assert session.ids() == []
    assert [m.value for m in broker.log if m.topic == TOPIC] == [b"v1", b"v2", b"v3"]
    assert worker.context.stats.published == 3
    assert worker.context.stats.retries == 1


@pytest.mark.timeout(60)
def test_i12_a_producer_queue_that_stays_full_fails_the_batch_within_a_transaction_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """produce() waits for room in a full queue for at most a transaction timeout: then the
    batch fails, its transaction is aborted and its rows are sent again, once."""
    session, broker = FakeSession(_rows(3)), Broker(jammed=True)
    caplog.set_level(logging.WARNING, logger="outbox.relay")
    worker = make_worker(
        session, broker, transaction_timeout=1.0, producer_overrides={"request.timeout.ms": "500"}
    )
    worker.run()
    assert not worker.failed
    assert len(broker.aborts) == 1
    assert any("queue stayed full for 1 s" in r.getMessage() for r in caplog.records)
    assert session.ids() == []
    assert [m.value for m in broker.log if m.topic == TOPIC] == [b"v1", b"v2", b"v3"]
    assert worker.context.stats.retries == 1


class _PurgedWhileWaitingForRoom(Broker):
    """A producer whose queue fills at the batch's second record: while produce() waits for
    room, the slot's heartbeat (another thread, for real) finds the session gone and purges
    the producer, which empties its queue. ``after_purge``: records queued since."""

    worker: SlotWorker | None = None
    purged: bool = False
    after_purge: list[bytes | None]

    def producer(self, settings: dict[str, Any]) -> FakeProducer:
        broker = self
        broker.after_purge = []

        class Producer(FakeProducer):
            def produce(self, topic: str, **kw: Any) -> None:
                if not broker.purged and len(self.queued) == 1:
                    broker.jammed = True  # the queue is full from the second record on
                super().produce(topic, **kw)
                if broker.purged:
                    broker.after_purge.append(kw.get("value"))

            def poll(self, timeout: float = -1) -> int:
                if broker.jammed and not broker.purged:
                    assert broker.worker is not None
                    broker.worker.publisher.session_lost()  # the heartbeat, meanwhile
                return 0

            def purge(
                self, in_queue: bool = True, in_flight: bool = True, blocking: bool = True
            ) -> None:
                super().purge(in_queue, in_flight, blocking)
                broker.purged, broker.jammed = True, False  # room again

        made = Producer(self, settings)
        self.producers.append(made)
        return made


def test_i3_an_at_least_once_batch_queues_nothing_after_its_session_ended() -> None:
    """The heartbeat's purge empties the queue produce() was waiting on: the rest of the
    batch must not be queued then (and sent beside the next owner's copies), and every row
    stays in the outbox."""
    session, broker = FakeSession(_rows(4)), _PurgedWhileWaitingForRoom()
    worker = broker.worker = make_worker(session, broker, guarantee=ALO)
    worker.run()
    assert broker.purged
    assert broker.after_purge == [], "records were queued after the purge"
    assert broker.values() == []
    assert session.ids() == [1, 2, 3, 4]
    assert not worker.failed


class _DownThenBack(Broker):
    """A broker unreachable at the first flush (the records stay queued), back after it;
    ``during_outage`` runs meanwhile (the heartbeat, for real in another thread)."""

    during_outage: Callable[[], None] | None = None
    down: bool = True

    def producer(self, settings: dict[str, Any]) -> FakeProducer:
        broker = self

        class Producer(FakeProducer):
            def flush(self, timeout: float = -1) -> int:
                if broker.down:
                    broker.down = False  # back for the next flush
                    if broker.during_outage is not None:
                        broker.during_outage()
                    return len(self.queued)
                return super().flush(timeout)

        made = Producer(self, settings)
        self.producers.append(made)
        return made


def test_i3_an_at_most_once_batch_whose_session_ended_is_not_sent_beside_the_next_owners() -> None:
    """At-most-once has no fencing either: the records a broker outage left in the producer
    when the heartbeat found the slot's session gone are dropped (lost, as a crash loses
    them), not sent when the broker is back, after the next owner's later events."""
    session, broker = FakeSession(_rows(3)), _DownThenBack()
    worker = make_worker(session, broker, guarantee=AMO)
    broker.during_outage = worker.publisher.session_lost
    worker.run()
    assert session.ids() == []  # deleted before sending, as at-most-once does
    assert broker.values() == [], "the lost session's records went out"
    assert not worker.failed


def test_i3_records_left_when_a_statement_finds_the_session_gone_are_not_sent_at_close() -> None:
    """The worker's next claim, not the heartbeat, finds the session gone: the records an
    outage left in an at-most-once producer are not flushed out as the worker closes."""
    session, broker = FakeSession(_rows(3)), _DownThenBack()

    def session_gone(claim: int) -> None:
        if claim == 2:
            raise SlotLost("database connection lost")

    session.on_claim = session_gone
    worker = make_worker(session, broker, guarantee=AMO)
    worker.run()
    assert broker.values() == [], "the lost session's records went out"
    assert not worker.failed
