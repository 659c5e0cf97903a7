"""The deduplicating consumer: exactly-once effects from at-least-once delivery (I5, I7).

One loop, one thread: ``consume()`` up to ``batch_size`` records, apply them in
ONE database transaction that also inserts their dedup records (a duplicate's
insert finds its row, so its handler is skipped), commit it, and only then
commit the Kafka offsets, synchronously. A crash anywhere in between re-reads
records whose effects either rolled back with the transaction or are found in
the dedup table.

A handler that fails inside a batch rolls the whole batch back; the batch is
then redone one record at a time, each with the retry policy, so one bad
record holds back nobody else. A record that keeps failing is dead-lettered
through the outbox in the same transaction that marks it processed.

Rebalance callbacks only run inside ``consume()``/``close()``: the revoke
callback commits what is still pending for the revoked partitions, and records
of theirs fetched by an earlier ``consume()`` of the same batch are dropped
before anything is applied, so nothing of a revoked partition is processed or
committed after the revoke (I10).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from types import EllipsisType
from typing import Any, ClassVar

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from sqlalchemy import Engine, create_engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from consumer.attempts import (
    CHECK_ATTEMPTS_TABLE,
    clear_attempts,
    give_back,
    mark_batch,
    start_attempt,
)
from consumer.config import (
    DEFAULT_DEDUP_WINDOW,
    ConsumerConfig,
    admin_settings,
    horizon_warning,
    parse_topics,
)
from consumer.deadletter import (
    dead_letter_headers,
    dead_letter_id,
    describe,
    lean_dead_letter_headers,
)
from consumer.dedup import CHECK_TABLE, mark_processed, normalise_key, unmark_processed
from consumer.event import (
    Event,
    EventTypes,
    Record,
    UndecodableEvent,
    decode_event,
    outbox_event_id,
)
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
from consumer.purge import PurgeSchedule, purge_processed
from consumer.retry import (
    Action,
    Fault,
    Reason,
    RetryPolicy,
    classify,
    is_infrastructure_error,
    sqlstate,
)
from consumer.throttle import ThrottledLog
from outbox.codec import JSON
from outbox.db import redact, sqlalchemy_url
from outbox.errors import ConfigError, EventTooLarge, NotMigrated, OutboxError
from outbox.publish import publish
from outbox.tracing import restored_context

log = logging.getLogger("outbox.consumer")


HORIZON_TIMEOUT = 5.0
"""Seconds to wait for the broker's topic configs at start (the dedup window check)."""

BATCH_LINGER = 0.005
"""Seconds a started batch waits for more records: the consumer's linger.ms."""


_REFUSED_CREDENTIALS = frozenset(
    {KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED, KafkaError._SSL}
)
"""librdkafka errors that say the cluster refuses who we are: retrying cannot help."""


class DeadLetterError(OutboxError):
    """A record could not even be dead-lettered (e.g. an illegal DLT topic): the consumer stops."""


class ConsumerDied(Exception):
    """The error of a record whose attempts were used up by runs that never finished."""


class _Stopped(Exception):
    """Stop was requested while waiting; the record in hand is left for the next run."""


class _HandlerFailed(Exception):
    """The handler of ``items[index]`` failed inside a batch (never calls ``str(error)``,
    which may raise)."""

    def __init__(self, index: int, error: Exception, fresh: frozenset[str]) -> None:
        super().__init__(f"handler failed: {type(error).__name__}")
        self.index = index
        self.error = error
        self.fresh = fresh  # the keys this batch's transaction recorded as processed


_ENDS_RUN = (KeyboardInterrupt, SystemExit)
"""What a handler raises that ends run(); anything else it raises is the record's failure."""


def _as_exception(exc: BaseException) -> Exception:
    """A handler's failure as an Exception (a BaseException subclass of the user's, an
    ``asyncio.CancelledError`` of its own, wrapped)."""
    if isinstance(exc, _ENDS_RUN):
        raise exc
    if isinstance(exc, Exception):
        return exc
    wrapped = RuntimeError(f"handle() raised {type(exc).__name__}: {describe(exc)}")
    wrapped.__cause__ = exc
    return wrapped


