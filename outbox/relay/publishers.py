"""One publisher per delivery guarantee, chosen once when a slot's worker starts.

- ``ExactlyOnce``: a transactional producer; each batch is one Kafka transaction holding its
  records and the slot's recovery marker, inside the database transaction that deletes them.
- ``AtLeastOnce``: an idempotent producer without transactions; the rows whose delivery
  reports succeeded are deleted afterwards.
- ``AtMostOnce``: the rows are deleted first, then sent without waiting for a report.

A publisher works through the slot (``Slot``: its producer, its database session, the plans
it executes) and decides nothing about failures itself: ``plans`` does.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    stop_after_delay,
)

from outbox.db import redact
from outbox.errors import BatchRollback, SlotLost, TransientError
from outbox.relay.backoff import retry_wait
from outbox.relay.batching import claim_ahead
from outbox.relay.classify import TopicHolds, Verdict, classify, fenced, reached, settled
from outbox.relay.config import Guarantee, ProducerPlan, RelayConfig
from outbox.relay.deliveries import Draft
from outbox.relay.marker import Marker
from outbox.relay.plans import Act, Failure, plan_abort_error, plan_start_error
from outbox.relay.rows import Row
from outbox.relay.seams import KafkaProducer, SlotSession
from outbox.relay.unmask import unmasked

log = logging.getLogger("outbox.relay")

COMMIT_ATTEMPTS = 5
"""Tries of one batch's commit_transaction that fail with a retriable error before the batch
is given up (all within one transaction timeout)."""

Placements = dict[int, tuple[int, int]]
"""Where delivery reports put each row's record: id -> (partition, offset)."""


@dataclass
class TransactionSpan:
    """When the open (or last) Kafka transaction began and ended: a fence at the end of a
    long one may be the broker's transaction timeout (``fences.explain_fence``)."""

    begun: float | None = None
    ended: float | None = None

    def begin(self) -> None:
        self.begun, self.ended = time.monotonic(), None

    def end(self) -> None:
        if self.open:
            self.ended = time.monotonic()

    @property
    def open(self) -> bool:
        return self.begun is not None and self.ended is None

    def age(self) -> float | None:
        """Seconds the open (or last) transaction was open; None before the first."""
        if self.begun is None:
            return None
        return (self.ended or time.monotonic()) - self.begun


class Slot(Protocol):
    """What a publisher uses of its slot's worker."""

    slot: int
    tid: str
    config: RelayConfig
    plan: ProducerPlan
    session: SlotSession
    holds: TopicHolds
    span: TransactionSpan
    outbox_id: uuid.UUID
    ahead: list[Row]
    needs_recovery: bool

    probe_aborts: Callable[[KafkaProducer], bool]  # seams.AbortProbe, bound to the slot

    @property
    def producer(self) -> KafkaProducer | None: ...
    def stopping(self) -> bool: ...
    def claim(self) -> list[Row]: ...
    def count(self, **counts: int) -> None: ...
    def placements(self) -> Placements | None: ...
    def settle(
        self, rows: list[Row], failures: Mapping[int, Any], batch_error: Any = None
    ) -> tuple[set[int], Exception | None]: ...
    def abort_open(self, timeout: float | None = None) -> None: ...
    def discard_producer(self) -> None: ...
    def failure_error(self, failure: Failure) -> Exception: ...


