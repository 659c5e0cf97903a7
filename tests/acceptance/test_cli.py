"""The real ``outbox`` command in a subprocess, as a user or an init system runs it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from outbox import publish
from tests.conftest import Broker
from tests.support import KafkaReader, assert_exactly_once, wait_for

OUTBOX = str(Path(sys.executable).parent / "outbox")


def run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1"}
    return subprocess.run(
        [OUTBOX, *args], capture_output=True, text=True, timeout=timeout, check=False, env=env
    )


def _pending(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM outbox_events")).scalar_one())


def _relay_args(db: str, bootstrap: str, prefix: str, *extra: str) -> list[str]:
    """``outbox relay`` against the test services, with a transactional.id prefix of its own."""
    return ["relay", "--db", db, "-b", bootstrap, "--transactional-id-prefix", prefix, *extra]


def _signal_after_batches(
    proc: subprocess.Popen[bytes], batches: int, sig: signal.Signals, *, timeout: float = 60
) -> tuple[int, bytes]:
    """Send ``sig`` to ``proc``, an ``outbox relay`` at DEBUG, as soon as it logged
    ``batches`` published batches; its exit code and stderr once it exited. Polling the
    outbox instead can miss the moment on an idle machine: the relay drains thousands of rows
    between two polls."""
    logged = threading.Event()
    lines: list[bytes] = []

    def read() -> None:
        assert proc.stderr is not None
        published = 0
        for line in proc.stderr:  # read to the end: a full pipe would stall the relay
            lines.append(line)
            published += b": published outbox ids " in line
            if published >= batches:
                logged.set()

    reader = threading.Thread(target=read, name="relay-stderr", daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        # The reader ends when the relay exits: one that dies at start-up fails at once.
        while not logged.wait(0.1) and reader.is_alive() and time.monotonic() < deadline:
            pass
        tail = b"".join(lines)[-2000:].decode(errors="replace")
        assert logged.is_set(), f"the relay did not publish {batches} batches; it said:\n{tail}"
        os.kill(proc.pid, sig)
        code = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    reader.join(10)
    return code, b"".join(lines)


def test_a_relay_that_dies_before_its_batches_fails_at_once_saying_why() -> None:
    # From the review: the signalling helper waited out its timeout for a relay that had
    # exited, and dropped its stderr.
    script = "import sys; sys.stderr.write('outbox: cannot connect to PostgreSQL\\n'); sys.exit(2)"
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    with pytest.raises(AssertionError, match="cannot connect to PostgreSQL"):
        _signal_after_batches(proc, 3, signal.SIGTERM, timeout=60)
    assert proc.returncode == 2


def _fill_outbox(engine: Engine, topic: str, total: int) -> list[str]:
    """A backlog of ``total`` events over 50 keys, committed 500 per transaction."""
    ids: list[str] = []
    for start in range(0, total, 500):
        with Session(engine) as session, session.begin():
            ids += [
                str(publish(session, topic=topic, key=f"k{i % 50}", value={"i": i}))
                for i in range(start, min(total, start + 500))
            ]
    return ids


def test_migrate_is_idempotent_and_sql_prints_the_ddl(database_url: str) -> None:
    for _ in range(2):
        done = run("migrate", "--db", database_url)
        assert done.returncode == 0, done.stderr
    ddl = run("sql")
    assert ddl.returncode == 0
    assert "CREATE TABLE outbox_events" in ddl.stdout
    assert "outbox_alembic_version" in ddl.stdout


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("acks=1", "acks=all"),
        ("enable.idempotence=false", "enable.idempotence=true"),
        ("max.in.flight.requests.per.connection=10", "<= 5"),
        ("transactional.id=x", "--transactional-id-prefix"),
    ],
)
def test_i8_bad_producer_setting_fails_before_start_naming_the_fix(
    database_url: str, bootstrap_servers: str, setting: str, named: str
) -> None:
    done = run("relay", "--db", database_url, "-b", bootstrap_servers, "-X", setting, "--once")
    assert done.returncode == 2
    assert named in done.stderr


def test_secrets_never_appear_in_errors(bootstrap_servers: str) -> None:
    url = "postgresql+psycopg://app:s3cr3t-pw@127.0.0.1:1/app"
    for args in (
        ("migrate", "--db", url),
        ("relay", "--db", url, "-b", bootstrap_servers, "--once"),
    ):
        done = run(*args)
        assert done.returncode != 0
        assert "s3cr3t-pw" not in done.stderr + done.stdout
        assert "***" in done.stderr or "cannot connect" in done.stderr


def test_env_vars_are_documented_in_help() -> None:
    done = run("relay", "--help")
    assert "OUTBOX_DB" in done.stdout
    assert "OUTBOX_BOOTSTRAP_SERVERS" in done.stdout


@pytest.mark.both_brokers
@pytest.mark.timeout(600)  # alone ~20 s; 273 s seen on a machine at load 60 (no wait is timed)
def test_i2_relay_killed_with_sigkill_mid_batch_loses_nothing(
    engine: Engine, database_url: str, broker: Broker, topic: str, kafka: KafkaReader
) -> None:
    bootstrap_servers = broker.bootstrap_servers
    total = 4_000  # 20 batches: the kill lands after 3 of them, the rest is left for --once
    ids = _fill_outbox(engine, topic, total)
    args = _relay_args(
        database_url,
        bootstrap_servers,
        f"kill-{topic}",
        "--batch-size",
        "200",
        "--log-level",
        "DEBUG",
    )
    proc = subprocess.Popen([OUTBOX, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _signal_after_batches(proc, 3, signal.SIGKILL)
    assert _pending(engine) > 0, "the relay finished before it could be killed mid-way"
    done = run(*args, "--once")
    assert done.returncode == 0, done.stderr
    assert _pending(engine) == 0
    # Every event, each once; Tansu shows records of transactions aborted by the kill (those
    # extra copies are reported), Apache Kafka hides them (asserted 0).
    records = kafka.read(topic, total, timeout=60)
    assert_exactly_once(records, ids, aborted_copies_visible=not broker.filters_aborts)


def test_sigterm_finishes_the_batch_and_exits_cleanly(
    engine: Engine, database_url: str, bootstrap_servers: str, topic: str, kafka: KafkaReader
) -> None:
    """A clean stop never leaves a batch half done: no loss and, even on Tansu, no duplicate."""
    total = 4_000  # 40 batches: SIGTERM after 3 of them (10,000 took up to 206 s in CI)
    ids = _fill_outbox(engine, topic, total)
    args = _relay_args(
        database_url,
        bootstrap_servers,
        f"term-{topic}",
        "--batch-size",
        "100",
        "--log-level",
        "DEBUG",
    )
    proc = subprocess.Popen([OUTBOX, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    code, stderr = _signal_after_batches(proc, 3, signal.SIGTERM)
    assert code == 0, stderr
    assert b"finishing the current batch" in stderr
    assert _pending(engine) > 0, "the relay finished before the signal arrived"
    done = run(*args, "--once")
    assert done.returncode == 0, done.stderr
    # A clean stop aborts nothing: each event exactly once, on any broker.
    assert_exactly_once(kafka.read(topic, total, timeout=60), ids)


def test_i6_dead_rows_are_listed_and_requeued_after_a_fix(
    engine: Engine, database_url: str, bootstrap_servers: str, topic: str, kafka: KafkaReader
) -> None:
    with Session(engine) as session, session.begin():
        poison = publish(session, topic=topic, key="k", value=b"x" * 5000)
        fine = publish(session, topic=topic, key="k", value=b"ok")
    base = _relay_args(database_url, bootstrap_servers, f"dead-{topic}", "--once")
    # a batch's recovery marker must fit message.max.bytes too: a small batch
    done = run(*base, "-X", "message.max.bytes=2000", "--batch-size", "50")
    assert done.returncode == 0, done.stderr
    status = run("status", "--db", database_url)
    assert status.returncode == 0, status.stderr
    assert "dead rows" in status.stdout
    listed = json.loads(run("dead", "list", "--db", database_url, "--json").stdout)
    assert [row["event_id"] for row in listed] == [str(poison)]
    assert "message.max.bytes=2000" in listed[0]["error"]
    assert run("dead", "requeue", "--db", database_url).returncode == 2  # needs ids or --all
    requeued = run("dead", "requeue", "--db", database_url, "--all")
    assert "re-queued 1 rows" in requeued.stdout
    assert _pending(engine) == 1
    done = run(*base)  # the fix: default message.max.bytes (1 MB)
    assert done.returncode == 0, done.stderr
    records = kafka.read(topic, 2)
    assert [r.event_id for r in records] == [str(fine), str(poison)]


def test_relay_process_serves_health_and_metrics(
    database_url: str, bootstrap_servers: str, topic: str
) -> None:
    import urllib.error
    import urllib.request

    from outbox.embedded import free_port

    port = free_port()
    args = _relay_args(
        database_url,
        bootstrap_servers,
        f"health-{topic}",
        "--metrics-port",
        str(port),
        "--metrics-host",
        "127.0.0.1",
        "--log-format",
        "json",
    )
    proc = subprocess.Popen([OUTBOX, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def status(path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    try:
        wait_for(lambda: status("/readyz") == 200, timeout=60, what="relay ready")
        assert status("/healthz") == 200
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            body = resp.read().decode()
        assert "outbox_relay_slots_owned 4.0" in body
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    first = stderr.decode().splitlines()[0]
    assert json.loads(first)["logger"].startswith("outbox")


def test_processes_split_the_slots_and_stop_together(
    engine: Engine, database_url: str, bootstrap_servers: str, topic: str, kafka: KafkaReader
) -> None:
    """``--processes 2``: two relay processes (both cores) share the 4 slots."""
    from outbox.db import connect
    from outbox.relay import SLOT_NAMESPACE
    from outbox.sql import SLOT_OWNERS

    args = _relay_args(
        database_url, bootstrap_servers, f"procs-{topic}", "--slots", "4", "--processes", "2"
    )
    proc = subprocess.Popen([OUTBOX, *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def owners() -> set[str]:
        """Relay processes holding the 4 slots (application_name is outbox-relay:<pid>:slot-N)."""
        with connect(database_url, application_name="test") as conn:
            rows = conn.execute(SLOT_OWNERS, {"namespace": SLOT_NAMESPACE}).fetchall()
        names = {str(r["application_name"]).rsplit(":", 1)[0] for r in rows}
        return names if len(rows) == 4 else set()

    try:
        wait_for(lambda: len(owners()) == 2, timeout=90, what="4 slots held by 2 processes")
        ids = _fill_outbox(engine, topic, 1000)
        wait_for(lambda: _pending(engine) == 0, timeout=60, what="both processes drain")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert_exactly_once(kafka.read(topic, 1000), ids)


def test_i8_producer_config_file_is_read_and_x_settings_win_over_it(
    database_url: str, bootstrap_servers: str, tmp_path: Path
) -> None:
    config = tmp_path / "producer.properties"
    config.write_text("# credentials and tuning live here\nacks=1\n")
    base = ["relay", "--db", database_url, "-b", bootstrap_servers, "--once"]
    done = run(*base, "--producer-config", str(config))
    assert done.returncode == 2
    assert "acks=1" in done.stderr
    done = run(*base, "--producer-config", str(config), "-X", "acks=all", "-X", "retries=0")
    assert done.returncode == 2
    assert "retries=0" in done.stderr
    assert "acks=1" not in done.stderr
