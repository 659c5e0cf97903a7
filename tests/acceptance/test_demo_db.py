"""``outbox demo --db``: the demo on a database the user names leaves it as it found it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import Engine, text

from outbox.relay.deliveries import partition_day
from tests.conftest import Broker

OUTBOX = str(Path(sys.executable).parent / "outbox")


def _demo(db: str, bootstrap_servers: str) -> subprocess.CompletedProcess[str]:
    args = ["demo", "--db", db, "--bootstrap-servers", bootstrap_servers, "--events", "60"]
    args += ["--writers", "2", "--no-crash-relay", "--steady-rate", "0"]
    return subprocess.run(
        [OUTBOX, *args],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env={**os.environ, "COLUMNS": "120"},
    )


def _tables(engine: Engine) -> set[str]:
    """The tables, less the delivery record's daily partitions, which any relay adds as days
    come (outbox.relay.deliveries): they belong to the outbox, not to the demo."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
        return {name for name in rows.scalars() if partition_day(name) is None}


def test_demo_refuses_a_database_holding_tables_of_its_own_in_one_line(
    engine: Engine, database_url: str, broker: Broker
) -> None:
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE orders (id int)"))
    before = _tables(engine)
    done = _demo(database_url, broker.bootstrap_servers)
    assert done.returncode == 2, done.stdout + done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: --db")
    assert "orders" in line
    assert "empty database" in line
    assert _tables(engine) == before


def test_demo_on_a_migrated_outbox_cleans_up_and_restores_the_slot_layout(
    engine: Engine, database_url: str, broker: Broker
) -> None:
    with engine.begin() as conn:
        slots = conn.execute(text("SELECT slot_count FROM outbox_identity")).scalar()
    before = _tables(engine)
    done = _demo(database_url, broker.bootstrap_servers)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _tables(engine) == before  # no demo_* tables left
    with engine.begin() as conn:
        assert conn.execute(text("SELECT slot_count FROM outbox_identity")).scalar() == slots
        assert not conn.execute(text("SELECT count(*) FROM outbox_processed_events")).scalar()
        assert not conn.execute(text("SELECT count(*) FROM outbox_consumer_attempts")).scalar()