class Gate:
    """The way a slot's records enter its producer, closed for good when the slot's session
    ends: ``close`` runs its action (a purge) with no record entering meanwhile, and a
    record that comes after raises ``SlotLost`` instead of being queued. A check of a flag
    before ``produce`` would not do: the purge could run between the check and the call,
    and librdkafka's threads send what is queued after it, worker or no worker (I3)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self, then: Callable[[], None]) -> None:
        with self._lock:
            self._closed = True
            then()

    def __enter__(self) -> None:
        self._lock.acquire()
        if self._closed:
            self._lock.release()
            raise SlotLost(
                "its database session ended while a batch was being queued; the batch's rows "
                "stay in the outbox for the slot's next owner"
            )

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


_OPEN = contextlib.nullcontext()


def produce(
    producer: KafkaProducer,
    rows: Sequence[Row],
    failures: dict[int, Any],
    acked: set[int] | None = None,
    placed: Placements | None = None,
    *,
    room_timeout: float,
    gate: Gate | None = None,
) -> None:
    """Queue every row; per-row errors land in ``failures``, the ids of successful delivery
    reports in ``acked`` and where they put each record in ``placed`` (when given).

    A full queue is waited on for at most ``room_timeout`` seconds per row (I12): past it, the
    row and the rest fail with ``_QUEUE_FULL``, a transient failure the batch is retried for.

    A row without headers passes None, not an empty list built per row. The report is a
    plain Python closure: confluent-kafka may call a delivery report while its own fatal
    error (a fenced producer) is pending, which a C-level callable such as
    ``functools.partial`` turns into a SystemError instead of the fencing.

    With a ``gate``, each record enters through it: once it is closed, ``SlotLost`` is
    raised and nothing more is queued."""

    def delivered(row_id: int) -> Callable[[Any, Any], None]:
        def cb(err: Any, msg: Any) -> None:
            if err is not None:
                failures[row_id] = err
                return
            if acked is not None:
                acked.add(row_id)
            if placed is not None:
                # A report may come without an offset (None: librdkafka had none, e.g. a
                # broker restarted mid-batch); the record then keeps the event unplaced.
                partition, offset = msg.partition(), msg.offset()
                if partition is not None and offset is not None and offset >= 0:
                    placed[row_id] = (partition, offset)

        return cb

    for n, row in enumerate(rows):
        deadline = None
        while True:
            try:
                with gate or _OPEN:
                    producer.produce(
                        row.topic,
                        value=row.value,
                        key=row.key,
                        headers=row.headers if row.header_names else None,
                        timestamp=row.created_ms,
                        on_delivery=delivered(row.id),
                    )
                break
            except BufferError:
                deadline = deadline or time.monotonic() + room_timeout
                if time.monotonic() < deadline:
                    with unmasked():
                        producer.poll(0.05)
                    continue
                full = KafkaError(
                    KafkaError._QUEUE_FULL,
                    f"the producer's queue stayed full for {room_timeout:.0f} s",
                    retriable=True,
                )
                log.warning("%s; its last %d rows fail with that", full.str(), len(rows) - n)
                failures.update(dict.fromkeys((r.id for r in rows[n:]), full))
                return
            except KafkaException as exc:
                failures[row.id] = exc.args[0]
                break
            except (TypeError, ValueError) as exc:  # arguments no record is built from
                failures[row.id] = KafkaError(KafkaError._INVALID_ARG, str(exc))
                break


def _retriable(exc: BaseException) -> bool:
    return isinstance(exc, KafkaException) and bool(exc.args[0].retriable())


def still_pending(slot: Slot, rows: list[Row], deleted: set[int]) -> list[Row]:
    """The rows a batch's DELETE found: one deleted by hand since it was claimed (or read
    ahead) is withdrawn, so it is not published."""
    if len(deleted) == len(rows):
        return rows
    log.info(
        "slot %d: %d claimed rows were deleted from the outbox before their batch; not published",
        slot.slot,
        len(rows) - len(deleted),
    )
    return [r for r in rows if r.id in deleted]


def missing_topics(producer: KafkaProducer | None, topics: set[str]) -> set[str]:
    """Topics the cluster's metadata says are missing or not writable: a delivery timeout
    for them is about the topic, not the network (auto-create off, or ACLs)."""
    missing: set[str] = set()
    if producer is None:
        return missing
    for topic in topics:
        try:
            md = producer.list_topics(topic, timeout=5)
        except KafkaException:
            continue  # the cluster is unreachable: a plain transient timeout
        meta = md.topics.get(topic)
        if meta is not None and meta.error is not None and classify(meta.error) is Verdict.TOPIC:
            missing.add(topic)
    return missing


class Publisher:
    """Publishes a slot's batches under one delivery guarantee."""

    recovers = False  # a new producer first deletes what the last owner's marker names (I4)

    def __init__(self, slot: Slot) -> None:
        self.slot = slot

    def settings(self, base: Mapping[str, Any]) -> dict[str, Any]:
        return dict(base)

    def start(self, producer: KafkaProducer) -> None:
        """Make a new producer ready to publish."""

    def publish(self, rows: list[Row]) -> None:
        raise NotImplementedError

    def session_lost(self) -> None:
        """The slot's database session ended while this worker runs (called from the
        heartbeat thread). A transactional producer is fenced by the next owner: nothing to do."""

    def _producer(self) -> KafkaProducer:
        producer = self.slot.producer
        assert producer is not None, "a batch is published with a started producer"
        return producer


