"""The relay daemon: committed outbox rows -> one Kafka transaction per batch -> delete.

Composition: a ``Relay`` (one per process) holds the LISTEN connection and a
coordinator that takes slots; each owned slot runs a ``SlotWorker`` thread with
its own connection (which holds the slot's advisory lock, so a dead connection
frees the slot and aborts the worker's DB work at once) and its own
transactional producer (``<prefix>-<slot>``, so a new owner fences a zombie).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from psycopg.rows import tuple_row
from tenacity import RetryCallState, Retrying, retry_if_exception_type, wait_random_exponential

from outbox import sql
from outbox.batching import (
    Marker,
    MarkerReading,
    claim_ahead,
    jittered,
    judge_marker,
    poll_delay,
    recoverable,
    slots_to_release,
    slots_to_try,
    target_share,
)
from outbox.codec import record_size
from outbox.config import Guarantee, ProducerPlan, RelayConfig
from outbox.db import connect, redact
from outbox.errors import ConfigError, KafkaUnavailable, NotMigrated, SlotLost, TransientError
from outbox.kafka import TopicHolds, Verdict, classify, config_fix, settled
from outbox.logs import librdkafka_logger
from outbox.metrics import RelayMetrics
from outbox.partitioner import SHARD_COUNT, shards_of_slot, slot_of_shard

log = logging.getLogger("outbox.relay")

HEADER_ALLOWANCE = 16 * 1024
"""Rows whose key + value come within this of message.max.bytes get the exact size check."""
SLOT_NAMESPACE = 0x6F757462  # 'outb': advisory lock class for slots
COUNT_NAMESPACE = 0x6F757463  # 'outc': shared locks announcing each relay's slot count
GUARD_NAMESPACE = 0x6F757464  # 'outd': serialises the slot-count check and announcement
MARKER_READ_TIMEOUT = 30.0
"""How long a takeover reads for the slot's last marker before retrying (never settles
for an older one)."""


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
    markers_ignored: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)


def notified_slot(payload: str, slots: int) -> int | None:
    """The slot a NOTIFY payload (``publish()`` sends the shard) wakes; None: every slot."""
    if payload.isdecimal() and int(payload) < SHARD_COUNT:
        return slot_of_shard(int(payload), slots)
    return None


def delete_recovered(
    conn: psycopg.Connection[dict[str, Any]], marker: Marker, shards: list[int]
) -> int:
    """Delete the rows that are the marker's very events, among ``shards`` (in a transaction):
    their Kafka transaction committed, only their delete was lost (I4). Nothing else (I9)."""
    found = conn.execute(
        sql.RECOVERY_CANDIDATES, {"ids": list(marker.ids), "shards": shards}
    ).fetchall()
    doomed = recoverable(marker, [(r["id"], r["event_id"]) for r in found])
    if not doomed:
        return 0
    cur = conn.execute(
        sql.DELETE_RECOVERED,
        {"ids": [i for i, _ in doomed], "event_ids": [e for _, e in doomed]},
    )
    return cur.rowcount


class SlotWorker(threading.Thread):
    """Publishes one slot's shards until told to stop or until the slot is lost."""

    def __init__(
        self,
        relay: Relay,
        slot: int,
        conn: psycopg.Connection[dict[str, Any]],
    ) -> None:
        super().__init__(name=f"outbox-slot-{slot}", daemon=True)
        self.relay = relay
        self.config = relay.config
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
        self.tid = relay.transactional_id(slot)
        self.transactional = self.config.guarantee is Guarantee.EXACTLY_ONCE
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

    # -- lifecycle -------------------------------------------------------------

    def run(self) -> None:
        try:
            self._run()
        except SlotLost as exc:
            log.warning("slot %d lost: %s", self.slot, exc)
        except ConfigError as exc:  # no retry can help: stop the relay, naming the fix (I8)
            self.relay.refuse(exc)
        except Exception:
            self.failed = True
            log.exception("slot %d worker failed; the slot is released and retried", self.slot)
        finally:
            self._close()

    def _stopping(self) -> bool:
        return self.relay.stop.is_set() or self.release.is_set()

    def _run(self) -> None:
        log.info("slot %d: publishing shards %s as %s", self.slot, self.shards, self.tid)
        empty_polls = 0  # claims in a row that found nothing
        while not self._stopping():
            if self._retrying(self._step):
                self.drained.clear()
                empty_polls = 0
                continue
            wait_held = min(self.holds.until.values(), default=0.0) - time.monotonic()
            if self.config.once and wait_held > 0:
                # --once drains held topics too: wait for their next try (or burial).
                self.wake.wait(wait_held)
                continue
            self.drained.set()
            if self.config.once:
                return
            delay = poll_delay(
                empty_polls, self.config.poll_interval, listening=self.relay.listening.is_set()
            )
            self.wake.wait(jittered(delay))
            self.wake.clear()
            empty_polls += 1

    def _step(self) -> bool:
        """Claim and publish one batch; False when there was nothing to do.

        A failed batch is claimed afresh on retry, so rows committed meanwhile join it.
        """
        if self._fatal is not None:
            log.warning("slot %d: producer failed (%s); building a new one", self.slot, self._fatal)
            self._fatal = None
            self._discard_producer()
        if self.producer is None:
            self._start_producer()
            self._needs_recovery = self.transactional
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
            self.relay.metrics.batch_size.observe(len(rows))
            self.relay.metrics.batch_seconds.observe(time.perf_counter() - started)
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
        self.relay.stats.add(retries=1)
        log.warning(
            "slot %d: %s; retrying (attempt %d)",
            self.slot,
            state.outcome.exception() if state.outcome else "?",
            state.attempt_number,
        )

    def _close(self) -> None:
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
        self.relay.worker_done(self)

    # -- Kafka -----------------------------------------------------------------

    def _start_producer(self) -> None:
        settings: dict[str, Any] = dict(self.relay.plan.settings)
        if self.transactional:
            settings["transactional.id"] = self.tid
        settings["error_cb"] = self._on_error
        settings["logger"] = librdkafka_logger()
        self.producer = Producer(settings)
        if self.transactional:
            # Fences the previous owner of this transactional.id, aborts its open transaction (I4).
            while True:
                try:
                    self.producer.init_transactions(self.config.transaction_timeout)
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

    def _on_error(self, err: KafkaError) -> None:
        """librdkafka's client-wide errors: logged once per repeat window; a fatal one
        retires the producer before the next batch."""
        if err.fatal():
            self._fatal = err
        librdkafka_logger().warning("slot %d: kafka: %s", self.slot, redact(str(err)))

    def _recover(self) -> None:
        """Delete rows the previous owner published but did not get to delete (I4), if
        the slot's last marker is this outbox's and names those very events (I9)."""
        if self.relay.first_run and self.slot not in self.relay.wrote_marker:
            return
        try:
            raw = self.relay.read_marker(self.slot, self.tid, self.interrupt)
        except KafkaException as exc:
            raise TransientError(f"reading the recovery marker: {exc.args[0]}") from None
        except TransientError:
            if self._stopping():  # never publish before recovery: the next owner does it
                raise SlotLost("released before its recovery marker was read") from None
            raise
        if raw is None:
            return
        reading = self.relay.judge(raw, self.slot, self.tid, self.config.slots)
        if reading.marker is None:
            return
        with self._connection_held(), self.conn.transaction():
            deleted = delete_recovered(self.conn, reading.marker, self.shards)
        if deleted:
            log.warning(
                "slot %d: %d rows of the last committed Kafka transaction were still in the "
                "outbox; deleted them instead of publishing again",
                self.slot,
                deleted,
            )
            self.relay.stats.add(recovered=deleted)

    # -- database --------------------------------------------------------------

    @contextlib.contextmanager
    def _connection_held(self) -> Iterator[None]:
        """Database work on the slot's connection: if the connection is lost, so is the slot
        (its advisory lock and any open transaction went with it)."""
        try:
            yield
        except psycopg.OperationalError as exc:
            raise SlotLost(f"database connection lost: {redact(str(exc))}") from None

    def _claim(self) -> list[Row]:
        params = {
            "limit": 1 if self._narrow_until is not None else self.config.batch_size,
            "held": self.holds.held(time.monotonic()),
            "max_value_bytes": self.relay.plan.message_max_bytes,
            "max_bytes": self.config.batch_bytes,
        }
        # Binary: bytea arrives as bytes, not hex text to decode for every row.
        with self._connection_held(), self.conn.cursor(row_factory=tuple_row, binary=True) as cur:
            cur.execute(self.claim_statement, params, prepare=True)
            rows = list(map(Row._make, cur.fetchall()))
        self.relay.stats.add(claimed=len(rows))
        return rows

    def _delete_rows(self, ids: list[int]) -> None:
        with self._connection_held():
            self.conn.execute(sql.DELETE_EVENTS, {"ids": ids}, prepare=True)

    @contextlib.contextmanager
    def _db_transaction(self) -> Iterator[None]:
        """A transaction on the slot's connection (``psycopg.Rollback`` ends it quietly).

        A connection lost at the COMMIT after a Kafka commit loses the slot; the next
        owner's recovery deletes the rows (I4).
        """
        with self._connection_held(), self.conn.transaction():
            yield

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
        with self._connection_held():
            self.conn.execute(sql.MOVE_TO_DEAD, {"id": row.id, "error": error})
        self.relay.stats.add(dead=1)

    # -- one batch -------------------------------------------------------------

    def _publish(self, rows: list[Row]) -> None:
        limit = self.relay.plan.message_max_bytes
        sendable = []
        for row in rows:
            if row.left_out or (row.may_exceed(limit) and row.size > limit):
                self._bury(row, f"record of {row.size} bytes exceeds message.max.bytes={limit}")
            else:
                sendable.append(row)
        if not sendable:
            return
        if self.config.guarantee is Guarantee.AT_MOST_ONCE:
            self._delete_rows([r.id for r in sendable])
            self._produce(sendable, {})
            self.producer.flush(self.config.transaction_timeout)
            self.relay.stats.add(published=len(sendable), batches=1)
            return
        if self.transactional:
            self._publish_transaction(sendable)
        else:
            self._publish_idempotent(sendable)

    def _produce(
        self, rows: list[Row], failures: dict[int, Any], acked: set[int] | None = None
    ) -> None:
        """Queue every row; per-row errors land in ``failures`` and, when asked for, the ids
        of successful delivery reports in ``acked`` (delivery reports fill them later)."""

        def delivered(row_id: int) -> Callable[[Any, Any], None]:
            def cb(err: Any, _msg: Any) -> None:
                if err is not None:
                    failures[row_id] = err
                elif acked is not None:
                    acked.add(row_id)

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
            self.relay.stats.add(fenced=1)
            return set(), SlotLost(f"fenced: another relay took transactional.id {self.tid}")
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

        While the broker acknowledges the records, a database transaction deletes
        the rows (and, in a backlog, claims the next batch, which no longer sees
        them); it commits only after the Kafka transaction did, so a row leaves the
        outbox only once its record is committed (I2), and the database's work
        overlaps the broker's instead of following it.
        """
        ids = [r.id for r in rows]
        failures: dict[int, Any] = {}
        unsent = 0
        ahead: list[Row] = []
        committed = False
        try:
            self.producer.begin_transaction()
            self._produce(rows, failures)
            with self._db_transaction():
                self._delete_rows(ids)
                if claim_ahead(len(rows), self.config.batch_size, self._stopping()):
                    ahead = self._claim()
                # The marker goes out only once every record of the batch is acknowledged. On
                # a broker that shows aborted transactions (Tansu), a marker can then never
                # name a row whose record is missing, so recovery cannot delete an unpublished
                # row.
                unsent = self.producer.flush(self.config.transaction_timeout)
                if failures or unsent:
                    raise psycopg.Rollback  # the rows stay in the outbox
                self.relay.wrote_marker.add(self.slot)
                marker = Marker.of_batch(
                    self.relay.outbox_id,
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
                self._commit()
                committed = True
        except SlotLost:
            if not committed:  # nothing of this batch may commit now; if it did, recovery
                with contextlib.suppress(KafkaException):  # deletes its rows (I4)
                    self.producer.abort_transaction(5)
            raise
        except KafkaException as exc:
            # The transaction's fate may be unknown: rebuild the producer (init_transactions
            # settles it) and let the marker tell whether these rows were committed.
            self._discard_producer()
            verdict = classify(exc.args[0])
            if verdict is Verdict.FENCED:
                self.relay.stats.add(fenced=1)
                raise SlotLost(f"fenced: another relay took transactional.id {self.tid}") from None
            if verdict is Verdict.CONFIG:
                raise ConfigError(f"Kafka refused the relay: {config_fix(exc)}") from None
            _, error = self._handle_failures(rows, failures)
            raise error or TransientError(f"Kafka transaction failed: {exc.args[0]}") from None
        if failures or unsent:
            self._abort()
            if not failures:
                raise TransientError(f"{unsent} records not acknowledged in time")
            _, error = self._handle_failures(rows, failures)
            if error is not None:
                raise error
            return
        self._ahead = ahead
        self.holds.succeeded({r.topic for r in rows})
        self.relay.stats.add(published=len(rows), batches=1)

    def _commit(self) -> None:
        while True:
            try:
                self.producer.commit_transaction(self.config.transaction_timeout)
                return
            except KafkaException as exc:
                if exc.args[0].retriable() and not self._stopping():
                    continue  # librdkafka resumes the same commit
                raise

    def _abort(self) -> None:
        self.relay.stats.add(aborts=1)
        try:
            self.producer.abort_transaction(self.config.transaction_timeout)
        except KafkaException as exc:
            self._discard_producer()
            if classify(exc.args[0]) is Verdict.FENCED:
                self.relay.stats.add(fenced=1)
                raise SlotLost(f"fenced while aborting: {exc.args[0]}") from None

    def _discard_producer(self) -> None:
        producer, self.producer = self.producer, None
        if producer is not None:
            with contextlib.suppress(KafkaException, RuntimeError):
                producer.purge(in_queue=True, in_flight=True, blocking=False)

    def _publish_idempotent(self, rows: list[Row]) -> None:
        """Send the batch, then delete exactly the rows whose delivery report succeeded (I2)."""
        failures: dict[int, Any] = {}
        acked: set[int] = set()
        self._produce(rows, failures, acked)
        complete = self._await_reports()
        moved, error = self._handle_failures(rows, failures) if failures else (set(), None)
        acked -= failures.keys()
        done = settled(((r.id, r.topic) for r in rows), acked, moved)
        if done:
            self._delete_rows(done)
        self.holds.succeeded({r.topic for r in rows if r.id in acked})
        self.relay.stats.add(published=len(done), batches=1)
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
            if now - last_said >= self.config.transaction_timeout:
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


class Relay:
    """One relay process: takes its fair share of slots and runs a worker per slot."""

    def __init__(self, config: RelayConfig, *, stop: threading.Event | None = None) -> None:
        self.config = config
        self.plan: ProducerPlan = config.producer_plan()
        self.stop = stop or threading.Event()
        self.stats = RelayStats()
        self.workers: dict[int, SlotWorker] = {}
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._control: psycopg.Connection[dict[str, Any]] | None = None
        self._marker_consumer: Any = None
        self._end_consumer: Any = None
        self._marker_lock = threading.Lock()
        self.listening = threading.Event()  # a LISTEN session is up: NOTIFY wakes the slots
        self.outbox_id = uuid.UUID(int=0)  # read from the database when the relay starts
        self.fatal: BaseException | None = None  # a refusal found by a worker: run() raises it
        # The outbox's first relay with default transactional ids, alone: no marker can
        # exist under them but those this process writes, so takeovers skip reading (a
        # state topic shared with other outboxes would be read back to its start).
        self.first_run = False
        self.wrote_marker: set[int] = set()
        self._members = 1
        self._failures: dict[int, int] = {}
        self._not_before: dict[int, float] = {}
        self.name = f"outbox-relay:{os.getpid()}"
        self.metrics = RelayMetrics(self)

    # -- public ----------------------------------------------------------------

    def run(self) -> RelayStats:
        """Run until ``stop`` is set (or, with ``once``, until the owned slots are drained)."""
        for warning in self.plan.warnings:
            log.warning("%s", warning)
        try:
            ready = self._start_up_with_database()
        except BaseException:
            self._close_clients()
            raise
        if not ready:  # told to stop while waiting for Kafka
            self._close_clients()
            return self.stats
        # Long-lived start-up objects leave the GC's generations: full collections
        # otherwise walk them again and again while the slot threads hold the GIL.
        gc.freeze()
        listener = None
        if self.config.listen and not self.config.once:
            listener = threading.Thread(target=self._listen, name="outbox-listen", daemon=True)
            listener.start()
        try:
            self._coordinate()
        finally:
            self.stop.set()
            self.wake_all()
            for worker in list(self.workers.values()):
                worker.join(self.config.transaction_timeout + 10)
            self._close_clients()
            if listener is not None:
                listener.join(5)
        if self.fatal is not None:
            raise self.fatal
        return self.stats

    def _start_up_with_database(self) -> bool:
        """Connect, check the schema, then start up. A database that goes away meanwhile
        (a restart, a failover) is waited for by a daemon, like one that is not up yet;
        ``--once`` reports it in one line."""
        attempt = 0
        while True:
            self._control = self._first_connection()
            try:
                self._check_schema()
                return self._start_up()
            except psycopg.OperationalError as exc:
                message = f"database connection lost during start-up: {redact(str(exc))}"
                self._control.close()
                if self.config.once or self.stop.is_set():
                    raise ConnectionError(message) from None
                attempt += 1
                delay = min(30.0, 0.5 * 2 ** min(attempt, 6))
                log.warning("%s; starting again in %.1f s", " ".join(message.split()), delay)
                if self.stop.wait(delay):
                    return False

    def _start_up(self) -> bool:
        """Identity, Kafka (settings, reachability, state topic), prefix and slot-count
        checks: all before any slot runs. False: told to stop while waiting for Kafka."""
        self.outbox_id = self._load_identity()
        log.info(
            "outbox %s: transactional ids %s-<slot>",
            self.outbox_id,
            self.config.tid_prefix(self.outbox_id),
        )
        if not self._wait_for_kafka():
            return False
        if self.config.guarantee is Guarantee.EXACTLY_ONCE:
            self._refuse_a_shared_prefix()
        for attempt in Retrying(  # settling a changed layout needs Kafka: wait for it
            retry=retry_if_exception_type(TransientError),
            wait=wait_random_exponential(multiplier=0.5, max=10),
            sleep=self._pause,
            before_sleep=lambda rs: log.warning(
                "%s; retrying", rs.outcome.exception() if rs.outcome else "?"
            ),
            stop=lambda rs: self.stop.is_set(),
            reraise=True,
        ):
            with attempt:
                self._announce_slot_count()
        return True

    def _close_clients(self) -> None:
        self._close_marker_clients()
        if self._control is not None:
            self._control.close()

    def refuse(self, exc: BaseException) -> None:
        """Stop the whole relay with ``exc`` (a configuration that would lose events)."""
        if self.fatal is None:
            self.fatal = exc
        self.stop.set()
        self.wake_all()

    def transactional_id(self, slot: int | str) -> str:
        """``<prefix>-<slot>``; the default prefix is unique to this outbox (I9)."""
        return f"{self.config.tid_prefix(self.outbox_id)}-{slot}"

    def liveness(self) -> tuple[bool, str]:
        """Alive while the process runs and has not been told to stop."""
        return (not self.stop.is_set(), "stopping" if self.stop.is_set() else "running")

    def readiness(self) -> tuple[bool, str]:
        """Ready: database reachable, owning its share of slots, each with a working producer."""
        if self._control is None or self._control.closed or self._control.broken:
            return False, "no database connection"
        with self._lock:
            workers = list(self.workers.values())
        want = target_share(self.config.slots, self._members, self.config.max_slots)
        if len(workers) < want:
            return False, f"owns {len(workers)} of its {want} slots"
        starting = [w.slot for w in workers if w.producer is None]
        if starting:
            return False, f"slots {starting} are connecting to Kafka"
        return True, f"owns slots {sorted(w.slot for w in workers)}"

    def worker_done(self, worker: SlotWorker) -> None:
        with self._lock:
            if self.workers.get(worker.slot) is worker:
                del self.workers[worker.slot]
            if worker.failed:  # a bug or a refused setting must not spin: back off per slot
                failures = self._failures.get(worker.slot, 0) + 1
                self._failures[worker.slot] = failures
                self._not_before[worker.slot] = time.monotonic() + min(60.0, 2.0**failures)
            else:
                self._failures.pop(worker.slot, None)
        self._changed.set()

    # -- slots -----------------------------------------------------------------

    def _check_schema(self) -> None:
        """An unmigrated database stops the relay at once, naming the fix (I8)."""
        assert self._control is not None
        row = self._control.execute(sql.OUTBOX_TABLES).fetchone()
        if row is None or row["events"] is None or row["dead"] is None:
            raise NotMigrated("no outbox_events / outbox_dead_events table")

    def _announce_slot_count(self) -> None:
        """Check and announce the slot count under one lock: of relays started together
        with different ``--slots``, only the first runs. A new layout is adopted only
        after the old one's slots are fenced and recovered."""
        assert self._control is not None
        params = {"namespace": COUNT_NAMESPACE, "slots": self.config.slots}
        with self._control.transaction():
            self._control.execute(sql.GUARD_SLOT_COUNT, {"namespace": GUARD_NAMESPACE})
            others = self._control.execute(sql.OTHER_SLOT_COUNTS, params).fetchall()
            if others:
                raise ConfigError(
                    f"--slots={self.config.slots}, but a running relay uses --slots="
                    f"{others[0]['slots']}: every relay of one database must use the same slot "
                    "count (stop the others first to change it)"
                )
            self._control.execute(sql.LOCK_SLOT_COUNT, params)
            row = self._control.execute(sql.READ_IDENTITY).fetchone()
            before = row["slot_count"] if row else None
            self.first_run = before is None and self.config.transactional_id_prefix is None
            if before != self.config.slots:
                if before is not None and self.config.guarantee is Guarantee.EXACTLY_ONCE:
                    self._settle_layout(int(before))
                self._control.execute(sql.RECORD_SLOT_COUNT, {"slots": self.config.slots})

    def _settle_layout(self, before: int) -> None:
        """The slot count changed: fence every slot of the old layout (a zombie's open
        transaction is aborted) and apply its last marker, before any new slot publishes,
        so a batch in flight across the change is neither lost nor published twice."""
        assert self._control is not None
        log.warning(
            "slot layout changes from %d to %d slots: settling the old slots first",
            before,
            self.config.slots,
        )
        for slot in range(before):
            tid = self.transactional_id(slot)
            producer = Producer(self.relay_settings(tid) | {"logger": librdkafka_logger()})
            try:
                producer.init_transactions(self.config.transaction_timeout)
                raw = self.read_marker(slot, tid, self.stop)
            except KafkaException as exc:
                raise TransientError(f"settling slot {slot} of the old layout: {exc}") from None
            finally:
                producer.flush(0)
            if raw is None:
                continue
            try:
                reading = self.judge(raw, slot, tid, before)
            except SlotLost:  # another outbox's marker under an explicit prefix
                raise self.fatal or ConfigError(f"{tid}: another outbox's marker") from None
            if reading.marker is not None:
                deleted = delete_recovered(
                    self._control, reading.marker, shards_of_slot(slot, before)
                )
                self.stats.add(recovered=deleted)

    def relay_settings(self, tid: str) -> dict[str, Any]:
        """A transactional producer's settings for ``tid``."""
        return dict(self.plan.settings) | {"transactional.id": tid}

    def _load_identity(self) -> uuid.UUID:
        """This outbox's identity (created by ``outbox migrate``, or here for tables made
        from ``outbox.metadata``)."""
        assert self._control is not None
        try:
            self._control.execute(sql.ENSURE_IDENTITY)
            row = self._control.execute(sql.READ_IDENTITY).fetchone()
        except psycopg.errors.UndefinedTable:
            raise ConfigError(
                "the outbox tables predate the outbox identity (table outbox_identity is "
                "missing): run `outbox migrate` first"
            ) from None
        assert row is not None
        return uuid.UUID(str(row["outbox_id"]))

    def _shared_prefix(self, tid: str, other: uuid.UUID) -> ConfigError:
        return ConfigError(
            f"--transactional-id-prefix={self.config.transactional_id_prefix}: the "
            f"transactional id {tid} is also used by outbox {other} (this is outbox "
            f"{self.outbox_id}); two outboxes fencing each other lose events. Give each "
            "outbox its own prefix, or drop the option to use the default derived from the "
            "outbox identity. If that outbox is gone (this outbox was re-created or moved), "
            f"start once with --replaces-outbox {other}"
        )

    def _refuse_a_shared_prefix(self) -> None:
        """An explicit prefix another outbox uses too is refused BEFORE its transactional
        ids are fenced: the newest marker under each of them, committed or not, must not
        name another outbox."""
        if self.config.transactional_id_prefix is None:
            return
        for slot in range(self.config.slots):
            tid = self.transactional_id(slot)
            try:
                raw = self.read_marker(slot, tid, self.stop, committed=False)
            except (KafkaException, TransientError) as exc:
                log.warning("slot %d: could not check the prefix now (%s)", slot, exc)
                continue  # the slot's recovery checks it again, after fencing
            if raw is None:
                continue
            reading = judge_marker(
                raw,
                outbox_id=self.outbox_id,
                tid=tid,
                slot=slot,
                slots=self.config.slots,
                explicit_prefix=True,
                replaces=self.config.replaces_outbox,
            )
            if reading.conflict is not None:
                raise self._shared_prefix(tid, reading.conflict)

    def judge(self, raw: bytes, slot: int, tid: str, slots: int) -> MarkerReading:
        """What to do with a slot's last marker; a conflict stops the relay (I9)."""
        reading = judge_marker(
            raw,
            outbox_id=self.outbox_id,
            tid=tid,
            slot=slot,
            slots=slots,
            explicit_prefix=self.config.transactional_id_prefix is not None,
            replaces=self.config.replaces_outbox,
        )
        if reading.conflict is not None:
            exc = self._shared_prefix(tid, reading.conflict)
            self.refuse(exc)
            raise SlotLost(str(exc))
        if reading.ignored is not None and reading.expected:
            log.info("slot %d: the recovery marker under %s is %s", slot, tid, reading.ignored)
        elif reading.ignored is not None:
            self.stats.add(markers_ignored=1)
            log.warning(
                "slot %d: ignored the recovery marker under %s: %s; it deletes nothing",
                slot,
                tid,
                reading.ignored,
            )
        return reading

    def _count_members(self) -> int:
        assert self._control is not None
        row = self._control.execute(
            sql.COUNT_RELAYS, {"namespace": COUNT_NAMESPACE, "slots": self.config.slots}
        ).fetchone()
        return max(1, int(row["n"])) if row else 1

    def _coordinate(self) -> None:
        start = os.getpid() % self.config.slots
        while not self.stop.is_set():
            with self._lock:
                owned = sorted(self.workers)
            try:
                members = self._members = self._count_members()
                if members > 1:  # another relay may write markers for slots this one takes
                    self.first_run = False
            except psycopg.OperationalError:
                log.warning("control connection lost; reconnecting")
                self._reconnect_control()
                continue
            for slot in slots_to_release(owned, self.config.slots, members):
                with self._lock:
                    worker = self.workers.get(slot)
                if worker is not None and not worker.release.is_set():
                    log.info("slot %d: handing over to balance %d relays", slot, members)
                    worker.hand_over()
            for slot in slots_to_try(
                owned, self.config.slots, members, start, self.config.max_slots
            ):
                if self._not_before.get(slot, 0.0) > time.monotonic():
                    continue
                want = target_share(self.config.slots, members, self.config.max_slots)
                if self._try_take(slot) and len(self.workers) >= want:
                    break
            if self.config.once:
                self._finish_once()
                return
            self._changed.wait(jittered(1.0))
            self._changed.clear()

    def _finish_once(self) -> None:
        for worker in list(self.workers.values()):
            worker.join()

    def _try_take(self, slot: int) -> bool:
        try:
            conn = connect(self.config.dsn, application_name=f"{self.name}:slot-{slot}")
        except ConnectionError as exc:
            log.warning("%s", exc)
            return False
        try:
            row = conn.execute(
                sql.TRY_LOCK_SLOT, {"namespace": SLOT_NAMESPACE, "slot": slot}
            ).fetchone()
        except psycopg.OperationalError as exc:
            log.warning("slot %d: cannot take it now: %s", slot, redact(str(exc)))
            conn.close()
            return False
        if not row or not next(iter(row.values())):
            conn.close()
            return False
        worker = SlotWorker(self, slot, conn)
        with self._lock:
            self.workers[slot] = worker
        worker.start()
        return True

    def _reconnect_control(self) -> None:
        for attempt in Retrying(
            wait=wait_random_exponential(multiplier=0.2, max=10),
            sleep=self._pause,
            stop=lambda rs: self.stop.is_set(),
            reraise=True,
        ):
            with attempt:
                if self._control is not None:
                    self._control.close()
                self._control = connect(self.config.dsn, application_name=self.name)
                try:
                    self._announce_slot_count()
                except ConfigError as exc:  # another slot count took over meanwhile
                    self.refuse(exc)

    def _first_connection(self) -> psycopg.Connection[dict[str, Any]]:
        """A daemon waits for its database (it may start first); ``--once`` fails at once."""
        attempt = 0
        while True:
            try:
                return connect(self.config.dsn, application_name=self.name)
            except ConnectionError as exc:
                if self.config.once or self.stop.is_set():
                    raise
                attempt += 1
                delay = min(30.0, 0.5 * 2 ** min(attempt, 6))
                log.warning("%s; retrying in %.0f s", exc, delay)
                self.stop.wait(delay)

    def _pause(self, seconds: float) -> None:
        self.stop.wait(seconds)

    def wake_for(self, payload: str) -> None:
        """Wake the slot owning the notified shard (here, if this process owns it)."""
        slot = notified_slot(payload, self.config.slots)
        if slot is None:
            self.wake_all()
            return
        with self._lock:
            worker = self.workers.get(slot)
            if worker is not None:
                worker.wake.set()

    def wake_all(self) -> None:
        with self._lock:
            for worker in self.workers.values():
                worker.wake.set()
                if self.stop.is_set():
                    worker.interrupt.set()

    # -- LISTEN ----------------------------------------------------------------

    def _listen(self) -> None:
        """Wake workers on publish()'s NOTIFY; polling covers any gap while reconnecting."""
        failures = 0
        while not self.stop.is_set():
            try:
                with connect(self.config.dsn, application_name=f"{self.name}:listen") as conn:
                    conn.execute(sql.LISTEN)
                    self.listening.set()
                    failures = 0
                    while not self.stop.is_set():
                        for note in conn.notifies(timeout=0.5, stop_after=1):
                            self.wake_for(note.payload)
            except (psycopg.Error, ConnectionError) as exc:
                self.listening.clear()  # the slots poll adaptively until it is back
                failures += 1
                log.warning(
                    "LISTEN connection failed (%s); polling (10 ms after rows were found, "
                    "backing off to every %.1fs) until it is back. LISTEN needs a direct "
                    "session, not a transaction-pooling PgBouncer",
                    redact(str(exc)),
                    self.config.poll_interval,
                )
                self.stop.wait(min(30.0, 0.5 * 2**failures))

    # -- Kafka at start ---------------------------------------------------------

    def _wait_for_kafka(self) -> bool:
        """Check the Kafka settings and reach the cluster before taking any slot.

        A setting librdkafka does not know, or credentials/ACLs the cluster refuses,
        raise ConfigError (I8). An unreachable cluster is waited for by the daemon
        with backoff, one line per attempt; ``--once`` raises KafkaUnavailable.
        False: told to stop while waiting.
        """
        attempt = 0
        while True:
            try:
                self._probe_kafka()
                if self.config.guarantee is Guarantee.EXACTLY_ONCE:
                    self._ensure_state_topic()
                return True
            except KafkaException as exc:
                problem = str(exc.args[0].str() if exc.args else exc)
            where = f"Kafka at {self.config.bootstrap_servers} is unreachable ({problem})"
            if self.config.once:
                raise KafkaUnavailable(f"{where}; check --bootstrap-servers and the network")
            attempt += 1
            delay = min(30.0, 0.5 * 2 ** min(attempt, 6))
            log.warning("%s; retrying in %.0f s", where, delay)
            if self.stop.wait(delay):
                return False

    def _probe_kafka(self) -> None:
        """One metadata request with the producer's own settings; raises KafkaException."""
        errors: list[KafkaError] = []
        settings: dict[str, Any] = dict(self.plan.settings)
        settings |= {"error_cb": errors.append, "logger": librdkafka_logger()}
        try:
            probe = Producer(settings)
        except KafkaException as exc:
            raise ConfigError(
                f"Kafka setting refused: {exc.args[0].str()}; fix or remove it in -X or "
                "--producer-config"
            ) from None
        try:
            probe.list_topics(timeout=10)
        except KafkaException:
            probe.poll(0)  # serve error_cb: an authentication failure says more than a timeout
            for err in errors:
                if classify(err) is Verdict.CONFIG:
                    raise ConfigError(f"Kafka refused the relay: {config_fix(err)}") from None
            raise
        finally:
            probe.purge()

    # -- recovery marker -------------------------------------------------------

    def _ensure_state_topic(self) -> None:
        """The compacted topic holding each slot's last marker, one partition per possible slot."""
        settings: dict[str, Any] = self.plan.connection | {"logger": librdkafka_logger()}
        admin = AdminClient(settings)
        topic = self.config.state_topic
        md = admin.list_topics(timeout=30)
        if topic in md.topics and not md.topics[topic].error:
            have = len(md.topics[topic].partitions)
            if have < SHARD_COUNT:
                raise ConfigError(
                    f"state topic {topic!r} has {have} partitions; the relay needs {SHARD_COUNT} "
                    "(one per possible slot): delete it or pick another --state-topic"
                )
            return
        futures = admin.create_topics(
            [NewTopic(topic, SHARD_COUNT, config={"cleanup.policy": "compact"})],
            operation_timeout=30,
        )
        for fut in futures.values():
            try:
                fut.result()
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise

    def read_marker(
        self, slot: int, tid: str, interrupt: threading.Event, *, committed: bool = True
    ) -> bytes | None:
        """The slot's LAST committed marker under ``tid`` (read_committed), or None.

        Call it after ``init_transactions`` settled ``tid``'s transactions. It reads up to
        the partition's end as of now, waiting while another producer's open transaction
        holds the read back; past ``MARKER_READ_TIMEOUT`` it raises TransientError rather
        than return an older marker (which would publish the last batch twice).
        """
        with self._marker_lock:
            try:
                return self._read_marker(slot, tid, interrupt, committed)
            except (TransientError, KafkaException):
                # A failed read can leave a client stuck on stale metadata (seen after a node
                # restart: _UNKNOWN_PARTITION on every retry): the next try builds new ones.
                self._close_marker_clients()
                raise

    def _close_marker_clients(self) -> None:
        for consumer in (self._marker_consumer, self._end_consumer):
            if consumer is not None:
                with contextlib.suppress(KafkaException, RuntimeError):
                    consumer.close()
        self._marker_consumer = self._end_consumer = None

    def _consumer(self, isolation: str) -> Any:
        return Consumer(
            self.plan.connection
            | {
                "logger": librdkafka_logger(),
                "group.id": f"{self.config.tid_prefix(self.outbox_id)}-marker-reader",
                "isolation.level": isolation,
                "enable.auto.commit": False,
                "enable.partition.eof": True,
                "fetch.wait.max.ms": "10",  # EOF at once: takeover waits on this read
            }
        )

    def _read_marker(
        self, slot: int, tid: str, interrupt: threading.Event, committed: bool
    ) -> bytes | None:
        if self._marker_consumer is None:
            self._marker_consumer = self._consumer("read_committed")
            # The true end of the partition, open transactions included (a read_committed
            # client is told the last stable offset, which another producer can hold back).
            self._end_consumer = self._consumer("read_uncommitted")
        tp = TopicPartition(self.config.state_topic, slot)
        low, high = self._end_consumer.get_watermark_offsets(tp, timeout=10, cached=False)
        consumer = self._marker_consumer if committed else self._end_consumer
        deadline = time.monotonic() + MARKER_READ_TIMEOUT
        window = 16
        try:
            while high > low:
                start = max(low, high - window)
                last = self._scan(consumer, slot, tid, start, high, deadline, interrupt)
                if last is not None or start == low:
                    return last
                window *= 4
            return None
        finally:
            consumer.unassign()

    def _scan(
        self,
        consumer: Any,
        slot: int,
        tid: str,
        start: int,
        end: int,
        deadline: float,
        interrupt: threading.Event,
    ) -> bytes | None:
        """The last committed value under ``tid`` in offsets [start, end): read to the end."""
        tp = TopicPartition(self.config.state_topic, slot, start)
        consumer.assign([tp])
        key = tid.encode()
        last: bytes | None = None
        position = start
        while position < end:
            if interrupt.is_set():
                raise TransientError(f"slot {slot}: marker read interrupted (stopping)")
            if time.monotonic() > deadline:
                raise TransientError(
                    f"slot {slot}: the state topic was not readable up to offset {end} within "
                    f"{MARKER_READ_TIMEOUT:.0f} s (an open transaction of another producer?)"
                )
            msg = consumer.poll(0.2)
            if msg is None:
                position = max(position, _position(consumer, tp))
                continue
            if msg.error():
                if msg.error().code() == KafkaError._PARTITION_EOF:
                    position = max(position, msg.offset() or 0, _position(consumer, tp))
                    continue
                raise TransientError(f"reading recovery marker: {msg.error()}")
            position = max(position, (msg.offset() or 0) + 1)
            if msg.key() == key and msg.value():
                last = msg.value()
        return last


def _position(consumer: Any, tp: TopicPartition) -> int:
    """Where ``consumer`` will read next in ``tp`` (past skipped control records too)."""
    [where] = consumer.position([TopicPartition(tp.topic, tp.partition)])
    return int(where.offset) if where.offset >= 0 else 0
