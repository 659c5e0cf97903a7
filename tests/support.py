"""Helpers shared by the integration and acceptance tests: waiting, reading topics back,
relays and consumers in threads, ``outbox consume`` in a subprocess."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Protocol, Self, TypeVar, cast

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    TopicPartition,
)

from outbox.cli.delivery import MOVING_LEADER
from outbox.relay.classify import message_headers

T = TypeVar("T")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


def wait_for(condition: Callable[[], T], *, timeout: float = 30.0, what: str = "condition") -> T:
    """Poll ``condition`` until it returns something truthy, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(delay)  # polling interval of a deadline-bounded wait, not synchronisation
        delay = min(delay * 2, 0.2)


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    timestamp_ms: int

    @property
    def event_id(self) -> str:
        return self.headers["outbox-event-id"].decode()


class TopicReadError(AssertionError):
    """A topic could not be read to the end of every partition: the caller saw only part of it."""


def _record(msg: Message) -> Record:
    _ts_type, ts = msg.timestamp()
    key, value = msg.key(), msg.value()
    return Record(
        topic=str(msg.topic()),
        partition=int(msg.partition() or 0),
        offset=int(msg.offset() or 0),
        key=key if isinstance(key, bytes) else None,
        value=value if isinstance(value, bytes) else None,
        headers=message_headers(msg),
        timestamp_ms=ts,
    )


def read_topic(
    bootstrap_servers: str,
    topic: str,
    *,
    expected: int | None = None,
    timeout: float = 30.0,
    isolation_level: str = "read_committed",
) -> list[Record]:
    """Every copy of every record of ``topic``, read from the start to the end of each partition.

    "The end" of a partition: the reader got PARTITION_EOF there (nothing came after it), at
    an offset no lower than the end queried before the read. Both are queried with the
    reader's isolation level: for ``read_committed`` the end is the last stable offset (LSO),
    the first offset of a still open transaction, not the high watermark, so nothing this
    reader could ever see is left behind. (Tansu 0.6 under-reports ListOffsets for
    idempotent batches, so the EOF, which follows the fetch responses, is what ends a read;
    on Apache Kafka both agree.)

    With ``expected``, the ends are queried again until at least that many records were read
    (records that are still being produced); the read returns what it has at ``timeout``, the
    caller's count assert says what is missing. Any error other than PARTITION_EOF, or a
    partition not read to its end in time, raises ``TopicReadError``. A topic that does not
    exist has no records.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap_servers,
            "group.id": f"test-reader-{uuid.uuid4().hex}",
            "isolation.level": isolation_level,
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
        }
    )
    records: list[Record] = []
    deadline = time.monotonic() + timeout
    try:
        meta = consumer.list_topics(topic, timeout=max(1.0, timeout)).topics.get(topic)
        if meta is not None and meta.error is not None:
            if meta.error.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
                return records
            raise TopicReadError(f"reading {topic}: metadata error {meta.error}")
        if meta is None:
            return records
        partitions = [TopicPartition(topic, p) for p in sorted(meta.partitions)]
        consumer.assign([TopicPartition(topic, p.partition, OFFSET_BEGINNING) for p in partitions])
        # Offset of the PARTITION_EOF last seen on each partition; -1: a record came after it.
        eof = dict.fromkeys((p.partition for p in partitions), -1)

        def take(msg: Message | None) -> None:
            if msg is None:
                return
            err = msg.error()
            p = int(msg.partition() or 0)
            if err is None:
                records.append(_record(msg))
                eof[p] = -1
            elif err.code() == KafkaError._PARTITION_EOF:
                eof[p] = int(msg.offset() or 0)
            else:
                raise TopicReadError(f"reading {topic}[{p}]: {err}")

        while True:
            ends = {p.partition: high_watermark(consumer, p, deadline) for p in partitions}
            while not all(eof[p] >= end for p, end in ends.items()):
                if time.monotonic() > deadline:
                    raise TopicReadError(
                        f"reading {topic}: partitions not read to their end within "
                        f"{timeout:.0f}s (partition: (end-of-partition offset, watermark)) "
                        f"{ {p: (eof[p], e) for p, e in ends.items()} }"
                    )
                take(consumer.poll(0.2))
            if expected is None or len(records) >= expected or time.monotonic() > deadline:
                return records
            # Fewer than expected so far: keep reading (a record that arrives resets its
            # partition's end-of-partition, so the loop above reads on to the new end).
            take(consumer.poll(0.2))
    finally:
        consumer.close()


WATERMARK_RETRIABLE = MOVING_LEADER | {KafkaError._TIMED_OUT, KafkaError._TRANSPORT}
"""Watermark errors asked again: `outbox verify`'s moving-leader set, plus the tests' own
slow or cut connections. A CI run failed a read right after a killed node came back
(NOT_LEADER_FOR_PARTITION)."""


class _Watermarks(Protocol):
    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float, cached: bool
    ) -> tuple[int, int]: ...


def high_watermark(consumer: _Watermarks, partition: TopicPartition, deadline: float) -> int:
    """The partition's high watermark from its leader, asked again while the leader moves."""
    while True:
        try:
            return consumer.get_watermark_offsets(partition, timeout=10, cached=False)[1]
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            code = error.code() if isinstance(error, KafkaError) else None
            if code not in WATERMARK_RETRIABLE or time.monotonic() > deadline:
                raise
        time.sleep(0.2)  # polling the moving leader, bounded by the read's deadline