class Unfenced(Publisher):
    """A publisher without transactions: nothing on the broker fences it once the slot's
    session ended, so it fences itself (``session_lost``)."""

    def __init__(self, slot: Slot) -> None:
        super().__init__(slot)
        self._gate = Gate()

    def session_lost(self) -> None:
        """Drop every record not yet acknowledged, at once, and let no more in. Nothing fences
        an idempotent producer: while the worker waited for its reports (up to
        delivery.timeout.ms, say through a broker outage), another relay could take the slot
        and send the same rows and the next ones, and this producer's records then landed
        among them, out of per-key order (I3). At-least-once rows stay in the outbox for the
        next owner (I2); at-most-once rows, deleted before they were sent, are lost, as a
        crash loses them."""
        self._gate.close(self._purge)

    def _purge(self) -> None:
        producer = self.slot.producer
        if producer is None:
            return
        log.warning(
            "slot %d: its database session ended, so another relay may own the slot now; "
            "the records not yet acknowledged are dropped from the producer",
            self.slot.slot,
        )
        with contextlib.suppress(KafkaException, RuntimeError):
            producer.purge(in_queue=True, in_flight=True, blocking=False)

    def _produce(self, rows: list[Row], failures: dict[int, Any], **reports: Any) -> None:
        """Queue the batch through the gate; a closed gate drops the producer, and the slot."""
        s = self.slot
        try:
            produce(
                self._producer(),
                rows,
                failures,
                room_timeout=s.plan.transaction_timeout,
                gate=self._gate,
                **reports,
            )
        except SlotLost:
            s.discard_producer()
            raise

    def _check_session(self, what: str) -> None:
        if self._gate.closed:
            self.slot.discard_producer()
            raise SlotLost(f"its database session ended while a batch was in flight; {what}")


class AtMostOnce(Unfenced):
    """Delete, then send: a record lost on the way is lost (asked for explicitly)."""

    def publish(self, rows: list[Row]) -> None:
        s = self.slot
        if self._gate.closed:
            raise SlotLost("its database session ended")
        rows = still_pending(s, rows, s.session.delete([r.id for r in rows]))
        self._produce(rows, {})
        with unmasked():
            self._producer().flush(s.plan.transaction_timeout)
        self._check_session("the batch's records not yet sent are dropped")
        s.count(published=len(rows), batches=1)


