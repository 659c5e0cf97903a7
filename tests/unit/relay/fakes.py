"""In-memory doubles of a slot worker's seams: a scripted producer and an outbox in a list.

``FakeProducer`` answers like librdkafka through the ``KafkaProducer`` seam: each record's
delivery report comes at the next flush, with the error a script picks (by record, or per
batch); transaction calls can be scripted to fail. ``FakeSession`` keeps the outbox, the dead
table and the committed state in memory and rolls a failed transaction back, like the slot's
PostgreSQL session does. ``make_worker`` wires a ``SlotWorker`` to them.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from confluent_kafka import KafkaError, KafkaException
from prometheus_client import CollectorRegistry

from outbox.errors import BatchRollback
from outbox.relay.config import Guarantee, RelayConfig
from outbox.relay.deliveries import Draft
from outbox.relay.fences import FenceAlarm, SlotLockState
from outbox.relay.marker import Marker, MarkerReading
from outbox.relay.marker_reader import HeldBack
from outbox.relay.metrics import RelayMetrics
from outbox.relay.rows import Headers, Row
from outbox.relay.seams import KafkaProducer, Seams
from outbox.relay.worker import RelayStats, SlotContext, SlotWorker

TOPIC = "orders"
RUNAWAY = 200
"""Flushes after which a fake producer fails the worker (a loop that never ends)."""


def row(i: int, *, topic: str = TOPIC, key: bytes | None = b"k", value: bytes = b"v") -> Row:
    return Row(i, uuid.uuid4(), topic, key, value, [], [], 0, len(value))


@dataclass
class Message:
    """What a delivery report's ``msg`` offers."""

    topic: str
    value: bytes | None
    offset_: int

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self.offset_


def error(code: int, *, fatal: bool = False) -> KafkaError:
    return KafkaError(code, fatal=fatal)


@dataclass
class FakeProducer:
    """A producer whose broker is a list; failures come from the scripts of its ``Broker``."""

    broker: Broker
    settings: dict[str, Any]
    queued: list[tuple[Message, Callable[[Any, Any], None] | None]] = field(default_factory=list)
    in_transaction: bool = False
    calls: list[str] = field(default_factory=list)

    def produce(
        self,
        topic: str,
        *,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int = -1,
        on_delivery: Callable[[Any, Any], None] | None = None,
        timestamp: int = 0,
        headers: Headers | None = None,
    ) -> None:
        if self.broker.jammed:
            raise BufferError("Local: Queue full")
        self.queued.append((Message(topic, value, len(self.broker.log)), on_delivery))
        if on_delivery is None:
            self.calls.append("produce marker")

    def poll(self, timeout: float = -1) -> int:
        return 0

    def flush(self, timeout: float = -1) -> int:
        self.calls.append("flush")
        self.broker.flushes += 1
        if self.broker.flushes > RUNAWAY:
            raise RuntimeError("the worker sent batch after batch: a retry loop that never ends")
        if self.broker.masked:
            pending = self.broker.masked.pop(0)
            raise SystemError(
                "<class 'logging.LogRecord'> returned a result with an exception set"
            ) from KafkaException(pending)
        queued, self.queued = self.queued, []
        batch = [m for m, cb in queued if cb is not None]
        errors = self.broker.reports(batch) if self.broker.reports else {}
        for i, (msg, cb) in enumerate(m for m in queued if m[1] is not None):
            err = errors.get(i)
            if err is None:
                self.broker.sent.append(msg)
            if cb is not None:
                cb(err, None if err is not None else msg)
        self.broker.sent.extend(m for m, cb in queued if cb is None)  # markers
        return 0

    def purge(self, in_queue: bool = True, in_flight: bool = True, blocking: bool = True) -> None:
        self.queued = []

    def _step(self, name: str) -> None:
        self.calls.append(name)
        if self is self.broker.producers[0] and name in self.broker.stuck:
            raise KafkaException(self.broker.stuck[name])
        script = self.broker.fail.get(name)
        if script:
            err = script.pop(0)
            if err is not None:
                raise KafkaException(err)

    def init_transactions(self, timeout: float = -1) -> None:
        self._step("init_transactions")
        self.broker.sent = []  # the last producer's open transaction is aborted

    def begin_transaction(self) -> None:
        self._step("begin_transaction")
        self.in_transaction = True
        self.broker.begun += 1

    def commit_transaction(self, timeout: float = -1) -> None:
        self.flush()
        self._step("commit_transaction")
        self.in_transaction = False
        self.broker.log.extend(self.broker.sent)
        self.broker.sent = []

    def abort_transaction(self, timeout: float = -1) -> None:
        self._step("abort_transaction")
        self.in_transaction = False
        self.broker.jammed = False  # the abort purges the records that filled the queue
        self.broker.aborts.append(timeout)
        self.broker.sent = []

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        raise KafkaException(KafkaError(KafkaError._TRANSPORT))


