"""The slot worker's seams: what it uses of Kafka and of its database, as Protocols.

The defaults are the real clients (``confluent_kafka.Producer`` fits ``KafkaProducer`` as it
is; ``PsycopgSlotSession`` is ``SlotSession`` over psycopg). A test or an embedding hands the
``Relay`` other factories through ``Seams`` (a wrapping producer that injects a fault, an
in-memory fake for unit tests) instead of patching the worker's methods.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from confluent_kafka import Producer

from outbox.relay.abort_probe import aborts_hidden
from outbox.relay.deliveries import Draft
from outbox.relay.fences import SlotLockState
from outbox.relay.marker import Marker
from outbox.relay.rows import Headers, Row
from outbox.relay.slot_session import PsycopgSlotSession

DeliveryReport = Callable[[Any, Any], None]
"""``on_delivery(err, msg)``: err is a ``KafkaError`` or None, msg has partition()/offset()."""


class KafkaProducer(Protocol):
    """What a slot worker calls on its producer (librdkafka's, through confluent-kafka)."""

    def produce(
        self,
        topic: str,
        *,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int = -1,
        on_delivery: DeliveryReport | None = None,
        timestamp: int = 0,
        headers: Headers | None = None,
    ) -> None: ...
    def poll(self, timeout: float = -1) -> int: ...
    def flush(self, timeout: float = -1) -> int: ...
    def purge(
        self, in_queue: bool = True, in_flight: bool = True, blocking: bool = True
    ) -> None: ...
    def init_transactions(self, timeout: float = -1) -> None: ...
    def begin_transaction(self) -> None: ...
    def commit_transaction(self, timeout: float = -1) -> None: ...
    def abort_transaction(self, timeout: float = -1) -> None: ...
    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any: ...


class SlotSession(Protocol):
    """What a slot worker runs on its database connection (the one holding the slot's lock).

    Every method raises ``SlotLost`` when the connection is gone and ``DatabaseRefused`` when a
    live one refuses a statement; nothing of the driver leaks out.
    """

    def transaction(self) -> AbstractContextManager[None]:
        """The batch's transaction; ``BatchRollback`` raised inside ends it without a commit."""
        ...

    def claim(
        self,
        shards: Sequence[int],
        *,
        limit: int,
        held: Sequence[str],
        max_value_bytes: int,
        max_bytes: int,
    ) -> list[Row]: ...
    def delete(self, ids: Sequence[int]) -> set[int]:
        """Delete the rows; the ids of those that were still there."""
        ...

    def record_deliveries(
        self, rows: Sequence[Row], placed: Mapping[int, tuple[int, int]]
    ) -> None: ...
    def draft_record(self, rows: Sequence[Row]) -> Draft:
        """What the record of ``rows`` needs before their places are known (pure CPU, no
        statement): made while the broker acknowledges them."""
        ...

    def recording(
        self,
        rows: Sequence[Row],
        placed: Mapping[int, tuple[int, int]] | None,
        drafted: Draft | None = None,
    ) -> AbstractContextManager[None]:
        """Record where the batch went, then run the block (the Kafka commit); a refusal
        raises before the block."""
        ...

    def bury(self, row_id: int, error: str) -> None: ...
    def recover(self, marker: Marker, shards: Sequence[int], *, record: bool) -> int: ...
    def lock_state(self, slot: int, slots: int) -> SlotLockState | None: ...
    def heartbeat(self) -> bool: ...
    def wait_for_news(self, timeout: float) -> bool: ...
    def release(self, slot: int) -> None: ...


ProducerFactory = Callable[[dict[str, Any]], KafkaProducer]
SessionFactory = Callable[[psycopg.Connection[dict[str, Any]]], SlotSession]


def kafka_producer(settings: dict[str, Any]) -> KafkaProducer:
    """The real producer (looked up at call time, so a test may spy on ``seams.Producer``)."""
    producer: KafkaProducer = Producer(settings)
    return producer


class AbortProbe(Protocol):
    """Whether the broker hides aborted transactions from read_committed readers
    (``abort_probe.aborts_hidden``; None: no clear answer): when a slot may send its marker
    with the records, and whether its recovery may read past a stuck stable offset."""

    def __call__(
        self,
        producer: KafkaProducer,
        connection: Mapping[str, str],
        topic: str,
        partition: int,
        key: bytes,
        *,
        timeout: float = ...,
        remember_as: str | None = ...,
    ) -> bool | None: ...


@dataclass(frozen=True)
class Seams:
    """How a relay makes a slot's producer and its database session, and learns how the
    broker shows aborted transactions."""

    producer: ProducerFactory = kafka_producer
    session: SessionFactory = PsycopgSlotSession
    aborts_hidden: AbortProbe = aborts_hidden
