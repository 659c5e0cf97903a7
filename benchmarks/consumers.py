"""The consumers the benchmarks run: deduplicating ones (``IdempotentConsumer``) and a plain one.

Every handler does the same one INSERT per message, so the difference between
the deduplicating consumer and the plain at-least-once loop is the dedup
record, the decoding and the bookkeeping, nothing else.

``python -m benchmarks.consumers ...`` runs the latency consumer in a process of
its own (started by ``end_to_end_latency``): handler entry times, and the
moment each record arrived from Kafka, go to the ``bench_received`` table.
"""

from __future__ import annotations

import argparse
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from benchmarks.harness import GROUP_SETTINGS
from consumer import Event, IdempotentConsumer, runner_of
from consumer.config import ConsumerConfig
from outbox.codec import EVENT_ID_HEADER

EFFECTS_DDL = """
CREATE TABLE IF NOT EXISTS bench_effects (
  id bigserial PRIMARY KEY, event_id text NOT NULL, payload bytea
)
"""
INSERT_EFFECT = text("INSERT INTO bench_effects (event_id, payload) VALUES (:event_id, :payload)")

RECEIVED_DDL = """
CREATE TABLE IF NOT EXISTS bench_received (
  event_id text NOT NULL, kind text NOT NULL, at double precision NOT NULL,
  PRIMARY KEY (event_id, kind)
)
"""
INSERT_RECEIVED = text(
    "INSERT INTO bench_received (event_id, kind, at) VALUES (:event_id, :kind, :at) "
    "ON CONFLICT DO NOTHING"
)


def header_event_id(msg: Any) -> str | None:
    """The ``outbox-event-id`` header of a ``confluent_kafka.Message``."""
    for name, value in msg.headers() or ():
        if name == EVENT_ID_HEADER and isinstance(value, bytes):
            return value.decode()
    return None


class EffectConsumer(IdempotentConsumer):
    """Deduplicating consumer with the one-INSERT handler; times its first and last event."""

    def __init__(self, *args: Any, expected: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.expected = expected
        self.first: float | None = None
        self.last: float | None = None
        self.applied = 0

    def handle(self, session: Session, event: Event) -> None:
        if self.first is None:
            self.first = time.perf_counter()
        session.execute(INSERT_EFFECT, {"event_id": event.id, "payload": event.raw})

    def on_committed(self, events: Sequence[Event]) -> None:
        self.applied += len(events)
        if self.applied >= self.expected:
            self.last = time.perf_counter()
            self.stop.set()


def plain_consume(engine: Engine, config: ConsumerConfig, expected: int) -> tuple[float, float]:
    """At-least-once: consume a batch, one DB transaction of INSERTs, commit offsets after it.

    Same librdkafka settings and batch size as the deduplicating consumer
    (``ConsumerConfig.plan()``); returns (first handled, last committed) times.
    """
    consumer = Consumer(dict(config.plan().settings))
    consumer.subscribe(list(config.topics))
    first: float | None = None
    done = 0
    try:
        while done < expected:
            messages = consumer.consume(num_messages=config.batch_size, timeout=config.poll_timeout)
            records: list[Any] = [m for m in messages if m.error() is None]
            if not records:
                continue
            if first is None:
                first = time.perf_counter()
            offsets: dict[tuple[str, int], int] = {}
            with Session(engine) as session, session.begin():
                for msg in records:
                    position = f"{msg.topic()}/{msg.partition()}/{msg.offset()}"
                    event_id = header_event_id(msg) or position
                    session.execute(INSERT_EFFECT, {"event_id": event_id, "payload": msg.value()})
                    offsets[(msg.topic(), msg.partition())] = msg.offset() + 1
            done += len(records)
            last = time.perf_counter()
            consumer.commit(
                offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()],
                asynchronous=False,
            )
    finally:
        consumer.close()
    assert first is not None
    return first, last


