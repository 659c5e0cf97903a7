"""The relay daemon: committed outbox rows -> one Kafka transaction per batch -> delete.

Composition: a ``Relay`` (one per process) coordinates: its lifecycle, the slots it takes
and hands over, a ``SlotWorker`` thread per owned slot, and its health. The parts it
coordinates are modules of their own: ``database`` (its PostgreSQL sessions), ``layout``
(identity and slot layout, agreed with the other relays), ``kafka_probe`` (Kafka at start),
``marker_reader`` (a slot's last recovery marker) and ``listen`` (NOTIFY wake-ups). Each
worker has its own connection (which holds the slot's advisory lock, so a dead connection
frees the slot and aborts the worker's DB work at once) and its own transactional producer
(``<prefix>-<slot>``, so a new owner fences a zombie). The worker is handed a
``SlotContext``, not this coordinator.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
import uuid

import psycopg
from confluent_kafka import KafkaException, Producer
from tenacity import Retrying, retry_if_exception_type

from outbox import sql
from outbox.db import redact
from outbox.errors import ConfigError, NotMigrated, SlotLost, TransientError
from outbox.locks import COUNT_NAMESPACE, SLOT_NAMESPACE
from outbox.logs import librdkafka_logger
from outbox.partitioner import shards_of_slot
from outbox.relay import deliveries
from outbox.relay.backoff import backoff, retry_wait
from outbox.relay.batching import jittered, slots_to_release, slots_to_try, target_share
from outbox.relay.config import Guarantee, ProducerPlan, RelayConfig
from outbox.relay.database import Connection, Connector, line
from outbox.relay.fences import FOREIGN_FENCE_WINDOW, FenceAlarm
from outbox.relay.kafka_probe import KafkaProbe
from outbox.relay.layout import SlotLayout
from outbox.relay.listen import listen, notified_slot
from outbox.relay.marker_reader import (
    KafkaMarkerReader,
    MarkerReader,
    kafka_consumers,
    read_past_a_stuck_offset,
)
from outbox.relay.metrics import RelayMetrics
from outbox.relay.seams import Seams
from outbox.relay.sessions import heartbeat_interval
from outbox.relay.unmask import unmasked
from outbox.relay.worker import (
    RelayStats,
    SlotContext,
    SlotWorker,
    delete_recovered,
)

__all__ = ["CONTROL_SILENCE", "COUNT_NAMESPACE", "Relay"]  # COUNT_NAMESPACE: for `outbox status`

log = logging.getLogger("outbox.relay")

CONTROL_SILENCE = 5.0
"""/readyz fails when the control connection has not answered for this long (a few of the
coordinator's 1 s loops): the relay may be cut off from its database."""


class Relay:
    """One relay process: takes its fair share of slots and runs a worker per slot."""

    def __init__(
        self,
        config: RelayConfig,
        *,
        stop: threading.Event | None = None,
        markers: MarkerReader | None = None,
        kafka: KafkaProbe | None = None,
        seams: Seams | None = None,
    ) -> None:
        """``markers`` and ``kafka``: the marker reader and the start-up probe; ``seams``: how
        each slot makes its producer and database session. By default the real ones (built
        from ``config``)."""
        self.config = config
        self.seams = seams or Seams()  # how each slot makes its producer and DB session
        self.plan: ProducerPlan = config.producer_plan()
        self.stop = stop or threading.Event()
        self.stats = RelayStats()
        self.workers: dict[int, SlotWorker] = {}
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._control: Connection | None = None
        self.layout = SlotLayout(config, stats=self.stats, refuse=self.refuse)
        self.markers: MarkerReader = markers or KafkaMarkerReader(
            config.state_topic,
            kafka_consumers(
                self.plan.connection,
                lambda: f"{config.tid_prefix(self.outbox_id)}-marker-reader",
            ),
        )
        exactly_once = config.guarantee is Guarantee.EXACTLY_ONCE
        self.kafka = kafka or KafkaProbe(
            settings=self.plan.settings,
            connection=self.plan.connection,
            bootstrap_servers=config.bootstrap_servers,
            state_topic=config.state_topic if exactly_once else None,
            once=config.once,
        )
        self.connector = Connector(config.dsn, config.takeover_timeout, once=config.once)
        self.listening = threading.Event()  # a LISTEN session is up: NOTIFY wakes the slots
        self.fatal: BaseException | None = None  # a refusal found by a worker: run() raises it
        # The outbox's first relay with default transactional ids: no marker can exist under
        # them below where the state partitions ended before it announced itself (any other
        # relay of the outbox announces, then writes, after it), so a takeover reads its marker
        # from there instead of back to the start of a state topic shared with other outboxes.
        self.first_run = False
        self.marker_floors: dict[int, int] = {}
        self.fence_alarm = FenceAlarm()
        self._members = 1
        self._failures: dict[int, int] = {}
        self._not_before: dict[int, float] = {}
        self.name = f"outbox-relay:{os.getpid()}"
        self._control_answered: float | None = None  # set once the coordinator loop runs
        self.records_deliveries = False  # the delivery record is on and its table exists
        self._upkeep_due = 0.0  # monotonic time of the next partition upkeep
        self.metrics = RelayMetrics(self)

    @property
    def outbox_id(self) -> uuid.UUID:
        """This outbox's identity, read from the database when the relay starts."""
        return self.layout.outbox_id

    @outbox_id.setter
    def outbox_id(self, value: uuid.UUID) -> None:
        self.layout.outbox_id = value

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
            listener = threading.Thread(
                target=listen,
                args=(lambda: self.connector.session(f"{self.name}:listen"), self.wake_for),
                kwargs={
                    "listening": self.listening,
                    "stop": self.stop,
                    "poll_interval": self.config.poll_interval,
                },
                name="outbox-listen",
                daemon=True,
            )
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
            self._control = self.connector.first(self.name, self.stop)
            try:
                self._check_schema()
                ready = self._start_up()
                if ready:  # bounded from now on: start-up may wait on Kafka for long
                    self.connector.bound(self._control)
                return ready
            except psycopg.OperationalError as exc:
                message = f"database connection lost during start-up: {redact(str(exc))}"
                self._control.close()
                if self.config.once or self.stop.is_set():
                    raise ConnectionError(message) from None
                attempt += 1
                delay = backoff(attempt)
                log.warning("%s; starting again in %.1f s", " ".join(message.split()), delay)
                if self.stop.wait(delay):
                    return False

    def _start_up(self) -> bool:
        """Identity, Kafka (settings, reachability, state topic), prefix and slot-count
        checks: all before any slot runs. False: told to stop while waiting for Kafka."""
        assert self._control is not None
        self.layout.load_identity(self._control)
        log.info(
            "outbox %s: transactional ids %s-<slot>",
            self.outbox_id,
            self.config.tid_prefix(self.outbox_id),
        )
        if not self.kafka.wait(self.stop):
            return False
        if self.config.guarantee is Guarantee.EXACTLY_ONCE:
            self.layout.refuse_a_shared_prefix(self.markers, self.stop)
        floors = self._state_ends()  # before announcing: see ``marker_floors``
        for attempt in Retrying(  # settling a changed layout needs Kafka: wait for it
            retry=retry_if_exception_type(TransientError),
            wait=retry_wait(first=0.5, cap=10),
            sleep=self._pause,
            before_sleep=lambda rs: log.warning(
                "%s; retrying", rs.outcome.exception() if rs.outcome else "?"
            ),
            stop=lambda rs: self.stop.is_set(),
            reraise=True,
        ):
            with attempt:
                self._announce()
        self.marker_floors = floors if self.first_run else {}
        return True

    def _state_ends(self) -> dict[int, int]:
        """Where the state partitions end now, if this relay may turn out to be the outbox's
        first (default transactional ids); empty otherwise, or if Kafka does not say: every
        takeover then reads its marker back as far as it must (I4)."""
        if (
            self.config.guarantee is not Guarantee.EXACTLY_ONCE
            or self.config.transactional_id_prefix is not None
        ):
            return {}
        try:
            return self.markers.ends(self.config.slots)
        except (KafkaException, TransientError) as exc:
            log.debug("state partitions' ends not read (%s): markers are read in full", exc)
            return {}

    def _announce(self) -> None:
        assert self._control is not None
        self.first_run = self.layout.announce(self._control, self._settle_layout)

    def _close_clients(self) -> None:
        self.markers.close()
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
        return self.layout.transactional_id(slot)

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
            marker_floor=lambda slot: self.marker_floors.get(slot, 0),
            records_deliveries=self.records_deliveries,
            read_marker=self.markers.read,
            judge=self.layout.judge,
            refuse=self.refuse,
            done=self.worker_done,
            seams=self.seams,
        )

    def worker_done(self, worker: SlotWorker) -> None:
        with self._lock:
            if self.workers.get(worker.slot) is worker:
                del self.workers[worker.slot]
            if worker.failed:  # a bug or a refused setting must not spin: back off per slot
                failures = self._failures.get(worker.slot, 0) + 1
                self._failures[worker.slot] = failures
                self._not_before[worker.slot] = time.monotonic() + backoff(
                    failures, first=2.0, cap=60.0
                )
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
            log.info("delivery record upkeep postponed (%s)", line(exc))
        except psycopg.OperationalError:
            raise  # the control connection is gone: the coordinator reconnects
        except psycopg.Error as exc:
            log.warning("delivery record upkeep failed (%s); retrying later", line(exc))

    def _read_old_marker(self, producer: Producer, slot: int, tid: str) -> bytes | None:
        """An old slot's last marker, read as a slot's own recovery reads it (past a stable
        offset the broker never moves, where aborts are shown): otherwise the relay would
        retry settling the old layout for ever and never publish (I12). ``producer`` (the
        old slot's id, its ``init_transactions`` done) has no transaction open."""

        def aborts_shown() -> bool:
            # the cluster's kept answer first, the broker itself if that is unclear
            for remember_as in (self.plan.settings.get("bootstrap.servers"), None):
                hidden = self.seams.aborts_hidden(
                    producer,
                    self.plan.connection,
                    self.config.state_topic,
                    slot,
                    tid.encode(),
                    timeout=min(10.0, self.plan.transaction_timeout),
                    remember_as=remember_as,
                )
                if hidden is not None:
                    return not hidden
            return False

        return read_past_a_stuck_offset(
            self.markers.read, slot, tid, self.stop, aborts_shown, what="the old layout's slot"
        )

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
            settings = dict(self.plan.settings) | {"transactional.id": tid}
            producer = Producer(settings | {"logger": librdkafka_logger()})
            try:
                with unmasked():
                    producer.init_transactions(self.plan.transaction_timeout)
                raw = self._read_old_marker(producer, slot, tid)
            except KafkaException as exc:
                raise TransientError(f"settling slot {slot} of the old layout: {exc}") from None
            finally:
                producer.flush(0)
            if raw is None:
                continue
            try:
                reading = self.layout.judge(raw, slot, tid, before)
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

    def _coordinate(self) -> None:
        start = os.getpid() % self.config.slots
        self._control_answered = time.monotonic()
        while not self.stop.is_set():
            with self._lock:
                owned = sorted(self.workers)
            try:
                assert self._control is not None
                members = self._members = self.layout.count_members(self._control)
                self._control_answered = time.monotonic()
                self._keep_deliveries()
                if members > 1:  # another relay may write markers for slots this one takes
                    self.first_run = False
            except psycopg.Error as exc:  # ended by the server's session timeout, too
                log.warning("control connection lost (%s); reconnecting", line(exc))
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
            if self.config.once:  # drain the owned slots, then end
                for worker in list(self.workers.values()):
                    worker.join()
                return
            # Often enough that the server never ends the control session (its
            # announcements) for silence, however short --takeover-timeout (I12).
            self._changed.wait(jittered(min(1.0, heartbeat_interval(self.config.takeover_timeout))))
            self._changed.clear()

    def _try_take(self, slot: int) -> bool:
        try:
            conn = self.connector.session(f"{self.name}:slot-{slot}")
        except (ConnectionError, ConfigError) as exc:
            # A credential refused now (rotated, revoked) was good when the relay started: the
            # control connection retries it too, so the slot is tried again, not the daemon ended.
            log.warning("slot %d: cannot take it now: %s", slot, exc)
            return False
        try:
            self.connector.bound(conn)
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
            wait=retry_wait(first=0.2, cap=10),
            sleep=self._pause,
            stop=lambda rs: self.stop.is_set(),
            reraise=True,
        ):
            with attempt:
                if self._control is not None:
                    self._control.close()
                self._control = self.connector.session(self.name)
                try:
                    self._announce()
                except ConfigError as exc:  # another slot count took over meanwhile
                    self.refuse(exc)
                self.connector.bound(self._control)  # after a layout settle (may wait on Kafka)

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