class Outcome(Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    DEAD_LETTERED = "dead-lettered"
    NOT_DEAD_LETTERED = "not-dead-lettered"  # a record of a dead-letter topic failed


@dataclass(slots=True)
class ConsumerStats:
    """Counters of one consumer (read by the demo, the CLI and tests; written by its loop only)."""

    applied: int = 0  # handler ran and its transaction committed
    duplicates: int = 0  # skipped: the dedup record was already there
    dead_lettered: int = 0  # sent to <topic>.DLT through the outbox
    retries: int = 0  # handler re-runs after a failure of the record
    outages: int = 0  # database failures retried without counting against the record
    transactions: int = 0  # database transactions committed
    fallbacks: int = 0  # batches redone one record at a time
    not_dead_lettered: int = 0  # failed records of a dead-letter topic: marked processed, logged
    offset_commits: int = 0
    purged: int = 0  # dedup records purged


@dataclass(slots=True)
class _Item:
    record: Record
    key: str
    event: Event | None
    error: UndecodableEvent | None


class IdempotentConsumer:
    """Subclass it, set ``topics`` and ``group_id``, implement ``handle``, call ``run()``.

    ``handle(session, event)`` runs inside the database transaction that also
    records ``event.id`` as processed for ``group_id``; write through
    ``session`` (and ``outbox.publish(session, ...)`` for downstream events) and
    never commit it yourself. Class attributes give the defaults; the
    constructor's keyword arguments override them per instance. ``stop`` is a
    ``threading.Event``: set it (the CLI does on SIGTERM/SIGINT) and ``run()``
    returns after the record in hand.
    """

    topics: ClassVar[Sequence[str]] = ()
    group_id: ClassVar[str] = ""
    batch_size: ClassVar[int] = 100
    retry: ClassVar[RetryPolicy] = RetryPolicy()
    event_types: ClassVar[EventTypes | None] = None
    dedup_window: ClassVar[timedelta | None] = DEFAULT_DEDUP_WINDOW
    purge_interval: ClassVar[float] = 600.0
    consumer_settings: ClassVar[Mapping[str, str]] = {}
    default_content_type: ClassVar[str] = JSON

    def __init__(
        self,
        db: str | Engine | AsyncEngine,
        bootstrap_servers: str,
        *,
        topics: Sequence[str] | None = None,
        group_id: str | None = None,
        batch_size: int | None = None,
        retry: RetryPolicy | None = None,
        settings: Mapping[str, str] | None = None,
        dedup_window: timedelta | EllipsisType | None = ...,
        purge_interval: float | None = None,
        poll_timeout: float = 1.0,
        stop: threading.Event | None = None,
    ) -> None:
        cls = type(self)
        if cls.handle is IdempotentConsumer.handle:
            raise ConfigError(
                f"{cls.__qualname__} does not implement handle(self, session, event): "
                "override it with the code that applies one event"
            )
        self.config = ConsumerConfig(
            bootstrap_servers=bootstrap_servers,
            topics=parse_topics(topics if topics is not None else cls.topics),
            group_id=group_id if group_id is not None else cls.group_id,
            batch_size=batch_size if batch_size is not None else cls.batch_size,
            poll_timeout=poll_timeout,
            retry=retry if retry is not None else cls.retry,
            settings={**cls.consumer_settings, **(settings or {})},
            dedup_window=(
                cls.dedup_window if isinstance(dedup_window, EllipsisType) else dedup_window
            ),
            purge_interval=purge_interval if purge_interval is not None else cls.purge_interval,
            default_content_type=cls.default_content_type,
        )
        if cls.event_types is not None and not isinstance(cls.event_types, EventTypes):
            raise ConfigError(f"{cls.__qualname__}.event_types must be an EventTypes registry")
        is_async = handler_is_async(cls, cls.handle)
        if isinstance(db, AsyncEngine):
            url = db.url.set(drivername="postgresql+psycopg")
            self.engine = create_engine(url, pool_pre_ping=True, pool_size=2)
            self._owns_engine = True
        elif isinstance(db, Engine):
            self.engine, self._owns_engine = db, False
        else:
            self.engine = create_engine(sqlalchemy_url(db), pool_pre_ping=True, pool_size=2)
            self._owns_engine = True
        self._transactions: Transactions
        if not is_async:
            self._transactions = SyncTransactions(self.engine, self.handle, cls)
        elif isinstance(db, AsyncEngine):
            self._transactions = AsyncTransactions(db, self.handle, cls, owns=False)
        else:
            engine = async_engine_for(self.engine.url, pool_pre_ping=True, pool_size=2)
            self._transactions = AsyncTransactions(engine, self.handle, cls, owns=True)
        self.stop = stop if stop is not None else threading.Event()
        self.stats = ConsumerStats()
        self.assignment: frozenset[tuple[str, int]] = frozenset()
        self.joined = False
        self._pending: dict[tuple[str, int], int] = {}
        self._kafka: Any = None
        self._purge = PurgeSchedule(self.config.purge_interval)
        # A broker outage: one line per backoff step, not one per failed connection.
        self._librdkafka_log = ThrottledLog(logging.getLogger("outbox.librdkafka"))
        self._kafka_errors = ThrottledLog(log)
        self._refused: ConfigError | None = None  # credentials the cluster refuses (I8)
        self._waiting_since: float | None = None  # a record waits, its partitions paused

    # -- the user's part ---------------------------------------------------------

    def handle(self, session: Any, event: Event) -> Awaitable[None] | None:
        """Apply one event through ``session`` (inside the dedup transaction). Override this.

        ``def handle(self, session: Session, event)`` gets a ``Session``;
        ``async def handle(self, session: AsyncSession, event)`` gets an ``AsyncSession`` on
        the same database, and is awaited. Never commit, roll back or swallow a database
        error without a savepoint (``session.begin_nested()``): the event then fails.
        """
        raise NotImplementedError

    def dedup_key(self, record: Record) -> str | None:
        """The dedup key of a record that did not come through the outbox (no ``outbox-event-id``).

        Override for other producers' records (e.g. return a message-id header);
        None falls back to ``topic/partition/offset``, which only catches re-reads
        of the same record, not the same event produced twice.
        """
        return None

    def on_committed(self, events: Sequence[Event]) -> None:
        """Called after the DB transaction that applied ``events`` committed, before the
        Kafka offsets are committed (metrics, cache invalidation). Must not raise."""

    def close(self) -> None:
        """Release the engines and the event loop a consumer that never ran holds (one built
        by ``consumer.testing.consumer_for_tests``); ``run()`` does this itself."""
        self._transactions.close()
        if self._owns_engine:
            self.engine.dispose()

    # -- operations ----------------------------------------------------------------

    def liveness(self) -> tuple[bool, str]:
        """Alive until stopped; says so when a record waits (its partitions paused, still
        polling: the member keeps its place in the group)."""
        if self.stop.is_set():
            return False, "stopping"
        waiting = self._waiting_since
        if waiting is not None:
            return (
                True,
                f"running; a record waits to be retried ({time.monotonic() - waiting:.0f} s)",
            )
        return True, "running"

    def readiness(self) -> tuple[bool, str]:
        """Ready once it joined its group (a member may legitimately own no partition)."""
        if self._kafka is None or not self.joined:
            return False, "joining the consumer group"
        return True, f"assigned {len(self.assignment)} partitions"

    def lag(self) -> dict[tuple[str, int], int]:
        """Records behind per assigned partition, from librdkafka's cached watermarks."""
        kafka = self._kafka
        if kafka is None:
            return {}
        from confluent_kafka import TopicPartition

        out: dict[tuple[str, int], int] = {}
        try:
            for tp in kafka.position([TopicPartition(t, p) for t, p in self.assignment]):
                _low, high = kafka.get_watermark_offsets(tp, cached=True)
                if tp.offset >= 0 and high >= 0:
                    out[(tp.topic, tp.partition)] = max(0, high - tp.offset)
        except Exception:
            return out
        return out

    # -- the loop ------------------------------------------------------------------

    def run(self) -> ConsumerStats:
        """Consume until ``stop`` is set; returns the counters."""
        plan = self.config.plan()
        for warning in plan.warnings:
            log.warning("%s", warning)
        try:
            self._check_database()
            self._kafka = self._new_consumer(plan.settings)
            self._check_horizon(plan.settings)
            self._check_patterns()
        except BaseException:
            self._transactions.close()
            if self._owns_engine:
                self.engine.dispose()
            raise
        self._kafka.subscribe(
            list(self.config.topics),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )
        log.info(
            "consumer group %r: consuming %s (batches of %d); waiting for a partition assignment",
            self.config.group_id,
            ", ".join(self.config.topics),
            self.config.batch_size,
        )
        try:
            while not self.stop.is_set():
                if self._refused is not None:
                    raise self._refused
                self._maybe_purge()
                messages = self._next_batch()
                records = self._owned(self._records(messages))
                if records:
                    self._process(records)
                self._commit_offsets()
        finally:
            try:
                self._commit_offsets()  # only records whose DB transaction committed
            finally:
                self._kafka.close()  # leaves the group; on_revoke commits anything left
                self._kafka = None
                self._transactions.close()
                if self._owns_engine:
                    self.engine.dispose()
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
        application's loop stays free; an ``async def handle`` is awaited on the consumer's own
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

    def _check_patterns(self) -> None:
        """Warn when a regex subscription also matches its own dead-letter topics: their
        records are consumed too (they are never dead-lettered again, see ``_dead_letter``)."""
        suffix = self.config.dead_letter_suffix
        patterns = [t for t in self.config.topics if t.startswith("^")]
        if not patterns:
            return
        try:
            names = list(self._kafka.list_topics(timeout=HORIZON_TIMEOUT).topics)
        except Exception:
            names = []
        for pattern in patterns:
            try:
                regex = re.compile(pattern)
            except re.error:
                continue  # librdkafka's regex dialect: it reports its own errors
            matched = [n for n in names if regex.search(n) and not n.endswith(suffix)]
            samples = matched or [pattern.lstrip("^").split(".*")[0].rstrip("\\$") or "topic"]
            if any(regex.search(name + suffix) for name in samples):
                log.warning(
                    "the subscription %r also matches its own dead-letter topics (%s): their "
                    "records are consumed by this group too; a failing one is logged and marked "
                    "processed, never dead-lettered again. Anchor the pattern so that it cannot "
                    "match %r, or list the topics",
                    pattern,
                    samples[0] + suffix,
                    suffix,
                )

    def _next_batch(self) -> list[Any]:
        """Up to batch_size records without waiting for a full batch.

        librdkafka's consume(n, timeout) waits until n records arrived or the
        timeout ran out, which adds up to poll_timeout of latency at low rates: take
        what is already fetched, and block only for the first record.
        """
        size = self.config.batch_size
        messages: list[Any] = self._kafka.consume(num_messages=size, timeout=0)
        if not messages:
            messages = self._kafka.consume(num_messages=1, timeout=self.config.poll_timeout)
        if messages and len(messages) < size:
            # A short linger fills the batch under load (throughput) and costs at most
            # BATCH_LINGER of latency when the topic is quiet.
            messages += self._kafka.consume(num_messages=size - len(messages), timeout=BATCH_LINGER)
        return messages

    def _new_consumer(self, plan_settings: Mapping[str, str]) -> Any:
        settings: dict[str, Any] = dict(plan_settings)
        settings["error_cb"] = self._on_kafka_error
        settings["logger"] = self._librdkafka_log
        try:
            return Consumer(settings)
        except KafkaException as exc:
            raise ConfigError(
                f"librdkafka refused the consumer settings: {exc.args[0].str()} "
                "(check the -X / consumer_settings names and values)"
            ) from None

    def _check_database(self) -> None:
        """Fail before joining the group when the database or the dedup table is missing (I8)."""
        for table, check in (
            ("outbox_processed_events", CHECK_TABLE),
            ("outbox_consumer_attempts", CHECK_ATTEMPTS_TABLE),
        ):
            self._check_table(table, check)
        self._check_transactions()

    def _check_transactions(self) -> None:
        """Refuse an engine without transactions (AUTOCOMMIT): the dedup rows would commit
        before the handler ran, and a failing handler would leave half its effects (I11)."""
        if self._transactions.autocommit():
            raise ConfigError(
                "the consumer's engine runs in AUTOCOMMIT (isolation_level='AUTOCOMMIT'): each "
                "event's effects and its dedup record must commit in one transaction; pass an "
                "engine without isolation_level='AUTOCOMMIT' (e.g. create_engine(url))"
            )

    def _check_horizon(self, settings: Mapping[str, str]) -> None:
        """Warn when the dedup window is shorter than a topic's redelivery horizon, as the
        broker reports it; a broker that does not say (or is down) is logged, not fatal."""
        topics = [t for t in self.config.topics if not t.startswith("^")]
        if self.config.dedup_window is None or not topics:
            return
        from confluent_kafka.admin import AdminClient
        from confluent_kafka.admin._config import ConfigResource

        admin_config: dict[str, Any] = admin_settings(settings)
        admin_config["logger"] = self._librdkafka_log
        try:
            admin = AdminClient(admin_config)
            futures = admin.describe_configs([ConfigResource("topic", t) for t in topics])
            for resource, future in futures.items():
                entries = future.result(timeout=HORIZON_TIMEOUT)
                configs = {name: entry.value for name, entry in entries.items()}
                warning = horizon_warning(resource.name, self.config.dedup_window, configs)
                if warning is not None:
                    log.warning("%s", warning)
                elif "retention.ms" not in configs:
                    log.info(
                        "the broker did not report retention.ms of topic %r: "
                        "dedup_window=%s not checked against it",
                        resource.name,
                        self.config.dedup_window,
                    )
        except Exception as exc:
            log.info(
                "cannot read the topics' retention from the broker (%s): dedup_window not checked",
                describe(exc),
            )

    def _check_table(self, table: str, check: Any) -> None:
        try:
            with self.engine.connect() as conn:
                conn.execute(check)
        except sa_exc.ProgrammingError as exc:
            if sqlstate(exc) == "42P01":  # undefined_table
                raise NotMigrated(
                    f"table {table} does not exist in this database: run `outbox migrate` first"
                ) from None
            raise ConfigError(
                f"cannot read {table}: {redact(str(exc.orig))} "
                "(the consumer's database user needs SELECT, INSERT, UPDATE and DELETE on it)"
            ) from None
        except sa_exc.OperationalError as exc:
            raise ConnectionError(
                f"cannot connect to PostgreSQL: {redact(str(exc.orig))}"
            ) from None

    def _records(self, messages: Sequence[Any]) -> list[Record]:
        records = []
        for msg in messages:
            err = msg.error()
            if err is None:
                records.append(Record.from_kafka(msg))
            elif err.fatal():
                raise KafkaException(err)
            elif err.code() != KafkaError._PARTITION_EOF:
                self._kafka_errors.log(logging.WARNING, "kafka: %s", redact(str(err)))
        return records

    def _owned(self, records: list[Record]) -> list[Record]:
        """Only records of partitions still assigned: a revoke during one of the batch's
        consume() calls hands the others to another member, whose offsets ours would move
        backwards (I10). They are delivered again to whoever owns them now."""
        owned = [r for r in records if (r.topic, r.partition) in self.assignment]
        if len(owned) < len(records):
            log.info(
                "dropped %d fetched records of partitions revoked meanwhile",
                len(records) - len(owned),
            )
        return owned

    def _process(self, records: list[Record]) -> None:
        items = [self._prepare(r) for r in records]
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
            except _HandlerFailed as failed:
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
                if (item.record.topic, item.record.partition) not in self.assignment:
                    continue  # revoked while an earlier record waited: its new owner reads it
                self._apply_one(item, first_errors.get(i))
        except _Stopped:
            return

    def _undo_ended(self, unfinished: Sequence[_Item], fresh: frozenset[str]) -> None:
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
                self._sleep(max(0.1, self.config.retry.backoff(1)))

    def _mark(self, items: list[_Item]) -> set[tuple[str, int]] | None:
        """Mark the batch as started (it survives a process death); returns the partitions
        where an earlier run never finished, or None when the database is unavailable."""
        ranges: dict[tuple[str, int], tuple[int, int]] = {}
        for item in items:
            tp, offset = (item.record.topic, item.record.partition), item.record.offset
            first, last = ranges.get(tp, (offset, offset))
            ranges[tp] = (min(first, offset), max(last, offset))
        try:
            return mark_batch(
                self.engine,
                self.config.group_id,
                [(t, p, first, last) for (t, p), (first, last) in ranges.items()],
            )
        except Exception as exc:
            if not is_infrastructure_error(exc):
                raise
            log.warning("cannot mark a batch as started (%s)", describe(exc).splitlines()[0])
            return None

    def _prepare(self, record: Record) -> _Item:
        """Dedup key and decoded event; never raises: whatever a record's bytes make the
        decoders do, the item carries it as its error and is dead-lettered (I10)."""
        try:
            return self._decode(record)
        except Exception as exc:
            error = UndecodableEvent(f"cannot decode the record: {describe(exc)}")
            return _Item(record, normalise_key(record.position), None, error)

    def _decode(self, record: Record) -> _Item:
        key = outbox_event_id(record)
        key_error: UndecodableEvent | None = None
        if record.defect is not None:
            key_error = UndecodableEvent(record.defect)
        elif key is None:
            try:
                key = self.dedup_key(record)
            except Exception as exc:
                key_error = UndecodableEvent(f"dedup_key() failed: {describe(exc)}")
            if key is not None and not isinstance(key, str):
                key_error = UndecodableEvent(
                    f"dedup_key() returned {type(key).__name__}, not str or None"
                )
                key = None
        key = normalise_key(key or record.position)
        if key_error is not None:
            return _Item(record, key, None, key_error)
        try:
            event = decode_event(
                record,
                key,
                types=type(self).event_types,
                default_content_type=self.config.default_content_type,
            )
        except UndecodableEvent as exc:
            return _Item(record, key, None, exc)
        return _Item(record, key, event, None)

    def _apply_batch(self, items: list[_Item]) -> None:
        """All records in ONE transaction with their dedup records (the fast path)."""
        outcomes: list[Outcome] = []
        group = self.config.group_id
        with self._transactions.open() as tx:
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
                    raise _HandlerFailed(index, _as_exception(exc), fresh) from exc
                outcomes.append(Outcome.APPLIED)
            ranges = _ranges(items)
            tx.run(lambda s: clear_attempts(s, group, ranges))
        self._committed(items, outcomes)

    def _apply_one(self, item: _Item, first_error: Exception | None) -> None:
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
                    self._sleep(decision.delay)
                    if tp not in self.assignment:
                        return  # revoked while waiting: the new owner handles it
                self._check_stop()
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
                    with self._transactions.open() as tx:
                        if tx.run(lambda s: mark_processed(s, group, [item.key])):
                            with restored_context(item.event.headers):
                                tx.handle(item.event)
                            outcome = Outcome.APPLIED
                        else:
                            outcome = Outcome.DUPLICATE
                        tx.run(lambda s: clear_attempts(s, group, _ranges([item])))
                except HandlerMisdeclared:
                    raise
                except BaseException as exc:
                    error = _as_exception(exc)
                    if isinstance(error, TransactionMisuse) and str(error) == ENDED:
                        self._undo_ended([item], frozenset([item.key]))
                    given_back = int(classify(error) is not Fault.RECORD)
                    continue
                self._committed([item], [outcome])
                return
        except _Stopped:
            if given_back:
                self._give_back(record)  # stopped during the backoff: not charged either
            raise

    def _check_stop(self) -> None:
        if self.stop.is_set():
            raise _Stopped()

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
        self, item: _Item, error: Exception, failures: int, counted: bool, delay: float
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

    def _sleep(self, seconds: float) -> None:
        """Wait, polling Kafka with every assigned partition paused: the member keeps its
        place in the group (max.poll.interval.ms) however long a record waits (I10)."""
        kafka = self._kafka
        if kafka is None:
            if self.stop.wait(seconds):
                raise _Stopped()
            return
        deadline = time.monotonic() + seconds
        self._waiting_since = self._waiting_since or time.monotonic()
        kafka.pause([TopicPartition(t, p) for t, p in self.assignment])
        try:
            while True:
                if self.stop.is_set():
                    raise _Stopped()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                for msg in kafka.consume(num_messages=100, timeout=min(remaining, 0.5)):
                    if msg.error() is None:  # a partition assigned meanwhile: read it later
                        self._rewind(msg)
        finally:
            self._waiting_since = None
            if self._kafka is not None:
                self._kafka.resume([TopicPartition(t, p) for t, p in self.assignment])

    def _rewind(self, msg: Any) -> None:
        tp = TopicPartition(msg.topic(), msg.partition(), msg.offset())
        try:
            self._kafka.seek(tp)
            self._kafka.pause([tp])
        except KafkaException as exc:
            log.warning("cannot rewind %s/%d: %s", msg.topic(), msg.partition(), exc)

    def _dead_letter_alone(
        self, item: _Item, error: BaseException, attempts: int, reason: Reason
    ) -> None:
        """Dead-letter in a transaction of its own; database outages are waited out."""
        outages = 0
        group = self.config.group_id
        while True:
            if self.stop.is_set():
                raise _Stopped()
            try:
                with self._transactions.open() as tx:
                    if tx.run(lambda s: mark_processed(s, group, [item.key])):
                        outcome = self._dead_letter(tx, item, error, attempts, reason)
                    else:
                        outcome = Outcome.DUPLICATE
                    tx.run(lambda s: clear_attempts(s, group, _ranges([item])))
            except Exception as exc:
                if not is_infrastructure_error(exc):
                    raise DeadLetterError(
                        f"cannot dead-letter {item.record.position} (event {item.key}): "
                        f"{describe(exc)}"
                    ) from exc
                outages += 1
                delay = max(0.1, self.config.retry.backoff(outages))  # drawn once: jittered
                self._log_retry(item, exc, attempts, False, delay)
                self._sleep(delay)
                continue
            self._committed([item], [outcome])
            return

    def _dead_letter(
        self, tx: Transaction, item: _Item, error: BaseException, attempts: int, reason: Reason
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
        tx.run(lambda s: self._publish_dead_letter(s, item, error, attempts, reason))
        return Outcome.DEAD_LETTERED

    def _publish_dead_letter(
        self, session: Session, item: _Item, error: BaseException, attempts: int, reason: Reason
    ) -> None:
        record = item.record
        topic = self.config.dead_letter_topic(record.topic)
        headers = dead_letter_headers(
            record,
            group_id=self.config.group_id,
            key=item.key,
            error=error,
            attempts=attempts,
            reason=reason,
        )
        event_id = dead_letter_id(self.config.group_id, item.key)
        try:
            publish(
                session,
                topic=topic,
                key=record.key,
                value=record.value,
                headers=headers,
                event_id=event_id,
            )
        except EventTooLarge as exc:
            # A record near the broker's limit does not fit with the dead letter's headers
            # (or the broker allows more than publish()): dead-letter it without its payload,
            # rather than stop the consumer on it (I10). The original stays at its position.
            log.warning("%s is too large to dead-letter whole: %s", record.position, exc)
            publish(
                session,
                topic=topic,
                key=None,
                value=None,
                headers=lean_dead_letter_headers(headers, exc),
                event_id=event_id,
            )
        log.error(
            "%s (event %s) dead-lettered to %s after %d attempt(s), %s: %s",
            record.position,
            item.key,
            topic,
            attempts,
            reason.value,
            describe(error),
        )

    def _committed(self, items: Sequence[_Item], outcomes: Sequence[Outcome]) -> None:
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
            tp = (item.record.topic, item.record.partition)
            if tp in self.assignment:  # else revoked: the new owner commits its own offsets
                self._pending[tp] = max(self._pending.get(tp, 0), item.record.offset + 1)
        if applied:
            try:
                self.on_committed(applied)
            except Exception:
                log.exception("on_committed() raised; ignored (the events are committed)")

    # -- offsets and rebalances -------------------------------------------------------

    def _commit_offsets(self, only: Sequence[Any] | None = None) -> None:
        """Commit the offsets of DB-committed records, synchronously (I5: after the DB commit)."""
        if self._kafka is None:
            return
        wanted = None if only is None else {(tp.topic, tp.partition) for tp in only}
        pending = {
            tp: offset for tp, offset in self._pending.items() if wanted is None or tp in wanted
        }
        if not pending:
            return
        offsets = [TopicPartition(t, p, o) for (t, p), o in pending.items()]
        try:
            result = self._kafka.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            log.warning(
                "offset commit failed (%s); the events are recorded as processed, "
                "so a re-read skips them",
                exc.args[0],
            )
            return
        self.stats.offset_commits += 1
        for tp in result or ():
            key = (tp.topic, tp.partition)
            if tp.error is not None:
                log.warning("offset commit for %s/%d failed: %s", tp.topic, tp.partition, tp.error)
            elif self._pending.get(key) == tp.offset:
                del self._pending[key]

    def _on_assign(self, _consumer: Any, partitions: list[Any]) -> None:
        self.joined = True
        self.assignment = self.assignment | {(tp.topic, tp.partition) for tp in partitions}
        if self.assignment:
            log.info("assigned %s", _names(partitions))
        else:
            log.info(
                "assigned no partition (more members than partitions?); waiting for an assignment"
            )

    def _on_revoke(self, _consumer: Any, partitions: list[Any]) -> None:
        """Commit what was applied of these partitions; fetched records of theirs still in
        hand are dropped by ``_owned`` (callbacks run inside consume())."""
        self._commit_offsets(only=partitions)
        self._forget(partitions)
        log.info("revoked %s", _names(partitions))

    def _on_lost(self, _consumer: Any, partitions: list[Any]) -> None:
        """Someone else owns these now: their pending offsets cannot be committed (dedup covers)."""
        self._forget(partitions)
        log.warning("lost %s without a clean revoke", _names(partitions))

    def _forget(self, partitions: list[Any]) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self.assignment = self.assignment - gone
        for tp in gone:
            self._pending.pop(tp, None)

    def _on_kafka_error(self, err: Any) -> None:
        self._kafka_errors.log(logging.WARNING, "kafka: %s", redact(str(err)))
        if err.code() in _REFUSED_CREDENTIALS:  # no retry can help: stop, naming the fix
            self._refused = ConfigError(
                f"Kafka refused the consumer's credentials ({redact(err.str())}): check "
                "sasl.*/ssl.* in --consumer-config or -X"
            )

    # -- purge ------------------------------------------------------------------------

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


def _ranges(items: Sequence[_Item]) -> list[tuple[str, int, int, int]]:
    """``(topic, partition, first, last)`` offsets of the items, per partition."""
    ranges: dict[tuple[str, int], tuple[int, int]] = {}
    for item in items:
        tp, offset = (item.record.topic, item.record.partition), item.record.offset
        first, last = ranges.get(tp, (offset, offset))
        ranges[tp] = (min(first, offset), max(last, offset))
    return [(t, p, first, last) for (t, p), (first, last) in ranges.items()]


def _names(partitions: list[Any]) -> str:
    return ", ".join(f"{tp.topic}/{tp.partition}" for tp in partitions) or "nothing"