class AtLeastOnce(Unfenced):
    """Send the batch, then delete exactly the rows whose delivery report succeeded (I2)."""

    def publish(self, rows: list[Row]) -> None:
        s = self.slot
        if self._gate.closed:
            raise SlotLost("its database session ended")
        failures: dict[int, Any] = {}
        acked: set[int] = set()
        placed = s.placements()
        self._produce(rows, failures, acked=acked, placed=placed)
        complete = self._await_reports()
        self._check_session("the batch's rows stay in the outbox for the slot's next owner")
        moved, error = s.settle(rows, failures) if failures else (set(), None)
        acked -= failures.keys()
        done = settled(((r.id, r.topic) for r in rows), acked, moved)
        if done and placed is None:
            s.session.delete(done)
        elif done and placed is not None:
            with s.session.transaction():
                s.session.delete(done)
                deleted = set(done)
                s.session.record_deliveries([r for r in rows if r.id in deleted], placed)
        s.holds.succeeded({r.topic for r in rows if r.id in acked})
        s.count(published=len(done), batches=1)
        if not complete:  # handed over or stopping: unacknowledged rows stay for the next owner
            s.discard_producer()
        elif error is not None:
            raise error

    def _await_reports(self) -> bool:
        """Wait for every record's delivery report; False if the relay stops or hands the
        slot over first. librdkafka retries a record until delivery.timeout.ms, then
        reports it failed, so this ends; meanwhile one line per flush timeout says why."""
        s = self.slot
        started = last_said = time.monotonic()
        while True:
            with unmasked():
                unacked = self._producer().flush(0.5)
            if unacked <= 0:
                break
            if s.stopping() or self._gate.closed:
                return False
            now = time.monotonic()
            if now - last_said >= s.plan.transaction_timeout:
                last_said = now
                log.warning(
                    "slot %d: %d records not acknowledged after %.0f s; they stay in the "
                    "outbox while librdkafka retries them (until delivery.timeout.ms)",
                    s.slot,
                    unacked,
                    now - started,
                )
        return True


@dataclass
class _Batch:
    """One exactly-once batch on its way: what the broker said so far."""

    rows: list[Row]
    placed: Placements | None
    failures: dict[int, Any] = field(default_factory=dict)
    acked: set[int] = field(default_factory=set)
    unsent: int = 0
    ahead: list[Row] = field(default_factory=list)
    committed: bool = False
    drafted: Draft | None = None  # the record's row-only part, packed during the flush

    @property
    def failed(self) -> bool:
        return bool(self.failures or self.unsent)


