"""The consumer's loop, apart from the user's code: exactly-once effects from at-least-once
delivery (I5, I7, I10, I11).

``ConsumerRunner`` holds the user's object (an ``IdempotentConsumer`` subclass, or any object
with ``handle``) and reads nothing of it but ``handle``, ``dedup_key``, ``on_committed`` and
``event_types``: whatever else the user names on their class cannot collide with the loop.

One loop, one thread: fetch up to ``batch_size`` records, apply them in ONE database
transaction that also inserts their dedup records (a duplicate's insert finds its row, so its
handler is skipped), commit it, and only then commit the Kafka offsets, synchronously. A crash
anywhere in between re-reads records whose effects either rolled back with the transaction or
are found in the dedup table.

A handler that fails inside a batch rolls the whole batch back; the batch is then redone one
record at a time, each with the retry policy, so one bad record holds back nobody else. A
record that keeps failing is dead-lettered through the outbox in the same transaction that
marks it processed. Fetching, offsets and rebalances are ``consumer.group``'s.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any, Protocol

from sqlalchemy import Engine, create_engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool

from consumer.attempts import clear_attempts, give_back, mark_batch, start_attempt
from consumer.config import ConsumerConfig
from consumer.dead_lettering import publish_dead_letter
from consumer.deadletter import describe
from consumer.decoding import Item, prepare, ranges
from consumer.dedup import mark_processed, unmark_processed
from consumer.event import Event, EventTypes, Record
from consumer.group import Fetch, GroupMember, RebalanceListener, Stopped
from consumer.handling import (
    ENDED,
    AsyncTransactions,
    HandlerMisdeclared,
    SyncTransactions,
    Transaction,
    TransactionMisuse,
    Transactions,
    async_engine_for,
    handler_is_async,
)
from consumer.outcomes import (
    ConsumerDied,
    DeadLetterError,
    HandlerFailed,
    Outcome,
    as_exception,
)
from consumer.purge import PurgeSchedule, purge_processed
from consumer.retry import Action, Fault, Reason, classify, is_infrastructure_error
from consumer.startup import check_database, check_horizon, check_patterns, new_kafka_consumer
from consumer.stats import ConsumerStats
from outbox.db import SESSION_ENCODING, sqlalchemy_url
from outbox.tracing import restored_context

log = logging.getLogger("outbox.consumer")


class ConsumerCode(Protocol):
    """What the runner uses of the user's object (``IdempotentConsumer`` has all three)."""

    def handle(self, session: Any, event: Event) -> Any: ...

    def dedup_key(self, record: Record) -> str | None: ...

    def on_committed(self, events: Sequence[Event]) -> None: ...


