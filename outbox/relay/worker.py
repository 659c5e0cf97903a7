"""A slot worker: publishes one slot's shards, one Kafka transaction per batch.

Each owned slot runs a ``SlotWorker`` thread with its own connection (which holds the slot's
advisory lock, so a dead connection frees the slot and aborts the worker's DB work at once) and
its own transactional producer (``<prefix>-<slot>``, so a new owner fences a zombie). It is handed
a ``SlotContext``: what it uses of the process around it, not the coordinator itself.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import psycopg
from confluent_kafka import KafkaError, KafkaException, Producer
from psycopg.rows import tuple_row
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_random_exponential

from outbox import sql
from outbox.codec import record_size
from outbox.db import redact
from outbox.errors import ConfigError, SlotLost, TransientError
from outbox.logs import librdkafka_logger
from outbox.partitioner import shards_of_slot
from outbox.relay import deliveries
from outbox.relay.abort_probe import aborts_hidden
from outbox.relay.batching import claim_ahead, jittered, poll_delay
from outbox.relay.classify import TopicHolds, Verdict, classify, config_fix, reached, settled
from outbox.relay.config import Guarantee, ProducerPlan, RelayConfig
from outbox.relay.fences import (
    Fence,
    FenceAlarm,
    ForeignFence,
    Say,
    SlotLockState,
    explain_fence,
    foreign_fence_message,
)
from outbox.relay.marker import Marker, MarkerReading, recoverable
from outbox.relay.metrics import RelayMetrics
from outbox.relay.sessions import heartbeat_interval

log = logging.getLogger("outbox.relay")

HEADER_ALLOWANCE = 16 * 1024
"""Rows whose key + value come within this of message.max.bytes get the exact size check."""
SLOT_NAMESPACE = 0x6F757462  # 'outb': advisory lock class for slots
GUARD_NAMESPACE = 0x6F757464  # 'outd': serialises the slot-count check, announcement, settling


class DatabaseRefused(TransientError):
    """The database refused a statement on a live session (read-only, a revoked privilege, a
    trigger that raises): retried with backoff, the slot kept (I12)."""


class Row(NamedTuple):
    """One claimed outbox row, in CLAIM_BATCH's column order.

    A tuple built by ``Row._make`` (C speed) rather than a dataclass: one is
    made for every relayed row, and a frozen dataclass's ``__init__`` cost
    ~1.5 µs of the relay's ~11 µs of CPU per event.
    """

    id: int
    event_id: Any
    topic: str
    key: bytes | None
    value: bytes | None
    header_names: list[str]
    header_values: list[bytes]
    created_ms: int  # the record's timestamp: when the event was written
    value_bytes: int  # octet_length(value): known even when the claim left a huge value out

    @property
    def headers(self) -> list[tuple[str, bytes]]:
        return list(zip(self.header_names, self.header_values, strict=True))

    @property
    def size(self) -> int:
        """What librdkafka compares with message.max.bytes."""
        return record_size(self.key, None, self.headers) + self.value_bytes

    @property
    def left_out(self) -> bool:
        """The claim did not load the value: it is above message.max.bytes on its own."""
        return self.value is None and self.value_bytes > 0

    def may_exceed(self, limit: int) -> bool:
        """Cheap pre-check: only rows near the limit pay for the exact size."""
        return self.value_bytes + len(self.key or b"") + HEADER_ALLOWANCE > limit


def record_defect(row: Row) -> str | None:
    """Why no Kafka record can be built from ``row``, or None. Such a row is poison (I6):
    ``publish()`` never writes one, but another writer (a SQL backfill, another service, a
    table from before its constraints) can."""
    names, values = row.header_names, row.header_values
    if names is None or values is None:
        return "header_names or header_values is NULL"
    if len(names) != len(values):
        return f"header_names has {len(names)} entries but header_values {len(values)}"
    for i, name in enumerate(names, 1):  # positions as SQL counts them
        if name is None:
            return f"header_names[{i}] is NULL"
        if not isinstance(name, str):
            return f"header_names[{i}] is not text (a multidimensional array?)"
    for i, value in enumerate(values, 1):
        if value is not None and not isinstance(value, bytes):
            return f"header_values[{i}] is not bytea (a multidimensional array?)"
    return None


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
    counters and instruments, the producer plan, the outbox identity, and the coordinator's
    marker reads and verdicts (one marker reader per process, I2).
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
    first_run: Callable[[], bool]  # no marker can exist but those this process writes
    records_deliveries: bool  # write the delivery record (outbox.relay.deliveries)
    wrote_marker: set[int]  # slots this process has written a marker for
    read_marker: Callable[[int, str, threading.Event], bytes | None]
    judge: Callable[[bytes, int, str, int], MarkerReading]
    refuse: Callable[[BaseException], None]  # a ConfigError: stop the relay, naming the fix
    done: Callable[[SlotWorker], None]  # the worker ended: the coordinator forgets it


def delete_recovered(
    conn: psycopg.Connection[dict[str, Any]],
    marker: Marker,
    shards: list[int],
    *,
    record: bool = False,
) -> int:
    """Delete the rows that are the marker's very events, among ``shards`` (in a transaction):
    their Kafka transaction committed, only their delete was lost (I4). Nothing else (I9).
    With ``record``, the delivery record gets them too, without partition and offset."""
    found = conn.execute(
        sql.RECOVERY_CANDIDATES, {"ids": list(marker.ids), "shards": shards}
    ).fetchall()
    doomed = recoverable(marker, [(r["id"], r["event_id"]) for r in found])
    if not doomed:
        return 0
    cur = conn.execute(
        sql.DELETE_RECOVERED_AND_RECORD if record else sql.DELETE_RECOVERED,
        {"ids": [i for i, _ in doomed], "event_ids": [e for _, e in doomed]},
    )
    return cur.rowcount


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
        self.slot = slot
        self.conn = conn
        self.shards = shards_of_slot(slot, self.config.slots)
        self.claim_statement = sql.claim_batch(self.shards)
        self.wake = threading.Event()
        self.release = threading.Event()
        self.interrupt = threading.Event()
        self.failed = False  # ended by an unexpected error: the slot is retried after a pause
        self.drained = threading.Event()
        self.producer: Any = None
        self.tid = context.transactional_id
        self.transactional = self.config.guarantee is Guarantee.EXACTLY_ONCE
        self._txn_begun: float | None = None  # the open (or last) Kafka transaction's span
        self._txn_ended: float | None = None
        self._needs_recovery = self.transactional
        # The next batch, claimed while the last one was in flight; kept only if that one
        # committed, so a failed batch is claimed afresh, ahead of it, in id order (I3).
        self._ahead: list[Row] = []
        # Missing or unwritable topics, left out of claims for a bounded time.
        self.holds = TopicHolds(self.config.missing_topic_timeout)
        # After a request-wide refusal: rows go one per batch up to this id, so only the
        # row at fault is buried, and in id order (I3, I6).
        self._narrow_until: int | None = None
        self._fatal: Any = None  # a fatal error librdkafka reported through error_cb
        self._ended = threading.Event()  # the worker is closing: its heartbeat stops
        self._placed: dict[int, tuple[int, int]] | None = None  # the batch's delivery places
        # The broker hides aborted transactions: the marker goes out with the records
        # (abort_probe; learned with the first producer, None: not yet known).
        self._marker_with_records: bool | None = None

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
        except ConfigError as exc:  # no retry can help: stop the relay, naming the fix (I8)
            self.context.refuse(exc)
        except Exception:
            self.failed = True
            log.exception("slot %d worker failed; the slot is released and retried", self.slot)
        finally:
            self._close()

    def _stopping(self) -> bool:
        return self.context.stop.is_set() or self.release.is_set()

    def _run(self) -> None:
        log.info("slot %d: publishing shards %s as %s", self.slot, self.shards, self.tid)
        empty_polls = 0  # claims in a row that found nothing
        while not self._stopping():
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
        if self._fatal is not None and classify(self._fatal) is Verdict.FENCED:
            fatal, self._fatal = self._fatal, None
            self._discard_producer()
            raise self._fenced(f"fenced: another relay took transactional.id {self.tid} ({fatal})")
        if self._fatal is not None:
            log.warning("slot %d: producer failed (%s); building a new one", self.slot, self._fatal)
            self._fatal = None
            self._discard_producer()
        if self.producer is None:
            self._start_producer()
            self._needs_recovery = self.transactional
            if self.transactional and self._marker_with_records is None:
                self._probe_aborts()
        if self._needs_recovery:
            self._recover()
            self._needs_recovery = False
        started = time.perf_counter()
        rows, self._ahead = self._ahead or self._claim(), []
        if rows:
            narrowing = self._narrow_until
            self._publish(rows)
            if narrowing is not None and rows[-1].id >= narrowing:
                self._narrow_until = None  # past the rows of the refused request
            self.context.metrics.batch_size.observe(len(rows))
            self.context.metrics.batch_seconds.observe(time.perf_counter() - started)
            log.debug(
                "slot %d: published outbox ids %d..%d",
                self.slot,
                rows[0].id,
                rows[-1].id,
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
                stop=lambda rs: self._stopping(),
                reraise=True,
            ):
                with attempt:
                    return fn()
        except TransientError:
            if not self._stopping():
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
        self.context.stats.add(retries=1)
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
        while not self._ended.wait(interval):
            try:
                self.conn.execute(sql.HEARTBEAT)
            except psycopg.Error:
                if self.conn.closed or self.conn.broken:
                    return  # the worker finds out at its next statement

    def _close(self) -> None:
        self._ended.set()
        with contextlib.suppress(Exception):  # a worker ending mid-batch leaves none open (I12)
            self._abort_open(5.0)
        if self.producer is not None:
            try:
                self.producer.flush(5)
            except Exception:
                log.debug("slot %d: flush on close failed", self.slot, exc_info=True)
            self.producer = None
        try:
            if not self.conn.closed:
                self.conn.execute(sql.UNLOCK_SLOT, {"namespace": SLOT_NAMESPACE, "slot": self.slot})
                self.conn.close()
        except psycopg.Error:
            pass
        self.context.done(self)

    # -- Kafka -----------------------------------------------------------------

    def _start_producer(self) -> None:
        settings: dict[str, Any] = dict(self.context.plan.settings)
        if self.transactional:
            settings["transactional.id"] = self.tid
        settings["error_cb"] = self._on_error
        settings["logger"] = librdkafka_logger()
        self.producer = Producer(settings)
        if self.transactional:
            # Fences the previous owner of this transactional.id, aborts its open transaction (I4).
            while True:
                try:
                    self.producer.init_transactions(self.context.plan.transaction_timeout)
                    return
                except KafkaException as exc:
                    err = exc.args[0]
                    if classify(err) is Verdict.CONFIG:
                        raise ConfigError(f"init_transactions: {config_fix(err)}") from None
                    if self._stopping() or not (
                        err.retriable() or err.code() == KafkaError._TIMED_OUT
                    ):
                        raise SlotLost(f"init_transactions failed: {err}") from None
                    log.warning("slot %d: init_transactions: %s; retrying", self.slot, err)

    def _probe_aborts(self) -> None:
        try:
            self._marker_with_records = aborts_hidden(
                self.producer,
                self.context.plan.connection,
                self.config.state_topic,
                self.slot,
                self.tid.encode(),
                timeout=min(10.0, self.context.plan.transaction_timeout),
                remember_as=self.context.plan.settings.get("bootstrap.servers"),
            )
        except KafkaException as exc:
            self._discard_producer()
            raise TransientError(f"probing how the broker shows aborts: {exc.args[0]}") from None

    def _on_error(self, err: KafkaError) -> None:
        """librdkafka's client-wide errors: logged once per repeat window; a fatal one
        retires the producer before the next batch."""
        if err.fatal():
            self._fatal = err
        librdkafka_logger().warning("slot %d: kafka: %s", self.slot, redact(str(err)))

    def _recover(self) -> None:
        """Delete rows the previous owner published but did not get to delete (I4), if
        the slot's last marker is this outbox's and names those very events (I9)."""
        if self.context.first_run() and self.slot not in self.context.wrote_marker:
            return
        try:
            raw = self.context.read_marker(self.slot, self.tid, self.interrupt)
        except KafkaException as exc:
            raise TransientError(f"reading the recovery marker: {exc.args[0]}") from None
        except TransientError:
            if self._stopping():  # never publish before recovery: the next owner does it
                raise SlotLost("released before its recovery marker was read") from None
            raise
        if raw is None:
            return
        reading = self.context.judge(raw, self.slot, self.tid, self.config.slots)
        if reading.marker is None:
            return
        with self._connection_held(), self.conn.transaction():
            deleted = delete_recovered(
                self.conn,
                reading.marker,
                self.shards,
                record=self.context.records_deliveries,
            )
        if deleted:
            log.warning(
                "slot %d: %d rows of the last committed Kafka transaction were still in the "
                "outbox; deleted them instead of publishing again",
                self.slot,
                deleted,
            )
            self.context.stats.add(recovered=deleted)

    # -- database --------------------------------------------------------------

    @contextlib.contextmanager
    def _connection_held(self) -> Iterator[None]:
        """Database work on the slot's connection: if the connection is lost, so is the slot
        (its advisory lock and any open transaction went with it)."""
        try:
            yield
        except psycopg.OperationalError as exc:
            raise SlotLost(f"database connection lost: {redact(str(exc))}") from None
        except psycopg.Error as exc:
            # A server that ends the session says why in an error of another class (an
            # idle-in-transaction timeout is an InternalError): the connection is gone all
            # the same.
            if self.conn.closed or self.conn.broken:
                raise SlotLost(f"database connection lost: {redact(str(exc))}") from None
            reason = " ".join(str(exc.diag.message_primary or exc).split())
            raise DatabaseRefused(
                f"the database refused the slot's work ({type(exc).__name__}: "
                f"{redact(reason, 300)})"
            ) from None

    def _claim(self) -> list[Row]:
        params = sql.claim_params(
            limit=1 if self._narrow_until is not None else self.config.batch_size,
            held=self.holds.held(time.monotonic()),
            max_value_bytes=self.context.plan.message_max_bytes,
            max_bytes=self.config.batch_bytes,
        )
        # Binary: bytea arrives as bytes, not hex text to decode for every row.
        with self._connection_held(), self.conn.cursor(row_factory=tuple_row, binary=True) as cur:
            cur.execute(self.claim_statement, params, prepare=True)
            rows = list(map(Row._make, cur.fetchall()))
        self.context.stats.add(claimed=len(rows))
        return rows

    def _placements(self) -> dict[int, tuple[int, int]] | None:
        """A batch's placements: where delivery reports put each record, when the delivery
        record is kept (None otherwise)."""
        self._placed = {} if self.context.records_deliveries else None
        return self._placed

    def _record_deliveries(
        self, rows: list[Row], placed: dict[int, tuple[int, int]] | None
    ) -> None:
        """Record where the batch went, in the transaction that deletes it: one statement."""
        if placed is None or not rows:
            return
        with self._connection_held():
            self.conn.execute(
                sql.RECORD_DELIVERIES, deliveries.batch_params(rows, placed), prepare=True
            )

    def _delete_rows(self, ids: list[int]) -> None:
        with self._connection_held():
            self.conn.execute(sql.DELETE_EVENTS, {"ids": ids}, prepare=True)

    @contextlib.contextmanager
    def _db_transaction(self) -> Iterator[None]:
        """A transaction on the slot's connection (``psycopg.Rollback`` ends it quietly).

        A connection lost at the COMMIT after a Kafka commit loses the slot; the next
        owner's recovery deletes the rows (I4). psycopg lets ``Rollback`` out only when the
        rollback itself failed: the connection is gone, and so is the slot.
        """
        with self._connection_held():
            try:
                with self.conn.transaction():
                    yield
            except psycopg.Rollback:
                raise SlotLost("database connection lost while rolling a batch back") from None

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
        with self._connection_held(), self.conn.transaction():
            # A dead row of an older table (ids repeat after TRUNCATE ... RESTART IDENTITY)
            # gives its id up to this one, which keeps its order for a re-queue.
            self.conn.execute(sql.FREE_DEAD_ID, {"id": row.id})
            self.conn.execute(sql.MOVE_TO_DEAD, {"id": row.id, "error": error})
        self.context.stats.add(dead=1)

    # -- one batch -------------------------------------------------------------

    def _publish(self, rows: list[Row]) -> None:
        limit = self.context.plan.message_max_bytes
        sendable = []
        for row in rows:
            if defect := record_defect(row):
                self._bury(row, f"no Kafka record can be built from this row: {defect}")
            elif row.left_out or (row.may_exceed(limit) and row.size > limit):
                self._bury(row, f"record of {row.size} bytes exceeds message.max.bytes={limit}")
            else:
                sendable.append(row)
        if not sendable:
            return
        if self.config.guarantee is Guarantee.AT_MOST_ONCE:
            self._delete_rows([r.id for r in sendable])
            self._produce(sendable, {})
            self.producer.flush(self.context.plan.transaction_timeout)
            self.context.stats.add(published=len(sendable), batches=1)
            return
        if self.transactional:
            self._publish_transaction(sendable)
        else:
            self._publish_idempotent(sendable)

    def _produce(
        self, rows: list[Row], failures: dict[int, Any], acked: set[int] | None = None
    ) -> None:
        """Queue every row; per-row errors land in ``failures`` and, when asked for, the ids
        of successful delivery reports in ``acked``; where they put each record goes to the
        batch's placements when the delivery record is kept (delivery reports fill them)."""
        placed = self._placed

        def delivered(row_id: int) -> Callable[[Any, Any], None]:
            def cb(err: Any, msg: Any) -> None:
                if err is not None:
                    failures[row_id] = err
                    return
                if acked is not None:
                    acked.add(row_id)
                if placed is not None:
                    placed[row_id] = (msg.partition(), msg.offset())

            return cb

        for row in rows:
            while True:
                try:
                    self.producer.produce(
                        row.topic,
                        value=row.value,
                        key=row.key,
                        headers=row.headers,
                        timestamp=row.created_ms,
                        on_delivery=delivered(row.id),
                    )
                    break
                except BufferError:
                    self.producer.poll(0.05)
                except KafkaException as exc:
                    failures[row.id] = exc.args[0]
                    break
                except (TypeError, ValueError) as exc:  # arguments no record is built from
                    failures[row.id] = KafkaError(KafkaError._INVALID_ARG, str(exc))
                    break

    def _handle_failures(
        self, rows: list[Row], failures: dict[int, Any]
    ) -> tuple[set[int], Exception | None]:
        """Act on a batch's failed rows as ``kafka.classify`` says; returns the ids moved to
        the dead table and the error to raise once the caller has settled the rest.

        Nothing is buried for a fatal producer; a request-wide refusal narrows down to
        one row per batch first; a missing or unwritable topic is held back (the rest of
        the slot flows) until ``--missing-topic-timeout``, then its rows are buried.
        """
        by_id = {r.id: r for r in rows}
        timed_out = {by_id[i].topic for i, e in failures.items() if _code(e) == _TIMED_OUT}
        missing = self._missing_topics(timed_out) if timed_out else set()
        verdicts = {
            i: classify(e, alone=len(rows) == 1, topic_missing=by_id[i].topic in missing)
            for i, e in failures.items()
        }
        found = {v: i for i, v in sorted(verdicts.items(), reverse=True)}  # v -> first id
        if Verdict.FENCED in found:
            return set(), self._fenced(f"fenced: another relay took transactional.id {self.tid}")
        if Verdict.CONFIG in found:
            return set(), ConfigError(
                f"Kafka refused the relay: {config_fix(failures[found[Verdict.CONFIG]])}"
            )
        if Verdict.FATAL in found:
            self._discard_producer()
            err = failures[found[Verdict.FATAL]]
            return set(), TransientError(f"fatal producer error ({err}); building a new producer")
        moved: set[int] = set()
        now = time.monotonic()
        for topic in sorted({by_id[i].topic for i, v in verdicts.items() if v is Verdict.TOPIC}):
            ids = [i for i, v in verdicts.items() if v is Verdict.TOPIC and by_id[i].topic == topic]
            if self.holds.failed(topic, now):
                for i in ids:
                    err, waited = failures[i], self.config.missing_topic_timeout
                    self._bury(
                        by_id[i],
                        f"{err.name()}: {err.str()}; topic {topic!r} was missing or not "
                        f"writable for --missing-topic-timeout={waited:g}s",
                    )
                moved.update(ids)
            else:
                log.warning(
                    "slot %d: topic %r is missing or not writable (%s); holding its rows back "
                    "for up to --missing-topic-timeout=%gs while the other topics flow",
                    self.slot,
                    topic,
                    failures[ids[0]],
                    self.config.missing_topic_timeout,
                )
        for i, v in verdicts.items():
            if v is Verdict.POISON:
                err = failures[i]
                self._bury(by_id[i], f"{err.name()}: {err.str()}")
                moved.add(i)
        if Verdict.REQUEST in found:
            refused = [i for i, v in verdicts.items() if v is Verdict.REQUEST]
            self._narrow_until = max(refused)
            log.warning(
                "slot %d: the broker refused a request of %d rows (%s); sending rows one by "
                "one up to outbox id %d to find the one at fault",
                self.slot,
                len(refused),
                failures[refused[0]],
                self._narrow_until,
            )
        if Verdict.TRANSIENT in found:
            err = failures[found[Verdict.TRANSIENT]]
            transient = sum(v is Verdict.TRANSIENT for v in verdicts.values())
            return moved, TransientError(f"{transient} records failed: {err}")
        return moved, None

    def _missing_topics(self, topics: set[str]) -> set[str]:
        """Topics the cluster's metadata says are missing or not writable: a delivery timeout
        for them is about the topic, not the network (auto-create off, or ACLs)."""
        missing: set[str] = set()
        if self.producer is None:
            return missing
        for topic in topics:
            try:
                md = self.producer.list_topics(topic, timeout=5)
            except KafkaException:
                continue  # the cluster is unreachable: a plain transient timeout
            meta = md.topics.get(topic)
            if (
                meta is not None
                and meta.error is not None
                and classify(meta.error) is Verdict.TOPIC
            ):
                missing.add(topic)
        return missing

    def _publish_transaction(self, rows: list[Row]) -> None:
        """One Kafka transaction: the rows, then the slot's recovery marker.

        The database transaction deletes the rows first: a database that refuses the
        delete (read-only, a revoked privilege, a trigger) refuses the batch before any
        record is sent. While the broker acknowledges the records, it claims the next
        batch in a backlog (which no longer sees these rows); it commits only after the
        Kafka transaction did, so a row leaves the outbox only once its record is
        committed (I2). Every way out of a batch that did not commit aborts its Kafka
        transaction first (I12): an open one would hold back every read_committed reader
        of its partitions, other producers' records included.
        """
        ids = [r.id for r in rows]
        failures: dict[int, Any] = {}
        acked: set[int] = set()
        placed = self._placements()
        unsent = 0
        ahead: list[Row] = []
        committed = False
        try:
            with self._db_transaction():
                self._delete_rows(ids)
                self.producer.begin_transaction()
                self._txn_begun, self._txn_ended = time.monotonic(), None
                self._produce(rows, failures, acked)
                if self._marker_with_records:  # no round trip after the flush (abort_probe)
                    self._produce_marker(rows)
                if claim_ahead(len(rows), self.config.batch_size, self._stopping()):
                    ahead = self._claim()
                # Elsewhere the marker goes out only once every record of the batch is
                # acknowledged: on a broker that shows aborted transactions (Tansu), a marker
                # can then never name a row whose record is missing, so recovery cannot delete
                # an unpublished row.
                unsent = self.producer.flush(self.context.plan.transaction_timeout)
                if failures or unsent:
                    raise psycopg.Rollback  # noqa: TRY301 - the rows stay in the outbox
                self._record_deliveries(rows, placed)
                if not self._marker_with_records:
                    self._produce_marker(rows)
                self._commit()
                committed = True
                self._txn_ended = time.monotonic()
        except KafkaException as exc:
            err = exc.args[0]
            if not committed and err.txn_requires_abort():
                self._abort_open()
            # Otherwise the transaction's fate may be unknown: rebuild the producer
            # (init_transactions settles it) and let the marker tell whether these rows
            # were committed.
            self._discard_producer()
            verdict = classify(err)
            if verdict is Verdict.FENCED:
                raise self._fenced(
                    f"fenced: another relay took transactional.id {self.tid}"
                ) from None
            if verdict is Verdict.CONFIG:
                raise ConfigError(f"Kafka refused the relay: {config_fix(exc)}") from None
            _, error = self._handle_failures(rows, failures)
            raise error or TransientError(f"Kafka transaction failed: {err}") from None
        except BaseException as exc:
            if committed:
                # The Kafka transaction committed, only the delete did not: the marker names
                # these rows, so recovery deletes them before anything is published again (I4).
                self._needs_recovery = self.transactional
            else:
                # A lost slot's next owner fences this producer anyway: do not wait long.
                self._abort_open(5.0 if isinstance(exc, SlotLost) else None)
            raise
        if failures or unsent:
            self._abort()
            self.holds.succeeded(reached(((r.id, r.topic) for r in rows), acked, failures.keys()))
            if not failures:
                raise TransientError(f"{unsent} records not acknowledged in time")
            _, error = self._handle_failures(rows, failures)
            if error is not None:
                raise error
            return
        self._ahead = ahead
        self.holds.succeeded({r.topic for r in rows})
        self.context.stats.add(published=len(rows), batches=1)

    def _produce_marker(self, rows: list[Row]) -> None:
        self.context.wrote_marker.add(self.slot)
        marker = Marker.of_batch(
            self.context.outbox_id,
            self.tid,
            self.slot,
            self.config.slots,
            [(r.id, r.event_id) for r in rows],
        )
        self.producer.produce(
            self.config.state_topic,
            key=self.tid.encode(),
            value=marker.encode(),
            partition=self.slot,
        )

    @property
    def _txn_open(self) -> bool:
        return self._txn_begun is not None and self._txn_ended is None

    def _abort_open(self, timeout: float | None = None) -> None:
        """Abort the batch's Kafka transaction, if one is open, on the way out of a batch that
        did not commit (I12). A producer that cannot abort is dropped: the next one's
        init_transactions aborts it, and the broker does at transaction.timeout.ms."""
        if self.producer is None or not self._txn_open:
            return
        self.context.stats.add(aborts=1)
        try:
            self.producer.abort_transaction(timeout or self.context.plan.transaction_timeout)
            self._txn_ended = time.monotonic()
        except KafkaException as exc:
            log.debug("slot %d: abort failed (%s); dropping the producer", self.slot, exc)
            self._discard_producer()

    def _commit(self) -> None:
        while True:
            try:
                self.producer.commit_transaction(self.context.plan.transaction_timeout)
                return
            except KafkaException as exc:
                if exc.args[0].retriable() and not self._stopping():
                    continue  # librdkafka resumes the same commit
                raise

    def _abort(self) -> None:
        self.context.stats.add(aborts=1)
        try:
            self.producer.abort_transaction(self.context.plan.transaction_timeout)
            self._txn_ended = time.monotonic()
        except KafkaException as exc:
            self._discard_producer()
            if classify(exc.args[0]) is Verdict.FENCED:
                raise self._fenced(f"fenced while aborting: {exc.args[0]}") from None

    def _fenced(self, detail: str) -> SlotLost:
        """Count a fence and say who fenced: a relay of this database (a takeover, a slot-count
        change) or, while this connection still holds the slot, something outside it (I9)."""
        self.context.stats.add(fenced=1)
        age = self._transaction_age()
        limit = self.context.plan.transaction_timeout
        fence = explain_fence(
            self._slot_lock_state(), transaction_age=age, transaction_timeout=limit
        )
        if fence is Fence.TIMEOUT:
            return SlotLost(
                f"{detail}: the broker aborted a Kafka transaction open for {age or 0:.0f} s "
                f"(transaction.timeout.ms is {limit:.0f} s); its rows stay in the outbox"
            )
        if fence is Fence.FOREIGN:
            self.context.stats.add(foreign_fences=1)
            return ForeignFence(
                foreign_fence_message(
                    slot=self.slot,
                    tid=self.tid,
                    outbox_id=self.context.outbox_id,
                    explicit_prefix=self.config.transactional_id_prefix,
                )
            )
        if fence is Fence.LAYOUT:
            return SlotLost(f"{detail} (a relay of this database is changing the slot count)")
        return SlotLost(detail)

    def _transaction_age(self) -> float | None:
        """Seconds the open (or last) Kafka transaction was open; None before the first."""
        if self._txn_begun is None:
            return None
        return (self._txn_ended or time.monotonic()) - self._txn_begun

    def _slot_lock_state(self) -> SlotLockState | None:
        """What this slot's connection says after a fence; None if it cannot tell (gone)."""
        try:
            row = self.conn.execute(
                sql.SLOT_LOCK_STATE,
                {
                    "namespace": SLOT_NAMESPACE,
                    "slot": self.slot,
                    "guard": GUARD_NAMESPACE,
                    "slots": self.config.slots,
                },
            ).fetchone()
        except psycopg.Error:
            return None
        if row is None:
            return None
        return SlotLockState(bool(row["holds_slot"]), bool(row["layout_changing"]))

    def _discard_producer(self) -> None:
        if self._txn_begun is not None and self._txn_ended is None:
            self._txn_ended = time.monotonic()  # its transaction goes with it
        producer, self.producer = self.producer, None
        if producer is not None:
            with contextlib.suppress(KafkaException, RuntimeError):
                producer.purge(in_queue=True, in_flight=True, blocking=False)

    def _publish_idempotent(self, rows: list[Row]) -> None:
        """Send the batch, then delete exactly the rows whose delivery report succeeded (I2)."""
        failures: dict[int, Any] = {}
        acked: set[int] = set()
        placed = self._placements()
        self._produce(rows, failures, acked)
        complete = self._await_reports()
        moved, error = self._handle_failures(rows, failures) if failures else (set(), None)
        acked -= failures.keys()
        done = settled(((r.id, r.topic) for r in rows), acked, moved)
        if done and placed is None:
            self._delete_rows(done)
        elif done:
            with self._db_transaction():
                self._delete_rows(done)
                deleted = set(done)
                self._record_deliveries([r for r in rows if r.id in deleted], placed)
        self.holds.succeeded({r.topic for r in rows if r.id in acked})
        self.context.stats.add(published=len(done), batches=1)
        if not complete:  # handed over or stopping: unacknowledged rows stay for the next owner
            self._discard_producer()
        elif error is not None:
            raise error

    def _await_reports(self) -> bool:
        """Wait for every record's delivery report; False if the relay stops or hands the
        slot over first. librdkafka retries a record until delivery.timeout.ms, then
        reports it failed, so this ends; meanwhile one line per flush timeout says why."""
        started = last_said = time.monotonic()
        while (unacked := self.producer.flush(0.5)) > 0:
            if self._stopping():
                return False
            now = time.monotonic()
            if now - last_said >= self.context.plan.transaction_timeout:
                last_said = now
                log.warning(
                    "slot %d: %d records not acknowledged after %.0f s; they stay in the "
                    "outbox while librdkafka retries them (until delivery.timeout.ms)",
                    self.slot,
                    unacked,
                    now - started,
                )
        return True


def _code(err: Any) -> int:
    return int(err.code())


_TIMED_OUT = KafkaError._MSG_TIMED_OUT