class ExactlyOnce(Publisher):
    """One Kafka transaction per batch: the rows, then the slot's recovery marker (I4)."""

    recovers = True

    def __init__(self, slot: Slot) -> None:
        super().__init__(slot)
        # Whether the broker hides aborted transactions, so the marker may go out with the
        # records (abort_probe); learned with each producer, None until then.
        self.marker_with_records: bool | None = None

    def settings(self, base: Mapping[str, Any]) -> dict[str, Any]:
        return {**base, "transactional.id": self.slot.tid}

    def start(self, producer: KafkaProducer) -> None:
        """init_transactions fences the last owner of the transactional.id and aborts its open
        transaction (I4); waited for while it may pass."""
        s = self.slot
        while True:
            try:
                with unmasked():
                    producer.init_transactions(s.plan.transaction_timeout)
                break
            except KafkaException as exc:
                failure = plan_start_error(exc.args[0], stopping=s.stopping())
                if failure.act is not Act.RETRY:
                    raise s.failure_error(failure) from None
                log.warning("slot %d: %s; retrying", s.slot, failure.message)
        # Asked again for every producer (the answer is kept per cluster, so this is one
        # metadata request): a new producer may reach another cluster behind the same address.
        self.marker_with_records = None
        try:
            self.marker_with_records = s.probe_aborts(producer)
        except KafkaException as exc:
            s.discard_producer()
            raise TransientError(
                f"probing how the broker shows aborted transactions: {exc.args[0]}"
            ) from None

    def publish(self, rows: list[Row]) -> None:
        """The database transaction deletes the rows first: a database that refuses the
        delete (read-only, a revoked privilege, a trigger) refuses the batch before any
        record is sent. While the broker acknowledges the records, it claims the next
        batch in a backlog (which no longer sees these rows); it commits only after the
        Kafka transaction did, so a row leaves the outbox only once its record is
        committed (I2). Every way out of a batch that did not commit aborts its Kafka
        transaction first (I12): an open one would hold back every read_committed reader
        of its partitions, other producers' records included.
        """
        s = self.slot
        batch = _Batch(rows, s.placements())
        try:
            with s.session.transaction():
                batch.rows = still_pending(s, rows, s.session.delete([r.id for r in rows]))
                if not batch.rows:
                    return
                self._send(batch)
                if batch.failed:
                    raise BatchRollback  # noqa: TRY301 - the rows stay in the outbox
                self._commit(batch)
        except KafkaException as exc:
            raise self._transaction_failed(batch, exc.args[0]) from None
        except BaseException as exc:
            self._left(batch, exc)
            raise
        if batch.failed:
            error = self._rolled_back(batch)
            if error is not None:
                raise error
            return
        s.ahead = batch.ahead
        s.holds.succeeded({r.topic for r in batch.rows})
        s.count(published=len(batch.rows), batches=1)

    def _send(self, batch: _Batch) -> None:
        """Send the (deleted) rows in a new Kafka transaction, claim ahead, and wait for every
        delivery report."""
        s, producer = self.slot, self._producer()
        producer.begin_transaction()
        s.span.begin()
        produce(
            producer,
            batch.rows,
            batch.failures,
            batch.acked,
            batch.placed,
            room_timeout=s.plan.transaction_timeout,
        )
        if self.marker_with_records:  # aborts are hidden: no round trip after the flush
            self._produce_marker(batch.rows)
        if claim_ahead(len(batch.rows), s.config.batch_size, s.stopping()):
            batch.ahead = s.claim()
        if batch.placed is not None:  # the record is on: pack it while the broker works
            batch.drafted = s.session.draft_record(batch.rows)
        # Elsewhere the marker goes out only once every record of the batch is acknowledged:
        # on a broker that shows aborted transactions (Tansu), a marker can then never name a
        # row whose record is missing, so recovery cannot delete an unpublished row.
        with unmasked():
            batch.unsent = producer.flush(s.plan.transaction_timeout)

    def _commit(self, batch: _Batch) -> None:
        """Add the marker (unless it went out with the records), record where the batch
        went, and commit the Kafka transaction."""
        s, producer = self.slot, self._producer()
        if not self.marker_with_records:
            self._produce_marker(batch.rows)
        # An INSERT the database refuses raises before the commit: the batch is aborted.
        with s.session.recording(batch.rows, batch.placed, batch.drafted):
            self._commit_transaction(producer)
            batch.committed = True
            s.span.end()

    def _commit_transaction(self, producer: KafkaProducer) -> None:
        """Commit, trying again (librdkafka resumes the same commit) while a retriable error
        lasts, for at most COMMIT_ATTEMPTS tries within one transaction timeout (I12): a broker
        still settling another producer's transaction of this transactional.id (a fenced or
        timed-out owner: CONCURRENT_TRANSACTIONS, COORDINATOR_LOAD_IN_PROGRESS, timeouts) could
        otherwise hold the slot for ever. Past that, the last error fails the batch: its
        producer is dropped, the database transaction rolls back, and the next producer's
        init_transactions settles the commit, whose marker then tells recovery whether these
        rows went out (I2, I4)."""
        s = self.slot
        budget = s.plan.transaction_timeout
        started, tries = time.monotonic(), 0

        def left() -> float:
            return max(1.0, budget - (time.monotonic() - started))

        def say(state: RetryCallState) -> None:
            err = state.outcome.exception() if state.outcome else None
            log.warning(
                "slot %d: committing the Kafka transaction failed (%s); trying the commit "
                "again (attempt %d of %d, %.0f s of %.0f s left before the batch is given up)",
                s.slot,
                redact(str(err)),
                state.attempt_number + 1,
                COMMIT_ATTEMPTS,
                max(0.0, budget - (time.monotonic() - started)),
                budget,
            )

        bounded = stop_after_attempt(COMMIT_ATTEMPTS) | stop_after_delay(budget)
        try:
            for attempt in Retrying(
                retry=retry_if_exception(_retriable),
                stop=lambda state: s.stopping() or bounded(state),
                wait=retry_wait(first=0.1, cap=1.0),
                before_sleep=say,
                reraise=True,
            ):
                with attempt:
                    tries += 1
                    with unmasked():
                        producer.commit_transaction(left())
        except KafkaException as exc:
            if _retriable(exc) and not s.stopping():
                log.warning(
                    "slot %d: gave up committing the Kafka transaction after %d attempts in "
                    "%.0f s (%s); the batch stays in the outbox and is retried with a new "
                    "producer, whose init_transactions settles this commit",
                    s.slot,
                    tries,
                    time.monotonic() - started,
                    redact(str(exc.args[0])),
                )
            raise

    def _produce_marker(self, rows: list[Row]) -> None:
        s = self.slot
        marker = Marker.of_batch(
            s.outbox_id, s.tid, s.slot, s.config.slots, [(r.id, r.event_id) for r in rows]
        )
        producer, value = self._producer(), marker.encode()
        deadline = time.monotonic() + s.plan.transaction_timeout
        while True:
            try:
                producer.produce(
                    s.config.state_topic, key=s.tid.encode(), value=value, partition=s.slot
                )
                return
            except BufferError:
                # Sent with the records, the marker can find the producer's queue full of them
                # (a bounded queue.buffering.max.messages/kbytes): wait for room as they do,
                # within a transaction timeout; past it the batch is aborted and retried (I12).
                if time.monotonic() >= deadline:
                    raise TransientError(
                        f"slot {s.slot}: no room in the producer's queue for the recovery "
                        f"marker in {s.plan.transaction_timeout:.0f} s; the batch is retried"
                    ) from None
                with unmasked():
                    producer.poll(0.05)

    def _transaction_failed(self, batch: _Batch, err: Any) -> Exception:
        """The Kafka transaction failed: abort it if it must be, drop the producer either way
        (if its fate is unknown, the next one's init_transactions settles it and the marker
        tells whether these rows were committed), then plan what the failure means."""
        s = self.slot
        ended = fenced([err, *batch.failures.values()])  # the fencer ended the transaction
        if not batch.committed and err.txn_requires_abort() and not ended:
            s.abort_open()
        s.discard_producer()
        _, error = s.settle(batch.rows, batch.failures, batch_error=err)
        return error or TransientError(f"Kafka transaction failed: {err}")

    def _left(self, batch: _Batch, exc: BaseException) -> None:
        s = self.slot
        if batch.committed:
            # The Kafka transaction committed, only the delete did not: the marker names these
            # rows, so recovery deletes them before anything is published again (I4).
            s.needs_recovery = True
        else:
            # A lost slot's next owner fences this producer anyway: do not wait long.
            s.abort_open(5.0 if isinstance(exc, SlotLost) else None)

    def _rolled_back(self, batch: _Batch) -> Exception | None:
        """Records failed, so the database transaction rolled back: abort the Kafka one, and
        act on the failures (bury, hold, narrow). None: nothing is left to raise."""
        s = self.slot
        if fenced(batch.failures.values()):
            s.discard_producer()  # the fencing init_transactions ended the transaction
        else:
            self._abort()
        acked = batch.acked
        s.holds.succeeded(
            reached(((r.id, r.topic) for r in batch.rows), acked, batch.failures.keys())
        )
        if not batch.failures:
            return TransientError(f"{batch.unsent} records not acknowledged in time")
        _, error = s.settle(batch.rows, batch.failures)
        return error

    def _abort(self) -> None:
        s = self.slot
        s.count(aborts=1)
        try:
            with unmasked():
                self._producer().abort_transaction(s.plan.transaction_timeout)
            s.span.end()
        except KafkaException as exc:
            s.discard_producer()
            failure = plan_abort_error(exc.args[0])
            if failure.act is Act.FENCED:
                raise s.failure_error(failure) from None


def publisher_for(guarantee: Guarantee, slot: Slot) -> Publisher:
    """The publisher of ``guarantee``, chosen once per worker."""
    kinds: dict[Guarantee, type[Publisher]] = {
        Guarantee.EXACTLY_ONCE: ExactlyOnce,
        Guarantee.AT_LEAST_ONCE: AtLeastOnce,
        Guarantee.AT_MOST_ONCE: AtMostOnce,
    }
    return kinds[guarantee](slot)