class ConsumerRunner:
    """Runs one consumer group member for the user's ``code``; ``stop`` ends ``run()`` after
    the record in hand. ``fetch`` and ``listeners`` are ``consumer.group``'s seams."""

    def __init__(
        self,
        code: ConsumerCode,
        config: ConsumerConfig,
        db: str | Engine | AsyncEngine,
        *,
        stop: threading.Event | None = None,
        event_types: EventTypes | None = None,
        fetch: Fetch | None = None,
        listeners: Sequence[RebalanceListener] = (),
    ) -> None:
        self.code = code
        self.config = config
        self.event_types = event_types
        cls = type(code)
        is_async = handler_is_async(cls, code.handle)
        if isinstance(db, AsyncEngine):
            url = db.url.set(drivername="postgresql+psycopg")
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=2)
            self._owns_engine = True
        elif isinstance(db, Engine):
            self.engine, self._owns_engine = db, False
        else:
            self.engine = create_engine(
                sqlalchemy_url(db),
                pool_pre_ping=True,
                pool_size=2,
                connect_args={"client_encoding": SESSION_ENCODING},
            )
            self._owns_engine = True
        self.transactions: Transactions
        if not is_async:
            self.transactions = SyncTransactions(self.engine, code.handle, cls)
        elif isinstance(db, AsyncEngine):
            self.transactions = AsyncTransactions(db, code.handle, cls, owns=False)
        else:
            engine = async_engine_for(self.engine.url, pool_pre_ping=True, pool_size=2)
            self.transactions = AsyncTransactions(engine, code.handle, cls, owns=True)
        self.stop = stop if stop is not None else threading.Event()
        self.stats = ConsumerStats()
        self.group = GroupMember(config, self.stop, self.stats)
        self.group.fetch = fetch
        self.group.listeners.extend(listeners)
        self._purge = PurgeSchedule(config.purge_interval)

    # -- operations ----------------------------------------------------------------

    @property
    def assignment(self) -> frozenset[tuple[str, int]]:
        return self.group.assignment

    @property
    def joined(self) -> bool:
        return self.group.joined

    def liveness(self) -> tuple[bool, str]:
        """Alive until stopped; says so when a record waits (its partitions paused, still
        polling: the member keeps its place in the group)."""
        if self.stop.is_set():
            return False, "stopping"
        waiting = self.group.waiting_since
        if waiting is not None:
            return (
                True,
                f"running; a record waits to be retried ({time.monotonic() - waiting:.0f} s)",
            )
        return True, "running"

    def readiness(self) -> tuple[bool, str]:
        return self.group.readiness()

    def lag(self) -> dict[tuple[str, int], int]:
        return self.group.lag()

    def close(self) -> None:
        """Release the engines and the event loop a runner that never ran holds (one built
        for ``consumer.testing.deliver``); ``run()`` does this itself."""
        self.transactions.close()
        if self._owns_engine:
            self.engine.dispose()

    # -- the loop ------------------------------------------------------------------

    def run(self) -> ConsumerStats:
        """Consume until ``stop`` is set; returns the counters."""
        group = self.group
        plan = self.config.plan()
        for warning in plan.warnings:
            log.warning("%s", warning)
        try:
            check_database(self.engine, self.transactions)
            settings: dict[str, Any] = dict(plan.settings)
            settings["error_cb"] = group.on_kafka_error
            settings["logger"] = group.librdkafka_log
            group.kafka = new_kafka_consumer(settings)
            check_horizon(self.config, plan.settings, group.librdkafka_log)
            check_patterns(self.config, group.kafka)
        except BaseException:
            self.close()
            raise
        group.subscribe()
        log.info(
            "consumer group %r: consuming %s (batches of %d); waiting for a partition assignment",
            self.config.group_id,
            ", ".join(self.config.topics),
            self.config.batch_size,
        )
        try:
            while not self.stop.is_set():
                if group.refused is not None:
                    raise group.refused
                self._maybe_purge()
                records = group.next_records()
                if records:
                    self._process(records)
                group.commit_offsets()
        finally:
            try:
                group.commit_offsets()  # only records whose DB transaction committed
            finally:
                group.kafka.close()  # leaves the group; on_revoke commits anything left
                group.kafka = None
                self.close()
        log.info(
            "consumer group %r stopped: %d applied, %d duplicates skipped, %d dead-lettered",
            self.config.group_id,
            self.stats.applied,
            self.stats.duplicates,
            self.stats.dead_lettered,
        )
        return self.stats

    async def run_async(self) -> ConsumerStats:
        """``run()`` for an application's own event loop (e.g. a FastAPI lifespan task).

        The loop runs in a worker thread (librdkafka and the dedup transactions block), so the
        application's loop stays free; an ``async def handle`` is awaited on the runner's own
        event loop in that thread. Cancelling the task sets ``stop`` and waits for the record
        in hand to finish, then re-raises the cancellation.
        """
        task = asyncio.ensure_future(asyncio.to_thread(self.run))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self.stop.set()
            await asyncio.wait([task])
            raise

    def prepare(self, record: Record) -> Item:
        """The record's dedup key and decoded event (or why it cannot be handled)."""
        return prepare(
            record, self.code.dedup_key, self.event_types, self.config.default_content_type
        )

    def _process(self, records: list[Record]) -> None:
        items = [self.prepare(r) for r in records]
        first_errors: dict[int, Exception] = {}
        unfinished = self._mark(items)
        if unfinished:
            log.warning(
                "records of %s were being handled when a consumer stopped without finishing "
                "them (killed, out of memory?): handling them one at a time",
                ", ".join(f"{t}/{p}" for t, p in sorted(unfinished)),
            )
        if unfinished == set():
            try:
                self._apply_batch(items)
                return
            except HandlerMisdeclared:
                raise
            except HandlerFailed as failed:
                # The guard checked every earlier handler's transaction: this failure is the
                # record's own (I11), so it counts as its first attempt.
                first_errors[failed.index] = failed.error
                reason = describe(failed.error)
                if isinstance(failed.error, TransactionMisuse) and str(failed.error) == ENDED:
                    self._undo_ended(items[failed.index :], failed.fresh)
            except Exception as exc:  # the commit or the database failed
                if not is_infrastructure_error(exc):
                    log.debug("batch failed", exc_info=True)
                reason = describe(exc)
            if len(items) > 1:
                self.stats.fallbacks += 1
                log.warning(
                    "a batch of %d failed (%s); redoing it one record at a time",
                    len(items),
                    reason,
                )
        try:
            for i, item in enumerate(items):
                if self.stop.is_set():
                    return
                if (item.record.topic, item.record.partition) not in self.group.assignment:
                    continue  # revoked while an earlier record waited: its new owner reads it
                self._apply_one(item, first_errors.get(i))
        except Stopped:
            return

    def _undo_ended(self, unfinished: Sequence[Item], fresh: frozenset[str]) -> None:
        """A handler committed the transaction through SQL: the dedup rows that transaction
        inserted for records whose handler had not finished (its own included) committed with
        it. Delete those (never a row an earlier transaction committed), so the records are
        handled again rather than skipped as duplicates; its own partial effects stay."""
        keys = [item.key for item in unfinished if item.key in fresh]
        if not keys:
            return
        while True:
            try:
                unmark_processed(self.engine, self.config.group_id, keys)
                return
            except Exception as exc:
                if not is_infrastructure_error(exc):
                    raise
                self.group.sleep(max(0.1, self.config.retry.backoff(1)))

    def _mark(self, items: list[Item]) -> set[tuple[str, int]] | None:
        """Mark the batch as started (it survives a process death); returns the partitions
        where an earlier run never finished, or None when the database is unavailable."""
        try:
            return mark_batch(self.engine, self.config.group_id, ranges(items))
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            log.warning("cannot mark a batch as started (%s)", describe(exc).splitlines()[0])
            return None

    def _apply_batch(self, items: list[Item]) -> None:
        """All records in ONE transaction with their dedup records (the fast path)."""
        outcomes: list[Outcome] = []
        group = self.config.group_id
        with self.transactions.open() as tx:
            new = tx.run(lambda s: mark_processed(s, group, (i.key for i in items)))
            fresh = frozenset(new)
            for index, item in enumerate(items):
                if item.key not in new:
                    outcomes.append(Outcome.DUPLICATE)
                    continue
                new.discard(item.key)  # a second copy in the same batch is a duplicate
                if item.event is None:
                    assert item.error is not None
                    outcomes.append(self._dead_letter(tx, item, item.error, 0, Reason.UNDECODABLE))
                    continue
                try:
                    with restored_context(item.event.headers):
                        tx.handle(item.event)
                except HandlerMisdeclared:
                    raise
                except BaseException as exc:
                    raise HandlerFailed(index, as_exception(exc), fresh) from exc
                outcomes.append(Outcome.APPLIED)
            done = ranges(items)
            tx.run(lambda s: clear_attempts(s, group, done))
        self._committed(items, outcomes)

    def _apply_one(self, item: Item, first_error: Exception | None) -> None:
        """One record in its own transaction, with retries, then the dead letter (I7)."""
        if item.event is None:
            assert item.error is not None
            self._dead_letter_alone(item, item.error, 0, Reason.UNDECODABLE)
            return
        failures = 0  # attempts that failed or never finished (earlier runs included)
        outages = 0
        given_back = 0  # the last attempt ended by a transient fault, not given back yet
        stuck_since: float | None = None  # first timeout/resource error in a row
        error = first_error
        record = item.record
        group = self.config.group_id
        tp = (record.topic, record.partition)
        try:
            while True:
                if error is not None:
                    fault = classify(error)
                    if fault is Fault.AMBIGUOUS:
                        stuck_since = stuck_since or time.monotonic()
                    else:
                        stuck_since = None
                    decision = self.config.retry.decide(
                        error,
                        failures,
                        outages,
                        stuck_for=0.0 if stuck_since is None else time.monotonic() - stuck_since,
                        database_healthy=self._database_healthy,
                    )
                    if decision.counted:
                        failures += 1
                        outages = 0
                    else:
                        outages += 1
                        if given_back and self._give_back(record):
                            given_back = 0
                    if decision.action is Action.DEAD_LETTER:
                        assert decision.reason is not None
                        self._dead_letter_alone(item, error, failures, decision.reason)
                        return
                    self._log_retry(item, error, failures, decision.counted, decision.delay)
                    self.group.sleep(decision.delay)
                    if tp not in self.group.assignment:
                        return  # revoked while waiting: the new owner handles it
                self.group.check_stop()
                try:
                    started = start_attempt(
                        self.engine,
                        group,
                        record.topic,
                        record.partition,
                        record.offset,
                        given_back,
                    )
                except Exception as exc:
                    if not is_infrastructure_error(exc):
                        raise
                    error = exc
                    continue
                given_back = 0
                earlier = started - 1
                if earlier > failures and earlier >= self.config.retry.attempts:
                    died = ConsumerDied(
                        f"{earlier} attempt(s) at this record started and never finished "
                        "(the consumer process died or was stopped in them)"
                    )
                    self._dead_letter_alone(item, died, earlier, Reason.CONSUMER_DIED)
                    return
                failures = max(failures, earlier)
                try:
                    with self.transactions.open() as tx:
                        if tx.run(lambda s: mark_processed(s, group, [item.key])):
                            with restored_context(item.event.headers):
                                tx.handle(item.event)
                            outcome = Outcome.APPLIED
                        else:
                            outcome = Outcome.DUPLICATE
                        tx.run(lambda s: clear_attempts(s, group, ranges([item])))
                except HandlerMisdeclared:
                    raise
                except BaseException as exc:
                    error = as_exception(exc)
                    if isinstance(error, TransactionMisuse) and str(error) == ENDED:
                        self._undo_ended([item], frozenset([item.key]))
                    given_back = int(classify(error) is not Fault.RECORD)
                    continue
                self._committed([item], [outcome])
                return
        except Stopped:
            if given_back:
                self._give_back(record)  # stopped during the backoff: not charged either
            raise

    def _give_back(self, record: Record) -> bool:
        """Give back the attempt a transient fault ended (the record is not charged for it);
        False when the database cannot be reached (the next attempt gives it back)."""
        try:
            give_back(
                self.engine, self.config.group_id, record.topic, record.partition, record.offset
            )
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            return False
        return True

    def _database_healthy(self) -> bool:
        """Whether a fresh connection answers at once: a timeout or resource error while it
        does is the record's (a probe through the pool could reuse a sick connection)."""
        probe = create_engine(
            self.engine.url, poolclass=NullPool, connect_args={"connect_timeout": 5}
        )
        try:
            with probe.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except Exception:
            return False
        finally:
            probe.dispose()
        return True

    def _log_retry(
        self, item: Item, error: Exception, failures: int, counted: bool, delay: float
    ) -> None:
        where = f"{item.record.position} (event {item.key})"
        if counted:
            self.stats.retries += 1
            log.warning(
                "%s: handler failed (attempt %d of %d): %s; retrying in %.2fs",
                where,
                failures,
                self.config.retry.attempts,
                describe(error),
                delay,
            )
        else:
            self.stats.outages += 1
            log.warning(
                "%s: database unavailable (%s); retrying in %.2fs",
                where,
                describe(error).splitlines()[0],
                delay,
            )

    def _dead_letter_alone(
        self, item: Item, error: BaseException, attempts: int, reason: Reason
    ) -> None:
        """Dead-letter in a transaction of its own; database outages are waited out."""
        outages = 0
        group = self.config.group_id
        while True:
            if self.stop.is_set():
                raise Stopped()
            try:
                with self.transactions.open() as tx:
                    if tx.run(lambda s: mark_processed(s, group, [item.key])):
                        outcome = self._dead_letter(tx, item, error, attempts, reason)
                    else:
                        outcome = Outcome.DUPLICATE
                    tx.run(lambda s: clear_attempts(s, group, ranges([item])))
            except Exception as exc:
                if not is_infrastructure_error(exc):
                    raise DeadLetterError(
                        f"cannot dead-letter {item.record.position} (event {item.key}): "
                        f"{describe(exc)}"
                    ) from exc
                outages += 1
                delay = max(0.1, self.config.retry.backoff(outages))  # drawn once: jittered
                self._log_retry(item, exc, attempts, False, delay)
                self.group.sleep(delay)
                continue
            self._committed([item], [outcome])
            return

    def _dead_letter(
        self, tx: Transaction, item: Item, error: BaseException, attempts: int, reason: Reason
    ) -> Outcome:
        """Publish the dead letter through the outbox, in the transaction marking it processed;
        a record of a dead-letter topic is only logged (a regex subscription matching its own
        dead-letter topics would otherwise dead-letter forever, one new topic a round)."""
        record = item.record
        if record.topic.endswith(self.config.dead_letter_suffix):
            log.error(
                "%s (event %s) of a dead-letter topic failed after %d attempt(s), %s: %s; "
                "marked processed, not dead-lettered again",
                record.position,
                item.key,
                attempts,
                reason.value,
                describe(error),
            )
            return Outcome.NOT_DEAD_LETTERED
        config = self.config
        tx.run(lambda s: publish_dead_letter(s, config, item, error, attempts, reason))
        return Outcome.DEAD_LETTERED

    def _committed(self, items: Sequence[Item], outcomes: Sequence[Outcome]) -> None:
        """The DB transaction committed: count, remember offsets to commit, tell the hook."""
        self.stats.transactions += 1
        applied = []
        for item, outcome in zip(items, outcomes, strict=True):
            if outcome is Outcome.APPLIED:
                self.stats.applied += 1
                assert item.event is not None
                applied.append(item.event)
            elif outcome is Outcome.DUPLICATE:
                self.stats.duplicates += 1
                log.debug("%s: event %s already processed; skipped", item.record.position, item.key)
            elif outcome is Outcome.NOT_DEAD_LETTERED:
                self.stats.not_dead_lettered += 1
            else:
                self.stats.dead_lettered += 1
            self.group.settled(item.record)
        if applied:
            try:
                self.code.on_committed(applied)
            except Exception:
                log.exception("on_committed() raised; ignored (the events are committed)")

    def _maybe_purge(self) -> None:
        window = self.config.dedup_window
        now = time.monotonic()
        if window is None or not self._purge.due(now):
            return
        try:
            deleted, finished = purge_processed(
                self.engine,
                self.config.group_id,
                window,
                batch_size=self.config.purge_batch_size,
                max_batches=self.config.purge_max_batches,
                stop=self.stop,
            )
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            log.warning("purge of dedup records skipped: %s", describe(exc).splitlines()[0])
            deleted, finished = 0, True
        self.stats.purged += deleted
        if deleted:
            log.info("purged %d dedup records older than %s", deleted, window)
        self._purge.ran(time.monotonic(), finished=finished)
