"""Helpers shared by the integration and acceptance tests: waiting, reading topics back."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from confluent_kafka import Consumer, TopicPartition

from outbox.kafka import message_headers

T = TypeVar("T")


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


class KafkaReader:
    """An independent read_committed client: what really landed on a topic."""

    def __init__(self, bootstrap_servers: str) -> None:
        self.bootstrap_servers = bootstrap_servers
        self._consumers: list[Consumer] = []

    def read(self, topic: str, expected: int, *, timeout: float = 30.0) -> list[Record]:
        """Read from the beginning until ``expected`` records arrived (then a short extra look)."""
        consumer = Consumer(
            {
                "bootstrap.servers": self.bootstrap_servers,
                "group.id": f"test-reader-{uuid.uuid4().hex}",
                "isolation.level": "read_committed",
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
            }
        )
        self._consumers.append(consumer)
        md = consumer.list_topics(topic, timeout=10)
        partitions = list(md.topics[topic].partitions) if topic in md.topics else []
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        records: list[Record] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                if len(records) >= expected:
                    break  # nothing more within a poll after reaching the count
                continue
            if msg.error():
                continue
            _ts_type, ts = msg.timestamp()
            headers = message_headers(msg)
            key, value = msg.key(), msg.value()
            records.append(
                Record(
                    topic=str(msg.topic()),
                    partition=int(msg.partition() or 0),
                    offset=int(msg.offset() or 0),
                    key=key if isinstance(key, bytes) else None,
                    value=value if isinstance(value, bytes) else None,
                    headers=headers,
                    timestamp_ms=ts,
                )
            )
        consumer.close()
        self._consumers.remove(consumer)
        return records

    def close(self) -> None:
        for c in self._consumers:
            c.close()


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