class LatencyConsumer(IdempotentConsumer):
    """Records handler entry time (wall clock, comparable with the writer's commit time) and
    when the runner's fetch handed the record over, which splits the consumer's share into
    fetching and its own work before the handler (dedup marks, transaction)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fetched: dict[str, float] = {}
        runner_of(self).group.fetch = self._timed_fetch

    def _timed_fetch(self, _kafka: Any, default: Callable[[], list[Any]]) -> list[Any]:
        messages = default()
        at = time.time()
        for msg in messages:
            event_id = header_event_id(msg) if msg.error() is None else None
            if event_id is not None:
                self.fetched[event_id] = at
        return messages

    def handle(self, session: Session, event: Event) -> None:
        at = time.time()
        rows = [{"event_id": event.id, "kind": "handler", "at": at}]
        fetched = self.fetched.pop(event.id, None)
        if fetched is not None:
            rows.append({"event_id": event.id, "kind": "fetched", "at": fetched})
        session.execute(INSERT_RECEIVED, rows)


class ArrivalReader(threading.Thread):
    """A plain ``read_committed`` reader that notes when each record arrives from Kafka.

    It isolates the relay's share of the latency (commit -> record readable)
    from the consumer's batching. ``assign`` from the end, no group join.
    """

    def __init__(
        self,
        engine: Engine,
        bootstrap_servers: str,
        topic: str,
        settings: dict[str, str] | None = None,
    ) -> None:
        super().__init__(name="bench-arrivals", daemon=True)
        self.engine = engine
        self.stop = threading.Event()
        self.ready = threading.Event()
        # ``settings``: the consumer under test's own (fetch settings included), so that
        # readable -> handler is the consumer's work, not a difference in fetching.
        fetch = {"fetch.wait.max.ms": "5"} if settings is None else settings
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap_servers,
                "group.id": "bench-arrivals",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                **fetch,
            }
        )
        md = self.consumer.list_topics(topic, timeout=30)
        parts = sorted(md.topics[topic].partitions)
        ends = [self.consumer.get_watermark_offsets(TopicPartition(topic, p), 30)[1] for p in parts]
        self.consumer.assign(
            [TopicPartition(topic, p, end) for p, end in zip(parts, ends, strict=True)]
        )

    def run(self) -> None:
        pending: list[dict[str, Any]] = []
        flushed = time.monotonic()
        self.ready.set()
        while not self.stop.is_set():
            msg: Any = self.consumer.poll(0.05)
            if msg is not None and msg.error() is None:
                at = time.time()
                event_id = header_event_id(msg)
                if event_id is not None:
                    pending.append({"event_id": event_id, "kind": "kafka", "at": at})
            if pending and (time.monotonic() - flushed > 0.5 or self.stop.is_set()):
                self._flush(pending)
                pending, flushed = [], time.monotonic()
        if pending:
            self._flush(pending)
        self.consumer.close()

    def _flush(self, rows: list[dict[str, Any]]) -> None:
        with Session(self.engine) as session, session.begin():
            session.execute(INSERT_RECEIVED, rows)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the latency consumer, or the arrival reader, until SIGTERM.

    Two processes, not two threads: the reader's periodic bulk insert would
    otherwise hold the GIL while the consumer under test waits for it.
    """
    parser = argparse.ArgumentParser(prog="python -m benchmarks.consumers")
    parser.add_argument("--role", choices=("consumer", "arrivals"), default="consumer")
    parser.add_argument("--db", required=True)
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--poll-timeout", type=float, default=1.0)
    parser.add_argument("-X", dest="settings", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--reader-uses-settings",
        action="store_true",
        help="the arrival reader fetches with the -X settings (default: fetch.wait.max.ms=5)",
    )
    args = parser.parse_args(argv)
    engine = create_engine(args.db, pool_size=2)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        if args.role == "arrivals":
            given = dict(kv.split("=", 1) for kv in args.settings)
            reader = ArrivalReader(
                engine,
                args.bootstrap_servers,
                args.topic,
                given if args.reader_uses_settings else None,
            )
            reader.stop = stop
            reader.run()
            return
        consumer = LatencyConsumer(
            engine,
            args.bootstrap_servers,
            topics=[args.topic],
            group_id=args.group,
            batch_size=args.batch_size,
            poll_timeout=args.poll_timeout,
            settings={**GROUP_SETTINGS, **dict(kv.split("=", 1) for kv in args.settings)},
            stop=stop,
        )
        consumer.run()
    finally:
        engine.dispose()


if __name__ == "__main__":
    main()
