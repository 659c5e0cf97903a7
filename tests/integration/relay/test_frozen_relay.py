"""A relay that stops answering (frozen by SIGSTOP, a stuck VM; or cut off from its database)
loses its slots within --takeover-timeout while another relay could serve them (I12); woken
up, it is fenced and publishes nothing twice (I4)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from outbox import publish, sql
from outbox.relay import SLOT_NAMESPACE
from outbox.relay.coordinator import CONTROL_SILENCE
from tests.conftest import Broker, RelayHandle, _libpq
from tests.support import KafkaReader, assert_exactly_once, wait_for

OUTBOX = str(Path(sys.executable).parent / "outbox")
TAKEOVER = ["--takeover-timeout", "3"]
"""Small, so the test is quick; the default (30 s) is the README's."""


def _pending(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM outbox_events")).scalar_one())


def _publish(engine: Engine, topic: str, n: int, tag: str) -> list[str]:
    with Session(engine) as session, session.begin():
        return [
            str(publish(session, topic=topic, key=f"{tag}-{i}", value=f"{tag}-{i}"))
            for i in range(n)
        ]


def _owners(database_url: str) -> Counter[int]:
    """Slots held per relay process (its pid, from the slot connection's application_name)."""
    with psycopg.connect(_libpq(database_url), autocommit=True) as conn:
        rows = conn.execute(sql.SLOT_OWNERS, {"namespace": SLOT_NAMESPACE}).fetchall()
    return Counter(int(str(row[2]).split(":")[1]) for row in rows)


@pytest.fixture
def relays(
    database_url: str, bootstrap_servers: str, tmp_path: Path
) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Start ``outbox relay`` daemons of one outbox (two slots); all are stopped at the end."""
    started: list[subprocess.Popen[bytes]] = []
    prefix = f"frozen-{uuid.uuid4().hex[:6]}"

    def start() -> subprocess.Popen[bytes]:
        log = (tmp_path / f"relay-{len(started)}.log").open("wb")
        args = [OUTBOX, "relay", "--db", database_url, "-b", bootstrap_servers, "--slots", "2"]
        args += ["--transactional-id-prefix", prefix, "--poll-interval", "0.2", *TAKEOVER]
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
    for proc in started:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    # Shown with a failure only (pytest's captured output): the relays' own account of it,
    # which pytest's rotation of temporary directories deletes soon after.
    for n in range(len(started)):
        lines = (tmp_path / f"relay-{n}.log").read_text(errors="replace").splitlines()
        print(f"--- relay-{n}.log, last {min(len(lines), 80)} of {len(lines)} lines ---")
        print("\n".join(lines[-80:]))


def test_i12_a_frozen_relays_slots_are_taken_over_and_it_publishes_nothing_twice_when_woken(
    engine: Engine,
    database_url: str,
    topic: str,
    broker: Broker,
    relays: Callable[[], subprocess.Popen[bytes]],
    kafka: KafkaReader,
) -> None:
    a = relays()
    wait_for(lambda: _owners(database_url)[a.pid] == 2, timeout=60, what="a owns both slots")
    b = relays()
    wait_for(
        lambda: _owners(database_url) == Counter({a.pid: 1, b.pid: 1}),
        timeout=60,
        what="the relays split the slots",
    )
    ids = _publish(engine, topic, 10, "before")
    wait_for(lambda: _pending(engine) == 0, timeout=60, what="both relays publish")

    os.kill(a.pid, signal.SIGSTOP)
    frozen_at = time.monotonic()
    ids += _publish(engine, topic, 20, "frozen")  # spread over both slots
    wait_for(lambda: _pending(engine) == 0, timeout=60, what="b takes the frozen relay's slot")
    assert time.monotonic() - frozen_at < 60
    assert _owners(database_url) == Counter({b.pid: 2})

    os.kill(a.pid, signal.SIGCONT)
    wait_for(
        lambda: _owners(database_url) == Counter({a.pid: 1, b.pid: 1}),
        timeout=60,
        what="the woken relay takes its share again",
    )
    ids += _publish(engine, topic, 10, "after")
    wait_for(lambda: _pending(engine) == 0, timeout=60, what="both relays publish again")
    assert a.poll() is None, "the woken relay exited"
    assert_exactly_once(kafka.read(topic, len(ids)), ids)


class SilentLink:
    """A loopback TCP forwarder that can go silent: bytes stop flowing both ways but no
    connection is closed, as across a network partition (no FIN, no RST)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.flowing = threading.Event()
        self.flowing.set()
        self.closed = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.port = self.server.getsockname()[1]
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                client, _ = self.server.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                continue
            self.sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        src.settimeout(None)
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                self.flowing.wait()  # silent: held here, the sender's kernel keeps its socket
                dst.sendall(data)
        for s in (src, dst):  # an end closed: the other end learns it once the link flows
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.closed.set()
        self.flowing.set()
        for s in [self.server, *self.sockets]:
            with contextlib.suppress(OSError):
                s.close()


def test_i12_readyz_fails_while_the_database_does_not_answer_and_recovers_after(
    database_url: str, start_relay: Callable[..., RelayHandle]
) -> None:
    """Across a silent partition the relay's queries hang instead of failing: /readyz says so
    within a few of the coordinator's loops, not after the TCP timeouts."""
    url = make_url(database_url)
    assert url.port is not None
    link = SilentLink(url.port)
    try:
        handle = start_relay(
            dsn=url.set(port=link.port).render_as_string(hide_password=False),
            takeover_timeout=3,
        )
        wait_for(lambda: handle.relay.readiness()[0], timeout=60, what="the relay is ready")
        link.flowing.clear()
        silent_since = time.monotonic()

        def not_ready() -> str:
            ok, why = handle.relay.readiness()
            return "" if ok else why

        reason = wait_for(not_ready, timeout=30, what="/readyz to fail")
        assert time.monotonic() - silent_since < CONTROL_SILENCE + 5
        assert "database" in reason
        link.flowing.set()
        wait_for(
            lambda: handle.relay.readiness()[0],
            timeout=60,
            what=f"ready again (last: {handle.relay.readiness()[1]})",
        )
        handle.stop()
    finally:
        link.close()


def _in_batch(conn: psycopg.Connection[Any], pid: int) -> bool:
    """Whether one of the relay's slot sessions is inside a batch's database transaction (its
    rows deleted, its Kafka transaction not yet committed)."""
    row = conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s "
        "AND state = 'idle in transaction'",
        (f"outbox-relay:{pid}:slot-%",),
    ).fetchone()
    return row is not None and int(row[0]) > 0


