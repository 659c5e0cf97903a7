"""A slot worker: publishes one slot's shards, one batch at a time.

Each owned slot runs a ``SlotWorker`` thread with its own connection (which holds the slot's
advisory lock, so a dead connection frees the slot and aborts the worker's DB work at once) and
its own producer (transactional as ``<prefix>-<slot>`` for exactly-once, so a new owner fences a
zombie). It is handed a ``SlotContext``: what it uses of the process around it, not the
coordinator itself. It reaches Kafka and its database only through ``seams``; what a failure
means is planned by ``plans``; how a batch is sent is its guarantee's ``publishers`` class.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg
from confluent_kafka import KafkaError, KafkaException
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_random_exponential

from outbox.db import redact
from outbox.errors import ConfigError, DatabaseRefused, SlotLost, TransientError
from outbox.locks import GUARD_NAMESPACE, SLOT_NAMESPACE
from outbox.logs import librdkafka_logger
from outbox.partitioner import shards_of_slot
from outbox.relay.batching import jittered, poll_delay
from outbox.relay.classify import TopicHolds
from outbox.relay.config import ProducerPlan, RelayConfig
from outbox.relay.fences import (
    Fence,
    FenceAlarm,
    ForeignFence,
    Say,
    explain_fence,
    foreign_fence_message,
)
from outbox.relay.marker import MarkerReading
from outbox.relay.marker_reader import ReadMarker, read_past_a_stuck_offset
from outbox.relay.metrics import RelayMetrics
from outbox.relay.plans import (
    Act,
    BatchPlan,
    Failure,
    plan_batch,
    plan_producer_error,
    timed_out_topics,
)
from outbox.relay.publishers import (
    Placements,
    TransactionSpan,
    missing_topics,
    publisher_for,
)
from outbox.relay.rows import HEADER_ALLOWANCE, Row, record_defect
from outbox.relay.seams import KafkaProducer, Seams, SlotSession
from outbox.relay.sessions import heartbeat_interval
from outbox.relay.slot_session import delete_recovered
from outbox.relay.unmask import unmasked

log = logging.getLogger("outbox.relay")


@dataclass(slots=True)
class RelayStats:
    """Counters shared by the workers of one process (read by the demo and status)."""

    claimed: int = 0
    retries: int = 0
    published: int = 0
    batches: int = 0
    dead: int = 0
    recovered: int = 0
    aborts: int = 0
    fenced: int = 0
    foreign_fences: int = 0  # fenced while still holding the slot: from outside this database
    markers_ignored: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)


@dataclass(frozen=True)
class SlotContext:
    """What a slot worker uses of the process around it, handed to it by the coordinator.

    The worker sees these and nothing else of the ``Relay``: the stop signal, the shared
    counters and instruments, the producer plan, the outbox identity, the coordinator's
    marker reads and verdicts (one marker reader per process, I2), and the seams that make
    its producer and its database session.
    """

    config: RelayConfig
    plan: ProducerPlan
    outbox_id: uuid.UUID
    transactional_id: str
    stop: threading.Event  # the process is stopping
    listening: threading.Event  # a LISTEN session is up: NOTIFY wakes the slot
    stats: RelayStats
    metrics: RelayMetrics
    fence_alarm: FenceAlarm  # a foreign fence: a warning, an ERROR once it repeats
    # the offset of the slot's state partition below which no marker of its id can exist
    marker_floor: Callable[[int], int]
    records_deliveries: bool  # write the delivery record (outbox.relay.deliveries)
    read_marker: ReadMarker
    judge: Callable[[bytes, int, str, int], MarkerReading]
    refuse: Callable[[BaseException], None]  # a ConfigError: stop the relay, naming the fix
    done: Callable[[SlotWorker], None]  # the worker ended: the coordinator forgets it
    seams: Seams = field(default_factory=Seams)  # how the slot's producer and session are made


class SlotWorker(threading.Thread):
    """Publishes one slot's shards until told to stop or until the slot is lost."""

    def __init__(
        self,
        context: SlotContext,
        slot: int,
        conn: psycopg.Connection[dict[str, Any]],
    ) -> None:
        super().__init__(name=f"outbox-slot-{slot}", daemon=True)
        self.context = context
        self.config = context.config
        self.plan = context.plan
        self.outbox_id = context.outbox_id
        self.slot = slot
        self.conn = conn
        self.session: SlotSession = context.seams.session(conn)
        self.shards = shards_of_slot(slot, self.config.slots)
        self.wake = threading.Event()
        self.release = threading.Event()
        self.interrupt = threading.Event()
        self.failed = False  # ended by an unexpected error: the slot is retried after a pause
        self.drained = threading.Event()
        self.producer: KafkaProducer | None = None
        self.tid = context.transactional_id
        # The abort probe's clear answer for the current producer: aborted transactions are
        # shown to read_committed readers (Tansu). Recovery may then read past a stable
        # offset the broker never moves (marker_reader.HeldBack).
        self.aborts_shown = False
        self.aborts_unclear = False  # the probe gave no clear answer: asked again if held back
        self._ask_probe = functools.partial(
            context.seams.aborts_hidden,
            connection=self.plan.connection,
            topic=self.config.state_topic,
            partition=slot,
            key=self.tid.encode(),
            timeout=min(10.0, self.plan.transaction_timeout),
            remember_as=self.plan.settings.get("bootstrap.servers"),
        )
        self.probe_aborts: Callable[[KafkaProducer], bool] = self._probe_aborts
        self.publisher = publisher_for(self.config.guarantee, self)  # one per guarantee
        self.span = TransactionSpan()  # the open (or last) Kafka transaction's span
        self.needs_recovery = self.publisher.recovers
        # The next batch, claimed while the last one was in flight; kept only if that one
        # committed, so a failed batch is claimed afresh, ahead of it, in id order (I3).
        self.ahead: list[Row] = []
        # Missing or unwritable topics, left out of claims for a bounded time.
        self.holds = TopicHolds(self.config.missing_topic_timeout)
        # After a request-wide refusal: rows go one per batch up to this id, so only the
        # row at fault is buried, and in id order (I3, I6).
        self._narrow_until: int | None = None
        self._fatal: Any = None  # a fatal error librdkafka reported through error_cb
        self._ended = threading.Event()  # the worker is closing: its heartbeat stops

    # -- lifecycle -------------------------------------------------------------

    def run(self) -> None:
        threading.Thread(
            target=self._heartbeat, name=f"outbox-slot-{self.slot}-heartbeat", daemon=True
        ).start()
        try:
            self._run()
        except ForeignFence as exc:
            say, held = self.context.fence_alarm.admit(self.slot, time.monotonic())
            if say is Say.ERROR:
                more = f" ({held} more since the last one)" if held else ""
                log.error("%s%s", exc, more, extra={"slot": self.slot})
            elif say is Say.WARNING:
                log.warning(
                    "slot %d lost: fenced on transactional.id %s while this relay still held "
                    "the slot's lock; if this repeats, another database relays with this "
                    "outbox's identity (an ERROR then says so)",
                    self.slot,
                    self.tid,
                )
            else:
                log.debug("slot %d lost: %s", self.slot, exc)
        except SlotLost as exc:
            log.warning("slot %d lost: %s", self.slot, exc)
            # Found by a statement before the heartbeat did: what a producer without fencing
            # still holds must not go out at the close's flush, beside the next owner's (I3).
            self.publisher.session_lost()
        except ConfigError as exc:  # no retry can help: stop the relay, naming the fix (I8)
            self.context.refuse(exc)
        except Exception:
            self.failed = True
            log.exception("slot %d worker failed; the slot is released and retried", self.slot)
        finally:
            self._close()

    def stopping(self) -> bool:
        return self.context.stop.is_set() or self.release.is_set()

    def _run(self) -> None:
        log.info("slot %d: publishing shards %s as %s", self.slot, self.shards, self.tid)
        empty_polls = 0  # claims in a row that found nothing
        while not self.stopping():
            if self._retrying(self._step):
                self.drained.clear()
                empty_polls = 0
                continue
            next_try = self.holds.next_try(time.monotonic())
            if self.config.once and next_try is not None:
                # --once drains held topics too: wait for their next try (or burial).
                self.wake.wait(max(0.0, next_try - time.monotonic()))
                continue
            self.drained.set()
            if self.config.once:
                return
            delay = poll_delay(
                empty_polls, self.config.poll_interval, listening=self.context.listening.is_set()
            )
            self.wake.wait(jittered(delay))
            self.wake.clear()
            empty_polls += 1

    def _step(self) -> bool:
        """Claim and publish one batch; False when there was nothing to do.

        A failed batch is claimed afresh on retry, so rows committed meanwhile join it.
        """
        if self._fatal is not None:
            fatal, self._fatal = self._fatal, None
            failure = plan_producer_error(fatal, tid=self.tid)
            self.discard_producer()
            if failure.act is Act.FENCED:
                raise self.failure_error(failure)
            log.warning("slot %d: %s", self.slot, failure.message)
        if self.producer is None:
            self._start_producer()
            self.needs_recovery = self.publisher.recovers
        if self.needs_recovery:
            self._recover()
            self.needs_recovery = False
        started = time.perf_counter()
        rows, self.ahead = self.ahead or self.claim(), []
        if rows:
            narrowing = self._narrow_until
            self._publish(rows)
            if narrowing is not None and rows[-1].id >= narrowing:
                self._narrow_until = None  # past the rows of the refused request
            self.context.metrics.batch_size.observe(len(rows))
            self.context.metrics.batch_seconds.observe(time.perf_counter() - started)
            log.debug(
                "slot %d: published outbox ids %d..%d (events %s..%s)",
                self.slot,
                rows[0].id,
                rows[-1].id,
                rows[0].event_id,
                rows[-1].event_id,
                extra={"slot": self.slot, "batch": f"{self.tid}:{rows[0].id}-{rows[-1].id}"},
            )
        return bool(rows)

    def _retrying(self, fn: Callable[[], Any]) -> Any:
        """Transient failures are retried with capped, jittered backoff until they pass, or
        until the relay stops or hands the slot over: then at once, without another try."""
        try:
            for attempt in Retrying(
                retry=retry_if_exception_type(TransientError),
                wait=wait_random_exponential(multiplier=0.1, max=30),
                sleep=self._backoff,
                before_sleep=self._log_retry,
                stop=lambda rs: self.stopping(),
                reraise=True,
            ):
                with attempt:
                    return fn()
        except TransientError:
            if not self.stopping():
                raise
        return None

    def _backoff(self, seconds: float) -> None:
        self.interrupt.wait(seconds)  # cut short by a stop or a hand-over

    def hand_over(self) -> None:
        """Finish the batch in hand, then give the slot back (rebalancing)."""
        self.release.set()
        self.interrupt.set()
        self.wake.set()

    def _log_retry(self, state: RetryCallState) -> None:
        self.count(retries=1)
        log.warning(
            "slot %d: %s; retrying (attempt %d)",
            self.slot,
            state.outcome.exception() if state.outcome else "?",
            state.attempt_number,
        )

    def _heartbeat(self) -> None:
        """Speak on the slot's connection a few times per --takeover-timeout, so the server
        ends the session (freeing the slot) only when this relay stopped answering: frozen
        or cut off, not merely waiting on Kafka, a backoff or a poll (I12). psycopg runs it
        between the worker's statements (inside its transaction, if one is open)."""
        interval = heartbeat_interval(self.config.takeover_timeout)
        due = time.monotonic() + interval
        while not self._ended.is_set():
            # Between beats, listen: a restarted server or a terminated backend says so on
            # the idle connection at once, and the slot's lock is gone that instant (I3).
            spoke = self.session.wait_for_news(max(0.0, due - time.monotonic()))
            if self._ended.is_set():
                return
            if not spoke:
                if time.monotonic() < due:
                    continue
                due = time.monotonic() + interval
            if not self.session.heartbeat():
                # The connection is gone, and the slot's lock with it: another relay may own
                # the slot already (a restarted server, a terminated backend). The worker
                # finds out at its next statement; a publisher without transactions (no
                # fencing on the broker) must not send this batch's records beside the new
                # owner's meanwhile (I3).
                if not self._ended.is_set():
                    self.publisher.session_lost()
                return

    def _close(self) -> None:
        self._ended.set()
        try:  # a worker ending mid-batch leaves no Kafka transaction open (I12)
            self.abort_open(5.0)
        except Exception:
            log.debug("slot %d: abort on close failed", self.slot, exc_info=True)
        if self.producer is not None:
            try:
                self.producer.flush(5)
            except Exception:
                log.debug("slot %d: flush on close failed", self.slot, exc_info=True)
            self.producer = None
        self.session.release(self.slot)
        self.context.done(self)

    def count(self, **counts: int) -> None:
        self.context.stats.add(**counts)

    # -- Kafka -----------------------------------------------------------------

    def _start_producer(self) -> None:
        settings = self.publisher.settings(self.plan.settings)
        settings["error_cb"] = self._on_error
        settings["logger"] = librdkafka_logger()
        self.producer = self.context.seams.producer(settings)
        self.publisher.start(self.producer)

    def _on_error(self, err: KafkaError) -> None:
        """librdkafka's client-wide errors: logged once per repeat window; a fatal one
        retires the producer before the next batch."""
        if err.fatal():
            self._fatal = err
        librdkafka_logger().warning("slot %d: kafka: %s", self.slot, redact(str(err)))

    def _probe_aborts(self, producer: KafkaProducer) -> bool:
        """Whether the marker may go out with the records (the probe's answer, None: no)."""
        self.aborts_shown = self.aborts_unclear = False
        hidden = self._ask_probe(producer)
        self.aborts_shown, self.aborts_unclear = hidden is False, hidden is None
        return bool(hidden)

    def _ask_again(self, producer: KafkaProducer) -> None:
        """Recovery is held back and the producer's probe gave no clear answer, which the
        cluster's kept answer would repeat for minutes (``abort_probe.UNSURE_FOR``): probe the
        broker itself. The marker's order stays the safe one, whatever it says."""
        hidden = self._ask_probe(producer, remember_as=None)
        self.aborts_shown, self.aborts_unclear = hidden is False, hidden is None

    def _recover(self) -> None:
        """Delete rows the previous owner published but did not get to delete (I4), if
        the slot's last marker is this outbox's and names those very events (I9)."""
        try:
            raw = self._read_marker()
        except KafkaException as exc:
            reason = redact(str(exc.args[0]))
            raise TransientError(f"reading the recovery marker: {reason}") from None
        except TransientError:
            if self.stopping():  # never publish before recovery: the next owner does it
                raise SlotLost("released before its recovery marker was read") from None
            raise
        if raw is None:
            log.debug("slot %d: no recovery marker under %s", self.slot, self.tid)
            return
        reading = self.context.judge(raw, self.slot, self.tid, self.config.slots)
        if reading.marker is None:
            return
        ids = reading.marker.ids
        log.debug(
            "slot %d: the last marker under %s names %d events (outbox ids %d..%d)",
            self.slot,
            self.tid,
            len(ids),
            min(ids, default=0),
            max(ids, default=0),
        )
        deleted = self.session.recover(
            reading.marker, self.shards, record=self.context.records_deliveries
        )
        if deleted:
            log.warning(
                "slot %d: %d rows of the last committed Kafka transaction were still in the "
                "outbox; deleted them instead of publishing again",
                self.slot,
                deleted,
            )
            self.count(recovered=deleted)

    def _read_marker(self) -> bytes | None:
        """The slot's last marker from its floor, past a stable offset the broker never moves
        where this producer's probe said aborts are shown (``read_past_a_stuck_offset``)."""
        return read_past_a_stuck_offset(
            self.context.read_marker,
            self.slot,
            self.tid,
            self.interrupt,
            self._aborts_shown_now,
            since=self.context.marker_floor(self.slot),
        )

    def _aborts_shown_now(self) -> bool:
        """The probe's answer for this producer; an unclear one, which the cluster's kept
        answer would repeat for minutes, is asked of the broker itself once more."""
        if self.aborts_unclear and self.producer is not None:
            self._ask_again(self.producer)
        return self.aborts_shown

    def abort_open(self, timeout: float | None = None) -> None:
        """Abort the batch's Kafka transaction, if one is open, on the way out of a batch that
        did not commit (I12). A producer that cannot abort is dropped: the next one's
        init_transactions aborts it, and the broker does at transaction.timeout.ms."""
        if self.producer is None or not self.span.open:
            return
        self.count(aborts=1)
        try:
            with unmasked():
                self.producer.abort_transaction(timeout or self.plan.transaction_timeout)
            self.span.end()
        except KafkaException as exc:
            log.debug("slot %d: abort failed (%s); dropping the producer", self.slot, exc)
            self.discard_producer()

    def discard_producer(self) -> None:
        self.span.end()  # its transaction goes with it
        producer, self.producer = self.producer, None
        if producer is not None:
            with contextlib.suppress(KafkaException, RuntimeError):
                producer.purge(in_queue=True, in_flight=True, blocking=False)

    # -- database --------------------------------------------------------------

    def claim(self) -> list[Row]:
        rows = self.session.claim(
            self.shards,
            limit=1 if self._narrow_until is not None else self.config.batch_size,
            held=self.holds.held(time.monotonic()),
            max_value_bytes=self.plan.message_max_bytes,
            max_bytes=self.config.batch_bytes,
        )
        self.count(claimed=len(rows))
        return rows

    def placements(self) -> Placements | None:
        """A batch's placements, filled by its delivery reports, when the delivery record is
        kept (None otherwise)."""
        return {} if self.context.records_deliveries else None

    def _bury(self, row: Row, error: str) -> None:
        """Move a poison row aside so its shard moves on (I6)."""
        log.error(
            "slot %d: event %s (outbox id %d, topic %r) is poison: %s; moved to outbox_dead_events",
            self.slot,
            row.event_id,
            row.id,
            row.topic,
            error,
        )
        self.session.bury(row.id, error)
        self.count(dead=1)

    # -- one batch -------------------------------------------------------------

    def _publish(self, rows: list[Row]) -> None:
        """Bury the rows no record can be made of, and hand the rest to the publisher."""
        limit = self.plan.message_max_bytes
        sendable = []
        for row in rows:
            if defect := record_defect(row):
                self._bury(row, f"no Kafka record can be built from this row: {defect}")
            elif row.left_out or (row.may_exceed(limit) and row.size > limit):
                self._bury(row, f"record of {row.size} bytes exceeds message.max.bytes={limit}")
            else:
                sendable.append(row)
        if sendable:
            self.publisher.publish(sendable)

    def settle(
        self, rows: list[Row], failures: Mapping[int, Any], batch_error: Any = None
    ) -> tuple[set[int], Exception | None]:
        """Plan what a batch's failures mean (``plans.plan_batch``) and carry the plan out;
        returns the ids moved to the dead table and the error to raise once the caller has
        settled the rest."""
        pairs = [(r.id, r.topic) for r in rows]
        timed_out = timed_out_topics(pairs, failures)
        missing = missing_topics(self.producer, timed_out) if timed_out else set()
        now = time.monotonic()
        failing = {r.topic for r in rows if r.id in failures}
        plan = plan_batch(
            pairs,
            failures,
            missing=missing,
            expired={t for t in failing if self.holds.due(t, now)},
            hold_timeout=self.config.missing_topic_timeout,
            batch_error=batch_error,
            tid=self.tid,
        )
        return self._execute(plan, rows, now)

    def _execute(
        self, plan: BatchPlan, rows: list[Row], now: float
    ) -> tuple[set[int], Exception | None]:
        if plan.drops_producer:
            self.discard_producer()
        for topic in plan.released:
            self.holds.failed(topic, now)
        for hold in plan.hold:
            self.holds.failed(hold.topic, now)
            log.warning(
                "slot %d: topic %r is missing or not writable (%s); holding its rows back "
                "for up to --missing-topic-timeout=%gs while the other topics flow",
                self.slot,
                hold.topic,
                hold.error,
                self.config.missing_topic_timeout,
            )
        by_id = {r.id: r for r in rows}
        for row_id, reason in plan.bury.items():
            self._bury(by_id[row_id], reason)
        if plan.narrow is not None:
            self._narrow_until = plan.narrow.until
            log.warning(
                "slot %d: the broker refused a request of %d rows (%s); sending rows one by "
                "one up to outbox id %d to find the one at fault",
                self.slot,
                plan.narrow.refused,
                plan.narrow.error,
                plan.narrow.until,
            )
        error = self.failure_error(plan.failure) if plan.failure is not None else None
        return set(plan.bury), error

    def failure_error(self, failure: Failure) -> Exception:
        """The exception that carries a planned failure out of the batch."""
        if failure.act is Act.FENCED:
            return self._fenced(failure.message)
        if failure.act is Act.REFUSE:
            return ConfigError(failure.message)
        if failure.act is Act.GIVE_UP:
            return SlotLost(failure.message)
        return TransientError(failure.message)

    def _fenced(self, detail: str) -> SlotLost:
        """Count a fence and say who fenced: a relay of this database (a takeover, a slot-count
        change) or, while this connection still holds the slot, something outside it (I9)."""
        self.count(fenced=1)
        age = self.span.age()
        limit = self.plan.transaction_timeout
        fence = explain_fence(
            self.session.lock_state(self.slot, self.config.slots),
            transaction_age=age,
            transaction_timeout=limit,
        )
        if fence is Fence.TIMEOUT:
            return SlotLost(
                f"{detail}: the broker aborted a Kafka transaction open for {age or 0:.0f} s "
                f"(transaction.timeout.ms is {limit:.0f} s); its rows stay in the outbox"
            )
        if fence is Fence.FOREIGN:
            self.count(foreign_fences=1)
            return ForeignFence(
                foreign_fence_message(
                    slot=self.slot,
                    tid=self.tid,
                    outbox_id=self.outbox_id,
                    explicit_prefix=self.config.transactional_id_prefix,
                )
            )
        if fence is Fence.LAYOUT:
            return SlotLost(f"{detail} (a relay of this database is changing the slot count)")
        return SlotLost(detail)


__all__ = [
    "GUARD_NAMESPACE",
    "HEADER_ALLOWANCE",
    "SLOT_NAMESPACE",
    "DatabaseRefused",
    "RelayStats",
    "Row",
    "SlotContext",
    "SlotWorker",
    "delete_recovered",
    "record_defect",
]
