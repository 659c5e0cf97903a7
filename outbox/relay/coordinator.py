"""The relay daemon: committed outbox rows -> one Kafka transaction per batch -> delete.

Composition: a ``Relay`` (one per process) holds the LISTEN connection and a
coordinator that takes slots; each owned slot runs a ``SlotWorker`` thread
(``outbox.relay.worker``) with its own connection (which holds the slot's advisory
lock, so a dead connection frees the slot and aborts the worker's DB work at once)
and its own transactional producer (``<prefix>-<slot>``, so a new owner fences a
zombie). The worker is handed a ``SlotContext``, not this coordinator.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import time
import uuid
import zlib
from typing import Any, NamedTuple

import psycopg
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from psycopg.conninfo import conninfo_to_dict
from tenacity import Retrying, retry_if_exception_type, wait_random_exponential

from outbox import sql
from outbox.db import connect, libpq_dsn, redact
from outbox.errors import ConfigError, KafkaUnavailable, NotMigrated, SlotLost, TransientError
from outbox.locks import (
    COUNT_NAMESPACE,
    GUARANTEE_NAMESPACE,
    GUARD_NAMESPACE,
    PREFIX_NAMESPACE,
    SLOT_NAMESPACE,
    STATE_TOPIC_NAMESPACE,
)
from outbox.logs import librdkafka_logger
from outbox.partitioner import SHARD_COUNT, shards_of_slot, slot_of_shard
from outbox.relay import deliveries
from outbox.relay.batching import jittered, slots_to_release, slots_to_try, target_share
from outbox.relay.classify import Verdict, classify, config_fix
from outbox.relay.config import Guarantee, ProducerPlan, RelayConfig
from outbox.relay.fences import FOREIGN_FENCE_WINDOW, FenceAlarm
from outbox.relay.marker import MarkerReading, judge_marker
from outbox.relay.metrics import RelayMetrics
from outbox.relay.sessions import client_settings, heartbeat_interval, server_settings
from outbox.relay.worker import (
    RelayStats,
    SlotContext,
    SlotWorker,
    delete_recovered,
)

log = logging.getLogger("outbox.relay")

GUARANTEES = list(Guarantee)
CONTROL_SILENCE = 5.0
"""/readyz fails when the control connection has not answered for this long (a few of the
coordinator's 1 s loops): the relay may be cut off from its database."""
MARKER_READ_TIMEOUT = 30.0
"""How long a takeover reads for the slot's last marker before retrying (never settles
for an older one)."""


def _lock_value(text: str) -> int:
    """A setting as an advisory lock's second key (a non-negative int4, as pg_locks shows it)."""
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def announced_settings(prefix: str, state_topic: str, guarantee: Guarantee) -> list[Announced]:
    """What a relay announces beside its slot count, so a relay of the same outbox with other
    values is refused in one line: (lock namespace, value, the option and its value)."""
    return [
        Announced(
            PREFIX_NAMESPACE, _lock_value(prefix), f"--transactional-id-prefix (in use: {prefix})"
        ),
        Announced(STATE_TOPIC_NAMESPACE, _lock_value(state_topic), f"--state-topic={state_topic}"),
        Announced(GUARANTEE_NAMESPACE, GUARANTEES.index(guarantee), f"--guarantee={guarantee}"),
    ]


class Announced(NamedTuple):
    namespace: int
    value: int
    option: str


def state_topic_replicas(brokers: int) -> int:
    """The state topic's replication factor: 3 where the cluster has them (a stock broker's
    default is 1, and the markers are what keeps a takeover from publishing twice)."""
    return max(1, min(3, brokers))


def notified_slot(payload: str, slots: int) -> int | None:
    """The slot a NOTIFY payload (``publish()`` sends the shard) wakes; None: every slot."""
    if payload.isdecimal() and int(payload) < SHARD_COUNT:
        return slot_of_shard(int(payload), slots)
    return None


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
        self.fence_alarm = FenceAlarm()
        self._members = 1
        self._failures: dict[int, int] = {}
        self._not_before: dict[int, float] = {}
        self.name = f"outbox-relay:{os.getpid()}"
        self._keepalives = client_settings(
            config.takeover_timeout, conninfo_to_dict(libpq_dsn(config.dsn))
        )
        self._bounds_refused: set[str] = set()  # session settings this server does not know
        self._control_answered: float | None = None  # set once the coordinator loop runs
        self.records_deliveries = False  # the delivery record is on and its table exists
        self._upkeep_due = 0.0  # monotonic time of the next partition upkeep
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
                worker.join(self.plan.transaction_timeout + 10)
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
                ready = self._start_up()
                if ready:  # bounded from now on: start-up may wait on Kafka for long
                    self._bound(self._control)
                return ready
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
        """Ready: database reachable, owning its share of slots, each with a working producer.
        The reason also says when slots were fenced from outside this database (I9)."""
        ready, reason = self._readiness()
        since = time.monotonic() - FOREIGN_FENCE_WINDOW
        if slots := self.fence_alarm.confirmed_since(since):
            reason += (
                f"; {slots} slots fenced from outside this database in the last "
                f"{FOREIGN_FENCE_WINDOW / 60:.0f} minutes (another database relays with this "
                "outbox's identity: see the relay's ERROR lines)"
            )
        return ready, reason

    def _readiness(self) -> tuple[bool, str]:
        if self._control is None or self._control.closed or self._control.broken:
            return False, "no database connection"
        silent = time.monotonic() - (self._control_answered or time.monotonic())
        if silent > CONTROL_SILENCE:
            return False, f"the database has not answered for {silent:.0f} s"
        with self._lock:
            workers = list(self.workers.values())
        want = target_share(self.config.slots, self._members, self.config.max_slots)
        if len(workers) < want:
            return False, f"owns {len(workers)} of its {want} slots"
        starting = [w.slot for w in workers if w.producer is None]
        if starting:
            return False, f"slots {starting} are connecting to Kafka"
        return True, f"owns slots {sorted(w.slot for w in workers)}"

    def _slot_context(self, slot: int) -> SlotContext:
        """What the slot's worker may use of this process (and nothing else of it)."""
        return SlotContext(
            config=self.config,
            plan=self.plan,
            outbox_id=self.outbox_id,
            transactional_id=self.transactional_id(slot),
            stop=self.stop,
            listening=self.listening,
            stats=self.stats,
            metrics=self.metrics,
            fence_alarm=self.fence_alarm,
            first_run=lambda: self.first_run,
            records_deliveries=self.records_deliveries,
            wrote_marker=self.wrote_marker,
            read_marker=self.read_marker,
            judge=self.judge,
            refuse=self.refuse,
            done=self.worker_done,
        )

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
        if self.config.delivery_retention > 0:
            found = self._control.execute(sql.DELIVERIES_TABLE).fetchone()
            self.records_deliveries = bool(found and found["deliveries"])
            if not self.records_deliveries:
                log.warning(
                    "no outbox_deliveries table: events are published without a delivery "
                    "record (`outbox trace`, `outbox verify`); run `outbox migrate`"
                )

    def _keep_deliveries(self) -> None:
        """Partition upkeep of the delivery record, at most every few minutes; a failure is
        logged and retried at the next turn (the default partition takes rows meanwhile)."""
        if not self.records_deliveries or time.monotonic() < self._upkeep_due:
            return
        self._upkeep_due = time.monotonic() + jittered(deliveries.MAINTENANCE_INTERVAL)
        assert self._control is not None
        try:
            deliveries.maintain(self._control, self.config.delivery_retention)
        except psycopg.errors.LockNotAvailable as exc:  # batches hold the record: next turn
            log.info("delivery record upkeep postponed (%s)", _line(exc))
        except psycopg.OperationalError:
            raise  # the control connection is gone: the coordinator reconnects
        except psycopg.Error as exc:
            log.warning("delivery record upkeep failed (%s); retrying later", _line(exc))

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
            self._announce_settings()
            row = self._control.execute(sql.READ_IDENTITY).fetchone()
            if row is not None and uuid.UUID(str(row["outbox_id"])) != self.outbox_id:
                # `outbox identity renew` ran after this relay read the identity (it is
                # serialised with this check by the same lock): the transactional ids and
                # markers of this process are the old identity's.
                raise ConfigError(
                    f"the outbox identity changed from {self.outbox_id} to {row['outbox_id']} "
                    "while this relay was starting or reconnecting (`outbox identity renew`): "
                    "start the relay again to use the new one"
                )
            before = row["slot_count"] if row else None
            self.first_run = before is None and self.config.transactional_id_prefix is None
            if before != self.config.slots:
                if before is not None and self.config.guarantee is Guarantee.EXACTLY_ONCE:
                    self._settle_layout(int(before))
                self._control.execute(sql.RECORD_SLOT_COUNT, {"slots": self.config.slots})

    def _announce_settings(self) -> None:
        """Refuse to run beside a relay of this outbox with another prefix, state topic or
        guarantee (under the caller's guard lock), then announce this relay's."""
        assert self._control is not None
        for item in announced_settings(
            self.config.tid_prefix(self.outbox_id), self.config.state_topic, self.config.guarantee
        ):
            params = {"namespace": item.namespace, "slots": item.value}
            others = self._control.execute(sql.OTHER_SLOT_COUNTS, params).fetchall()
            if others:
                theirs = ""
                if item.namespace == GUARANTEE_NAMESPACE:
                    theirs = f" (--guarantee={GUARANTEES[int(others[0]['slots'])]})"
                same = "--transactional-id-prefix, --state-topic and --guarantee"
                raise ConfigError(
                    f"{item.option}, but a running relay of this outbox uses another value"
                    f"{theirs}: every relay of one outbox must use the same {same} (stop the "
                    "others first to change them)"
                )
            self._control.execute(sql.LOCK_SLOT_COUNT, params)

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
                producer.init_transactions(self.plan.transaction_timeout)
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
                    self._control,
                    reading.marker,
                    shards_of_slot(slot, before),
                    record=self.records_deliveries,
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
        self._control_answered = time.monotonic()
        while not self.stop.is_set():
            with self._lock:
                owned = sorted(self.workers)
            try:
                members = self._members = self._count_members()
                self._control_answered = time.monotonic()
                self._keep_deliveries()
                if members > 1:  # another relay may write markers for slots this one takes
                    self.first_run = False
            except psycopg.Error as exc:  # ended by the server's session timeout, too
                log.warning("control connection lost (%s); reconnecting", _line(exc))
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
            # Often enough that the server never ends the control session (its
            # announcements) for silence, however short --takeover-timeout (I12).
            self._changed.wait(jittered(min(1.0, heartbeat_interval(self.config.takeover_timeout))))
            self._changed.clear()

    def _finish_once(self) -> None:
        for worker in list(self.workers.values()):
            worker.join()

    def _try_take(self, slot: int) -> bool:
        try:
            conn = self._session(f"{self.name}:slot-{slot}")
        except (ConnectionError, ConfigError) as exc:
            # A credential refused now (rotated, revoked) was good when the relay started: the
            # control connection retries it too, so the slot is tried again, not the daemon ended.
            log.warning("slot %d: cannot take it now: %s", slot, exc)
            return False
        try:
            self._bound(conn)
            row = conn.execute(
                sql.TRY_LOCK_SLOT, {"namespace": SLOT_NAMESPACE, "slot": slot}
            ).fetchone()
        except psycopg.Error as exc:
            log.warning("slot %d: cannot take it now: %s", slot, redact(str(exc)))
            conn.close()
            return False
        if not row or not next(iter(row.values())):
            conn.close()
            # Someone holds it: another relay was here, however briefly (it may be gone by the
            # next member count), and may have written markers this relay must read (I4).
            self.first_run = False
            return False
        worker = SlotWorker(self._slot_context(slot), slot, conn)
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
                self._control = self._session(self.name)
                try:
                    self._announce_slot_count()
                except ConfigError as exc:  # another slot count took over meanwhile
                    self.refuse(exc)
                self._bound(self._control)  # after a layout settle, which may wait on Kafka

    def _first_connection(self) -> psycopg.Connection[dict[str, Any]]:
        """A daemon waits for its database (it may start first); ``--once`` fails at once."""
        attempt = 0
        while True:
            try:
                return self._session(self.name)
            except ConnectionError as exc:
                if self.config.once or self.stop.is_set():
                    raise
                attempt += 1
                delay = min(30.0, 0.5 * 2 ** min(attempt, 6))
                log.warning("%s; retrying in %.0f s", exc, delay)
                self.stop.wait(delay)

    def _session(self, application_name: str) -> psycopg.Connection[dict[str, Any]]:
        """A connection with the relay's keepalives: a relay cut off from its database
        notices within --takeover-timeout."""
        return connect(self.config.dsn, application_name=application_name, params=self._keepalives)

    def _bound(self, conn: psycopg.Connection[dict[str, Any]]) -> None:
        """Have the server end this session once it has been silent for --takeover-timeout
        (frozen or cut off), freeing its slot and its announcement for another relay (I12)."""
        wanted = server_settings(self.config.takeover_timeout)
        settings = {k: v for k, v in wanted.items() if k not in self._bounds_refused}
        try:
            conn.execute(
                sql.SET_SESSION, {"names": list(settings), "settings": list(settings.values())}
            )
        except psycopg.errors.UndefinedObject as exc:  # idle_session_timeout: PostgreSQL < 14
            if "idle_session_timeout" in self._bounds_refused:
                raise
            self._bounds_refused.add("idle_session_timeout")
            log.warning(
                "this PostgreSQL has no idle_session_timeout (%s; it came in 14): a frozen "
                "relay's slots are freed only by TCP keepalives, which its kernel still answers",
                _line(exc),
            )
            self._bound(conn)

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
                with self._session(f"{self.name}:listen") as conn:  # idle by design: unbounded
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
        replicas = state_topic_replicas(len(md.brokers))
        if replicas == 1:
            log.warning(
                "creating the state topic %r with replication factor 1 (the cluster has one "
                "broker): losing that broker's disk loses the recovery markers, and a relay "
                "taking a slot over could publish its last batch again",
                topic,
            )
        futures = admin.create_topics(
            [
                NewTopic(
                    topic,
                    SHARD_COUNT,
                    replication_factor=replicas,
                    config={"cleanup.policy": "compact"},
                )
            ],
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


def _line(exc: BaseException) -> str:
    return " ".join(redact(str(exc)).split())


def _position(consumer: Any, tp: TopicPartition) -> int:
    """Where ``consumer`` will read next in ``tp`` (past skipped control records too)."""
    [where] = consumer.position([TopicPartition(tp.topic, tp.partition)])
    return int(where.offset) if where.offset >= 0 else 0