@pytest.mark.both_brokers
def test_i12_a_relay_frozen_mid_batch_is_fenced_and_nothing_is_published_twice_or_lost(
    engine: Engine,
    database_url: str,
    topic: str,
    broker: Broker,
    relays: Callable[[], subprocess.Popen[bytes]],
    kafka: KafkaReader,
) -> None:
    """Frozen between deleting its batch's rows and committing their Kafka transaction: the
    server rolls the delete back, the other relay takes the slot (fencing the frozen
    producer), and when it wakes its commit fails; every event is read once."""
    a = relays()
    wait_for(lambda: _owners(database_url)[a.pid] == 2, timeout=60, what="a owns both slots")
    b = relays()
    wait_for(
        lambda: _owners(database_url) == Counter({a.pid: 1, b.pid: 1}),
        timeout=60,
        what="the relays split the slots",
    )
    ids: list[str] = []
    stop = threading.Event()

    def publisher() -> None:
        n = 0
        while not stop.is_set():
            ids.extend(_publish(engine, topic, 5, f"p{n}"))
            n += 1

    thread = threading.Thread(target=publisher, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 120
        frozen = False
        with psycopg.connect(_libpq(database_url), autocommit=True) as watch:
            while not frozen:
                assert time.monotonic() < deadline, "the relay was never caught mid-batch"
                if not _in_batch(watch, a.pid):
                    continue
                os.kill(a.pid, signal.SIGSTOP)
                frozen = _in_batch(watch, a.pid)  # still inside it, now that it is stopped
                if not frozen:
                    os.kill(a.pid, signal.SIGCONT)
        wait_for(
            lambda: _owners(database_url) == Counter({b.pid: 2}),
            timeout=60,
            what="b takes the frozen relay's slot",
        )
        os.kill(a.pid, signal.SIGCONT)
        wait_for(
            lambda: _owners(database_url) == Counter({a.pid: 1, b.pid: 1}),
            timeout=60,
            what="the woken relay takes its share again",
        )
    finally:
        stop.set()
        thread.join(30)
    # Two takeovers each read a marker that Tansu's stable offset may hold back, up to
    # MARKER_READ_TIMEOUT (30 s) a try: 60 s ran out once in CI beside other tests' load.
    wait_for(lambda: _pending(engine) == 0, timeout=120, what="both relays publish everything")
    assert a.poll() is None, "the woken relay exited"
    # The frozen batch may have produced before it stopped; fencing aborts that transaction, and
    # Tansu shows aborted records to read_committed readers. Apache Kafka checks the strict form.
    assert_exactly_once(
        kafka.read(topic, len(ids)), ids, aborted_copies_visible=not broker.filters_aborts
    )


def _control_backend(database_url: str, name: str) -> int | None:
    with psycopg.connect(_libpq(database_url), autocommit=True) as conn:
        row = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (name,)
        ).fetchone()
    return None if row is None else int(row[0])


def test_i12_a_live_relay_keeps_its_control_session_at_the_shortest_takeover_timeout(
    database_url: str, start_relay: Callable[..., RelayHandle]
) -> None:
    """At --takeover-timeout=1 the coordinator still speaks often enough that the server
    never ends its control session (which holds the relay's announcements) while it runs."""
    handle = start_relay(slots=2, takeover_timeout=1.0)
    wait_for(lambda: len(handle.relay.workers) == 2, timeout=60, what="the relay owns its slots")
    name = handle.relay.name
    first = _control_backend(database_url, name)
    assert first is not None
    watched_until = time.monotonic() + 6  # six takeover timeouts
    wait_for(
        lambda: _control_backend(database_url, name) != first or time.monotonic() > watched_until,
        timeout=30,
        what="six takeover timeouts to pass",
    )
    assert _control_backend(database_url, name) == first, "the server ended the control session"
    handle.stop()