class KafkaReader:
    """An independent client (read_committed by default): what really landed on a topic."""

    def __init__(self, bootstrap_servers: str, *, stable_offset_sticks: bool = False) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.stable_offset_sticks = stable_offset_sticks

    def read(
        self, topic: str, expected: int | None = None, *, timeout: float = 30.0
    ) -> list[Record]:
        """Every copy on ``topic``, to the end of each partition (see ``read_topic``)."""
        return read_topic(self.bootstrap_servers, topic, expected=expected, timeout=timeout)

    def read_every(self, topic: str, ids: Iterable[str], *, timeout: float = 60.0) -> list[Record]:
        """Every copy on ``topic``, read again until each of ``ids`` is among them or
        ``timeout`` passed: ``read`` waits for a count of records, which aborted copies fill
        on a broker that shows them.

        On a broker whose last stable offset sticks (Tansu 0.6) this reads read_uncommitted.
        With many transactional producers committing to one partition at once, Tansu can
        leave the partition's last stable offset below transactions whose commit it
        acknowledged, for good: a read_committed reader never gets past it. Plain
        confluent-kafka producers show it (17 producers, 3 transactions of 4 records each,
        one core busy: 8 to 132 of 204 committed records unreadable in 3 of 12 runs, still
        after 30 s); a 17-slot relay test missed the batch its relay committed last. Tansu
        shows aborted records to read_committed readers anyway, so read_uncommitted reads
        the same records without the stall."""
        isolation = "read_uncommitted" if self.stable_offset_sticks else "read_committed"
        wanted = set(ids)
        deadline = time.monotonic() + timeout
        while True:
            records = read_topic(
                self.bootstrap_servers,
                topic,
                expected=len(wanted),
                timeout=max(1.0, deadline - time.monotonic()),
                isolation_level=isolation,
            )
            seen = {r.event_id for r in records}
            if wanted <= seen or time.monotonic() > deadline:
                return records

    def close(self) -> None:
        """Nothing stays open between reads; kept for the fixture's teardown."""


class AbortedCopiesVisible(UserWarning):
    """Copies of events from aborted Kafka transactions were read (a broker that shows them)."""


def copies(records: Iterable[Record]) -> Counter[str]:
    """How many times each event id is on the topic."""
    return Counter(r.event_id for r in records)