@dataclass
class Broker:
    """The records committed (``log``), and the scripts of every producer made for a slot."""

    log: list[Message] = field(default_factory=list)
    sent: list[Message] = field(default_factory=list)  # in the open transaction
    aborts: list[float] = field(default_factory=list)  # abort_transaction timeouts
    begun: int = 0
    flushes: int = 0
    reports: Callable[[list[Message]], dict[int, KafkaError]] | None = None
    fail: dict[str, list[KafkaError | None]] = field(default_factory=dict)  # method -> errors
    # method -> the error every call of it raises on the slot's first producer (a broker stuck
    # on that producer's transaction until a new producer's init_transactions settles it)
    stuck: dict[str, KafkaError] = field(default_factory=dict)
    jammed: bool = False  # produce() finds the queue full until a transaction is aborted
    producers: list[FakeProducer] = field(default_factory=list)
    hides_aborts: bool | None = False  # the abort probe's answer (Kafka: True; None: unclear)
    probes: int = 0
    # errors the next flushes raise the way confluent-kafka does when it serves a Python
    # callback (the logger) while its own error is pending: a SystemError chained from it
    masked: list[KafkaError] = field(default_factory=list)

    def aborts_hidden(
        self,
        producer: KafkaProducer,
        connection: Mapping[str, str],
        topic: str,
        partition: int,
        key: bytes,
        *,
        timeout: float = 30.0,
        remember_as: str | None = None,
    ) -> bool | None:
        self.probes += 1
        return self.hides_aborts

    def producer(self, settings: dict[str, Any]) -> FakeProducer:
        made = FakeProducer(self, settings)
        self.producers.append(made)
        return made

    def values(self, topic: str = TOPIC) -> list[bytes | None]:
        """What a reader of ``topic`` sees, committed or not (no transactions: all of it)."""
        return [m.value for m in [*self.log, *self.sent] if m.topic == topic]


@dataclass
class FakeSession:
    """The outbox of one slot in memory, with the slot session's transaction semantics."""

    rows: list[Row] = field(default_factory=list)
    dead: dict[int, str] = field(default_factory=dict)
    recorded: list[int] = field(default_factory=list)
    lock: SlotLockState | None = None
    on_claim: Callable[[int], None] | None = None  # called with the claim's number
    claims: int = 0
    released: bool = False

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        saved = (list(self.rows), list(self.recorded))
        try:
            yield
        except BatchRollback:
            self.rows, self.recorded = saved
        except BaseException:
            self.rows, self.recorded = saved
            raise

    def claim(
        self,
        shards: Sequence[int],
        *,
        limit: int,
        held: Sequence[str],
        max_value_bytes: int,
        max_bytes: int,
    ) -> list[Row]:
        self.claims += 1
        if self.on_claim is not None:
            self.on_claim(self.claims)
        return [r for r in self.rows if r.topic not in held][:limit]

    def delete(self, ids: Sequence[int]) -> set[int]:
        wanted = set(ids)
        gone = {r.id for r in self.rows if r.id in wanted}
        self.rows = [r for r in self.rows if r.id not in wanted]
        return gone

    def record_deliveries(self, rows: Sequence[Row], placed: Mapping[int, tuple[int, int]]) -> None:
        self.recorded.extend(r.id for r in rows if r.id in placed)

    def draft_record(self, rows: Sequence[Row]) -> Draft:
        return Draft(rows, {})

    @contextlib.contextmanager
    def recording(
        self,
        rows: Sequence[Row],
        placed: Mapping[int, tuple[int, int]] | None,
        drafted: Draft | None = None,
    ) -> Iterator[None]:
        if placed is not None:
            self.record_deliveries(rows, placed)
        yield

    def bury(self, row_id: int, error: str) -> None:
        self.dead[row_id] = error
        self.delete([row_id])

    def recover(self, marker: Marker, shards: Sequence[int], *, record: bool) -> int:
        named = set(marker.ids)
        before = len(self.rows)
        self.rows = [r for r in self.rows if r.id not in named]
        return before - len(self.rows)

    def lock_state(self, slot: int, slots: int) -> SlotLockState | None:
        return self.lock

    def heartbeat(self) -> bool:
        return True

    def wait_for_news(self, timeout: float) -> bool:
        threading.Event().wait(timeout)  # a fake server never speaks unprompted
        return False

    def release(self, slot: int) -> None:
        self.released = True

    def ids(self) -> list[int]:
        return [r.id for r in self.rows]


