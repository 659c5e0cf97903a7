"""Faults injected into a real relay through its seams (``outbox.relay.Seams``).

The relay's real producer and real database session, wrapped: each hook, when set, runs at
its point of the batch on the slot's own thread. No method of the worker is patched, so the
tests pin what the relay does with Kafka and PostgreSQL, not how its methods are named.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg
from confluent_kafka import KafkaError, Producer

from outbox.relay import Row, Seams
from outbox.relay.rows import Headers
from outbox.relay.slot_session import PsycopgSlotSession


@dataclass(frozen=True)
class Sent:
    """A record the relay handed to the producer (with a delivery report to come)."""

    topic: str
    key: bytes | None
    value: bytes | None


def slot_of_this_thread() -> int:
    """The slot whose worker thread runs the caller (``outbox-slot-N``)."""
    return int(threading.current_thread().name.rsplit("-", 1)[1])


@dataclass
class Faults:
    """Hooks around a relay's producers and slot sessions; set any of them, even while the
    relay runs (they are read at each call)."""

    # Per batch (the records between two flushes that completed): index -> error code to
    # report instead of the broker's answer.
    reports: Callable[[FaultyProducer, list[Sent]], dict[int, int]] | None = None
    # Replaces commit_transaction(timeout); call producer.real to commit for real.
    commit: Callable[[FaultyProducer, float], None] | None = None
    started: Callable[[FaultyProducer], None] | None = None  # after init_transactions
    claimed: Callable[[TrackedSession, list[Row]], None] | None = None  # after each claim
    producers: list[FaultyProducer] = field(default_factory=list)
    connections: dict[int, psycopg.Connection[dict[str, Any]]] = field(default_factory=dict)

    def seams(self) -> Seams:
        return Seams(
            producer=lambda settings: FaultyProducer(settings, self),
            session=lambda conn: TrackedSession(conn, self),
        )

    def lose_connection(self) -> None:
        """Close the calling slot's database connection, as a dead server or network would."""
        self.connections[slot_of_this_thread()].close()


class FaultyProducer:
    """A real confluent-kafka producer that runs the hooks of ``Faults``."""

    def __init__(self, settings: dict[str, Any], faults: Faults) -> None:
        self.real = Producer(settings)
        self.faults = faults
        self.slot = slot_of_this_thread()
        self._batch: list[tuple[Sent, Callable[[Any, Any], None]]] = []
        self._reports: dict[int, tuple[Any, Any]] = {}
        faults.producers.append(self)

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
        if on_delivery is None or self.faults.reports is None:
            self.real.produce(
                topic,
                value=value,
                key=key,
                partition=partition,
                on_delivery=on_delivery,
                timestamp=timestamp,
                headers=headers,
            )
            return
        index = len(self._batch)

        def held(err: Any, msg: Any) -> None:
            self._reports[index] = (err, msg)

        self.real.produce(
            topic,
            value=value,
            key=key,
            partition=partition,
            on_delivery=held,
            timestamp=timestamp,
            headers=headers,
        )
        self._batch.append((Sent(topic, key, value), on_delivery))

    def flush(self, timeout: float = -1) -> int:
        """Delivery reports reach the relay once its whole batch has one, with the errors
        ``Faults.reports`` picks for it."""
        unsent = self.real.flush(timeout)
        if self._batch and (unsent == 0 or len(self._reports) == len(self._batch)):
            batch, reports = self._batch, self._reports
            self._batch, self._reports = [], {}
            pick = self.faults.reports
            codes = pick(self, [sent for sent, _ in batch]) if pick is not None else {}
            for i, (_, report) in enumerate(batch):
                err, msg = reports.get(i, (None, None))
                if i in codes:
                    err = KafkaError(codes[i], fatal=codes[i] == KafkaError._FATAL)
                report(err, msg)
        return unsent

    def poll(self, timeout: float = -1) -> int:
        return self.real.poll(timeout)

    def purge(self, in_queue: bool = True, in_flight: bool = True, blocking: bool = True) -> None:
        self.real.purge(in_queue=in_queue, in_flight=in_flight, blocking=blocking)

    def init_transactions(self, timeout: float = -1) -> None:
        self.real.init_transactions(timeout)
        if self.faults.started is not None:
            self.faults.started(self)

    def begin_transaction(self) -> None:
        self.real.begin_transaction()

    def commit_transaction(self, timeout: float = -1) -> None:
        if self.faults.commit is not None:
            self.faults.commit(self, timeout)
        else:
            self.real.commit_transaction(timeout)

    def abort_transaction(self, timeout: float = -1) -> None:
        self.real.abort_transaction(timeout)

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        return self.real.list_topics(topic, timeout)


class TrackedSession(PsycopgSlotSession):
    """The real slot session; remembers its connection by slot and runs ``Faults.claimed``."""

    def __init__(self, conn: psycopg.Connection[dict[str, Any]], faults: Faults) -> None:
        super().__init__(conn)
        self.faults = faults

    def claim(
        self,
        shards: Sequence[int],
        *,
        limit: int,
        held: Sequence[str],
        max_value_bytes: int,
        max_bytes: int,
    ) -> list[Row]:
        self.faults.connections[slot_of_this_thread()] = self.conn
        rows = super().claim(
            shards, limit=limit, held=held, max_value_bytes=max_value_bytes, max_bytes=max_bytes
        )
        if self.faults.claimed is not None:
            self.faults.claimed(self, rows)
        return rows
