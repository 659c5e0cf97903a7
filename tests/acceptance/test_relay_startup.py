"""``outbox relay`` at start (I8): a configuration error stops it in one line naming the fix,
with a non-zero exit, for --once and the daemon alike; an unreachable broker is waited for by
the daemon (one line per backoff step) and reported in one line by --once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from outbox.embedded import free_port
from tests.conftest import Services
from tests.support import wait_for

OUTBOX = str(Path(sys.executable).parent / "outbox")
ENV = {**os.environ, "COLUMNS": "250", "NO_COLOR": "1"}


def _relay(
    db: str, bootstrap: str, *extra: str, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    prefix = f"start-{uuid.uuid4().hex[:6]}"
    args = [OUTBOX, "relay", "--db", db, "-b", bootstrap, "--transactional-id-prefix", prefix]
    return subprocess.run(
        [*args, *extra], capture_output=True, text=True, timeout=timeout, check=False, env=ENV
    )


@pytest.fixture
def unmigrated_db(services: Services) -> Iterator[str]:
    """A database nobody ran ``outbox migrate`` on."""
    name = f"outbox_empty_{uuid.uuid4().hex[:8]}"
    admin = make_url(services.admin_url).set(drivername="postgresql")
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield make_url(services.admin_url).set(database=name).render_as_string(hide_password=False)
    with psycopg.connect(admin.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("mode", [["--once"], []], ids=["once", "daemon"])
def test_i8_an_unknown_librdkafka_setting_stops_the_relay_in_one_line(
    database_url: str, bootstrap_servers: str, mode: list[str]
) -> None:
    """Before: tracebacks and exit 0 for --once, tracebacks forever for the daemon."""
    done = _relay(database_url, bootstrap_servers, "-X", "no.such.setting=1", *mode)
    assert done.returncode == 2, done.stderr  # ExitCode.USAGE
    assert "Traceback" not in done.stderr
    [line] = _errors(done.stderr)
    assert "no.such.setting" in line
    assert "-X" in line


@pytest.mark.parametrize("mode", [["--once"], []], ids=["once", "daemon"])
def test_i8_an_unmigrated_database_stops_the_relay_naming_the_fix(
    unmigrated_db: str, bootstrap_servers: str, mode: list[str]
) -> None:
    done = _relay(unmigrated_db, bootstrap_servers, *mode)
    assert done.returncode == 4, done.stderr  # ExitCode.NOT_MIGRATED
    assert "Traceback" not in done.stderr
    [line] = _errors(done.stderr)
    assert "outbox migrate" in line


def test_once_reports_an_unreachable_broker_in_one_line(database_url: str) -> None:
    """Before: hundreds of raw librdkafka lines, a traceback."""
    done = _relay(database_url, f"127.0.0.1:{free_port()}", "--once")
    assert done.returncode == 3, done.stderr  # ExitCode.UNAVAILABLE
    assert "Traceback" not in done.stderr
    [line] = _errors(done.stderr)
    assert "unreachable" in line
    assert len(done.stderr.splitlines()) < 10, done.stderr


def test_the_daemon_waits_for_an_unreachable_broker_with_backoff(database_url: str) -> None:
    """The README says broker outages are retried forever; before, the daemon exited 1."""
    prefix = f"start-{uuid.uuid4().hex[:6]}"
    proc = subprocess.Popen(
        [
            OUTBOX,
            "relay",
            "--db",
            database_url,
            "-b",
            f"127.0.0.1:{free_port()}",
            "--transactional-id-prefix",
            prefix,
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True)
    reader.start()
    try:
        wait_for(
            lambda: sum("unreachable" in line and "retrying in" in line for line in lines) >= 2,
            timeout=180,  # ~20 s on a quiet machine; each attempt waits for librdkafka's timeouts
            what="two retry lines",
        )
        assert proc.poll() is None, "the daemon gave up on the broker"
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        reader.join(5)
    assert code == 0, "".join(lines)
    assert "Traceback" not in "".join(lines)
    assert len(lines) < 20, "".join(lines)  # librdkafka's repeats held back