def assert_exactly_once(
    records: Iterable[Record], expected: Iterable[str], *, aborted_copies_visible: bool = False
) -> int:
    """Each expected event is on the topic, nothing else is, and (normally) exactly once.

    ``aborted_copies_visible``: the test aborted Kafka transactions and the broker shows their
    records to read_committed readers (Tansu: ``not broker.filters_aborts``). Extra copies are
    then reported as an ``AbortedCopiesVisible`` warning instead of failing. Returns the number of
    extra copies.
    """
    counts = copies(records)
    wanted = set(expected)
    missing = sorted(wanted - counts.keys())
    unexpected = sorted(counts.keys() - wanted)
    assert not missing, f"{len(missing)} events missing from the topic, e.g. {missing[:5]}"
    assert not unexpected, f"{len(unexpected)} events on the topic not expected: {unexpected[:5]}"
    repeated = {e: n for e, n in counts.items() if n > 1}
    extra = sum(n - 1 for n in repeated.values())
    if aborted_copies_visible:
        if extra:
            warnings.warn(
                f"{extra} extra copies of {len(repeated)} events (aborted transactions shown "
                "by this broker)",
                AbortedCopiesVisible,
                stacklevel=2,
            )
    else:
        assert extra == 0, f"{extra} extra copies: {dict(list(repeated.items())[:5])}"
    return extra


class Runs(Protocol[R_co]):
    """A relay or a consumer: ``run()`` works until its ``stop`` event is set."""

    stop: threading.Event

    def run(self) -> R_co: ...


class InThread(Generic[R]):
    """``target.run()`` in a daemon thread of the test process, started by ``thread.start()``
    or ``with``; ``stop()`` ends it and returns what ``run()`` returned (its counters) or
    raises what it raised."""

    def __init__(self, target: Runs[R], *, what: str, name: str | None = None) -> None:
        self.target = target
        self.what = what
        self.error: BaseException | None = None
        self.result: R | None = None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)

    def _run(self) -> None:
        try:
            self.result = self.target.run()
        except BaseException as exc:
            self.error = exc

    def stop(self) -> R:
        self.target.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), f"{self.what} did not stop within 60 s"
        if self.error is not None:
            raise self.error
        return cast(R, self.result)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def stop_all(handles: Iterable[InThread[Any]]) -> None:
    """A fixture's teardown: every one is told to stop first, so they wind down together;
    what they raised is left to the tests, which stop them themselves to check it."""
    handles = list(handles)
    for handle in handles:
        handle.target.stop.set()
    for handle in handles:
        handle.thread.join(60)


def consume_command(
    consumer_class: str,
    database_url: str,
    bootstrap_servers: str,
    topic: str,
    group: str,
    *extra: str,
) -> list[str]:
    """``outbox consume`` for a subprocess, with a short group session so that joining the
    group, and handing a killed member's partitions over, take seconds."""
    return [
        sys.executable,
        "-m",
        "outbox.cli",
        "consume",
        consumer_class,
        "--db",
        database_url,
        "--bootstrap-servers",
        bootstrap_servers,
        "--topic",
        topic,
        "--group-id",
        group,
        "-X",
        "session.timeout.ms=6000",
        "-X",
        "heartbeat.interval.ms=1000",
        *extra,
    ]


class TcpProxy:
    """A loopback TCP proxy whose link can be cut and restored (network faults on demand)."""

    def __init__(self, target_port: int, listen_port: int) -> None:
        import socket
        import threading

        self.target_port = target_port
        self.listen_port = listen_port
        self._socket = socket
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._up = threading.Event()
        self._up.set()
        self._closed = threading.Event()
        self._server = socket.create_server(("127.0.0.1", listen_port), reuse_port=False)
        self._server.settimeout(0.2)
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        import threading

        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                continue
            if not self._up.is_set():
                client.close()
                continue
            try:
                upstream = self._socket.create_connection(
                    ("127.0.0.1", self.target_port), timeout=5
                )
            except OSError:
                client.close()
                continue
            with self._lock:
                if not self._up.is_set():  # cut() ran while we were connecting
                    client.close()
                    upstream.close()
                    continue
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: object, dst: object) -> None:
        import socket

        assert isinstance(src, socket.socket)
        assert isinstance(dst, socket.socket)
        try:
            src.settimeout(None)
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every open connection and refuse new ones until restore()."""
        self._up.clear()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(self._socket.SHUT_RDWR)
            s.close()

    def restore(self) -> None:
        self._up.set()

    def close(self) -> None:
        self._closed.set()
        self.cut()
        self._server.close()
        self._thread.join(2)