@dataclass
class StateTopic:
    """The slot's state partition as its recovery read finds it: the last marker, and how many
    committed reads its last stable offset holds back (``HeldBack``) before one passes."""

    markers: Mapping[int, bytes] = field(default_factory=dict)
    held_back: int = 0
    reads: list[bool] = field(default_factory=list)  # each read: committed?
    since: list[int] = field(default_factory=list)  # each read: from which offset

    def read(
        self,
        slot: int,
        tid: str,
        interrupt: threading.Event,
        *,
        committed: bool = True,
        since: int = 0,
    ) -> bytes | None:
        self.reads.append(committed)
        self.since.append(since)
        if committed and self.held_back:
            self.held_back -= 1
            raise HeldBack(
                f"slot {slot}: the state topic's partition {slot} is held at its last stable "
                "offset 3, below its end 9, for 5 s (a transaction the broker has not finished)"
            )
        return self.markers.get(slot)


@dataclass
class Refusals:
    refused: list[BaseException] = field(default_factory=list)

    def __call__(self, exc: BaseException) -> None:
        self.refused.append(exc)


def make_worker(
    session: FakeSession,
    broker: Broker,
    *,
    guarantee: Guarantee = Guarantee.EXACTLY_ONCE,
    markers: Mapping[int, bytes] | None = None,
    state: StateTopic | None = None,
    refusals: Refusals | None = None,
    floor: int = 0,
    **settings: Any,
) -> SlotWorker:
    """Slot 0 of a 1-slot relay draining once (``--once``), wired to the fakes (``markers``:
    what the slot's recovery reads, unless ``state`` scripts more of its state partition;
    ``floor``: the offset below which the relay knows no marker of the slot's id exists)."""
    config = RelayConfig(
        dsn="postgresql://relay@localhost/app",
        bootstrap_servers="localhost:9092",
        slots=1,
        once=True,
        guarantee=guarantee,
        transactional_id_prefix="unit",
        **settings,
    )
    outbox_id = uuid.uuid4()

    state = state or StateTopic(markers or {})

    def judge(raw: bytes, slot: int, tid: str, slots: int) -> MarkerReading:
        return MarkerReading(marker=Marker.decode(raw))

    context = SlotContext(
        config=config,
        plan=config.producer_plan(),
        outbox_id=outbox_id,
        transactional_id="unit-0",
        stop=threading.Event(),
        listening=threading.Event(),
        stats=RelayStats(),
        metrics=RelayMetrics(cast(Any, None), CollectorRegistry()),
        fence_alarm=FenceAlarm(),
        marker_floor=lambda slot: floor,
        records_deliveries=True,
        read_marker=state.read,
        judge=judge,
        refuse=refusals or Refusals(),
        done=lambda worker: None,
        seams=Seams(
            producer=broker.producer,
            session=lambda conn: session,
            aborts_hidden=broker.aborts_hidden,
        ),
    )
    return SlotWorker(context, 0, cast(Any, None))
