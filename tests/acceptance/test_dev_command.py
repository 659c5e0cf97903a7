"""``outbox dev``: the real command in a subprocess, used the way its help says."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from queue import Empty, Queue

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from examples.order_app import Order, place_order
from tests.support import wait_for

OUTBOX = str(Path(sys.executable).parent / "outbox")
ROOT = Path(__file__).resolve().parents[2]


def _lines(stream: object, into: Queue[str]) -> None:
    for line in stream:  # type: ignore[attr-defined]
        into.put(line)


def _assignments(proc: subprocess.Popen[str], timeout: float) -> dict[str, str]:
    """The ``export NAME=value`` lines ``outbox dev`` prints first, parsed as a shell would."""
    lines: Queue[str] = Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    found: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    while len(found) < 3:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except Empty:
            raise AssertionError(f"outbox dev printed {found} in {timeout:.0f}s") from None
        [word, assignment] = shlex.split(line)
        assert word == "export"
        name, _, value = assignment.partition("=")
        found[name] = value
    return found


def _refused(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return True
    return False


JOIN_BOUND = 22.0
"""Seconds within which a relay and a fresh consumer apply an event with the settings file."""
JOIN_ATTEMPTS = 3


def test_dev_servers_serve_a_relay_and_a_consumer_that_joins_in_seconds_then_stop_on_sigterm(
    tmp_path: Path,
) -> None:
    """The printed assignments are all a shell needs: ``outbox relay`` and ``outbox consume``
    run against them without settings of their own, the fresh consumer group applies an event
    within seconds, and SIGTERM stops both servers."""
    env_file = tmp_path / "dev.env"
    dev = subprocess.Popen(
        [OUTBOX, "dev", "--env-file", str(env_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    others: list[subprocess.Popen[bytes]] = []
    try:
        found = _assignments(dev, timeout=120)
        assert set(found) == {"OUTBOX_DB", "OUTBOX_BOOTSTRAP_SERVERS", "OUTBOX_CONSUMER_CONFIG"}
        sourced = subprocess.run(
            ["bash", "-c", f'. "{env_file}" && echo "$OUTBOX_DB"'],
            capture_output=True,
            text=True,
            check=True,
        )
        assert sourced.stdout.strip() == found["OUTBOX_DB"]

        engine = create_engine(found["OUTBOX_DB"])
        with Session(engine) as session:
            Order.metadata.create_all(session.connection())
            session.commit()
        env = {**os.environ, **found, "PYTHONPATH": str(ROOT)}
        consume = [OUTBOX, "consume", "examples.order_projector:OrderProjector"]

        def start_consumer() -> subprocess.Popen[bytes]:
            proc = subprocess.Popen(
                consume, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            others.append(proc)
            return proc

        def applied(customers: int) -> Callable[[], bool]:
            def check() -> bool:
                with engine.connect() as conn:
                    exists = conn.execute(text("SELECT to_regclass('order_totals')")).scalar_one()
                    return bool(exists) and (
                        conn.execute(text("SELECT count(*) FROM order_totals")).scalar_one()
                        >= customers
                    )

            return check

        # A fresh group with librdkafka's defaults waits ~23 s on Tansu before its first fetch
        # (29.5 s measured for this whole step without the settings file); with it, 3-5 s idle
        # and up to 16 s seen on a loaded machine. The bound sits below the first, above the
        # last. A busy machine can still push one start past it: then a fresh consumer process
        # is timed again (`JOIN_ATTEMPTS`); only a bound never met fails, and says so.
        took: list[float] = []
        started = time.monotonic()
        others.append(subprocess.Popen([OUTBOX, "relay"], env=env, stdin=subprocess.DEVNULL))
        consumer = start_consumer()
        for attempt in range(1, JOIN_ATTEMPTS + 1):
            if attempt > 1:
                consumer.send_signal(signal.SIGTERM)
                assert consumer.wait(60) == 0
                started = time.monotonic()
                consumer = start_consumer()
            with Session(engine) as session, session.begin():
                place_order(session, f"customer-{attempt}", Decimal("19.99"))
            wait_for(applied(attempt), timeout=60, what="the consumer to apply the order")
            took.append(time.monotonic() - started)
            if took[-1] < JOIN_BOUND:
                break
        engine.dispose()
        assert took[-1] < JOIN_BOUND, (
            f"relay + fresh consumer took {', '.join(f'{t:.1f}s' for t in took)} in "
            f"{len(took)} attempts, never under {JOIN_BOUND:.0f}s (expected ~3-5 s): the "
            "consumer settings file does not shorten the group join"
        )
        for proc in others:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0

        dev.send_signal(signal.SIGTERM)
        assert dev.wait(60) == 0
        url = make_url(found["OUTBOX_DB"])
        host, port = found["OUTBOX_BOOTSTRAP_SERVERS"].split(":")
        assert url.host is not None
        assert url.port is not None
        assert _refused(url.host, url.port)
        assert _refused(host, int(port))
        assert not env_file.exists()
        assert not Path(found["OUTBOX_CONSUMER_CONFIG"]).exists()
        assert "stopped" in (dev.stderr.read() if dev.stderr else "")
        print(f"relay + fresh consumer group applied an event in {took[-1]:.2f}s ({took})")
    finally:
        for proc in others:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if dev.poll() is None:
            dev.kill()
            dev.wait()


def test_i8_a_port_in_use_is_one_line_naming_the_option_and_the_fix() -> None:
    """``--db-port`` / ``--broker-port`` on a port another process listens on: one short line
    that names the option, the port and what to do, exit 2, before any server starts."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        for option in ("--broker-port", "--db-port"):
            done = subprocess.run(
                [OUTBOX, "dev", option, str(port)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            [line] = done.stderr.splitlines()
            assert done.returncode == 2, (option, done.returncode, line)
            assert line.startswith("error: ")
            assert f"{option} {port}" in line, line
            assert "in use" in line, line
            assert f"leave {option} out" in line, line  # the fix
            assert len(line) < 200, line
            assert "panicked" not in line, line
            assert "backtrace" not in line, line
            # Before any server started: nothing on stdout (no assignments) and no server's
            # output or shutdown line on stderr, where a clock bound fails only on a busy machine.
            assert done.stdout == "", (option, done.stdout)
