"""The slot's database connection lost at the worst moments: the slot is lost, never a row."""

from __future__ import annotations

import psycopg
import pytest

from outbox.errors import BatchRollback, SlotLost
from outbox.relay import SlotWorker
from tests.conftest import _libpq
from tests.support import wait_for


def test_i2_a_connection_lost_while_a_batch_rolls_back_loses_the_slot_not_the_worker(
    slot_worker: SlotWorker, database_url: str
) -> None:
    """A batch whose records failed leaves its transaction with ``BatchRollback``. When the
    server is gone by then (a PostgreSQL restart), the rollback itself fails: that is a lost
    connection like any other, not a crash (a traceback, ``failed``): the slot is lost and
    the rows stay in the outbox (I2)."""

    def roll_back_after_the_server_went_away() -> None:
        with slot_worker.session.transaction():
            slot_worker.conn.execute("SELECT 1")
            with psycopg.connect(_libpq(database_url), autocommit=True) as admin:
                admin.execute(
                    "SELECT pg_terminate_backend(%s)", (slot_worker.conn.info.backend_pid,)
                )
            raise BatchRollback  # as the exactly-once publisher does when records failed

    with pytest.raises(SlotLost, match="database connection lost"):
        roll_back_after_the_server_went_away()


def test_i2_a_batch_rolled_back_on_a_live_connection_ends_quietly(
    slot_worker: SlotWorker,
) -> None:
    with slot_worker.session.transaction():
        slot_worker.conn.execute("CREATE TEMPORARY TABLE rolled_back (n int)")
        raise BatchRollback
    assert slot_worker.conn.execute("SELECT to_regclass('rolled_back') AS t").fetchone() == {
        "t": None
    }


def test_i2_a_slot_connection_ended_by_the_servers_idle_in_transaction_timeout_loses_the_slot(
    slot_worker: SlotWorker, database_url: str
) -> None:
    """The batch's DB transaction waits idle while the broker acknowledges (up to the
    transaction timeout). A role's ``idle_in_transaction_session_timeout`` below that ends
    the session with IdleInTransactionSessionTimeout, not an OperationalError: the worker
    took it for a crash. The connection is gone, and so is the slot; the rows stay (I2)."""
    pid = slot_worker.conn.info.backend_pid
    slot_worker.conn.execute("SET idle_in_transaction_session_timeout = '50ms'")

    def gone() -> bool:
        with psycopg.connect(_libpq(database_url), autocommit=True) as admin:
            row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
            return row.fetchone() == (0,)

    def idle_past_the_timeout() -> None:
        with slot_worker.session.transaction():
            slot_worker.conn.execute("SELECT 1")
            wait_for(gone, timeout=30, what="the server to end the idle session")
            slot_worker.conn.execute("SELECT 1")

    with pytest.raises(SlotLost, match="database connection lost"):
        idle_past_the_timeout()
