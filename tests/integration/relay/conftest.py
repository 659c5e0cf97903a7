"""Fixtures of the relay's integration tests."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import psycopg
import pytest
from psycopg.rows import dict_row

from outbox import sql
from outbox.relay import SLOT_NAMESPACE, Relay, SlotWorker
from outbox.relay.config import RelayConfig
from tests.conftest import _libpq


@pytest.fixture
def slot_worker(
    database_url: str, relay_config: Callable[..., RelayConfig]
) -> Iterator[SlotWorker]:
    """Slot 0's worker of a 2-slot relay with the default prefix (not started), with a
    connection that took the slot's lock, as the coordinator hands it over."""
    relay = Relay(relay_config(dsn=database_url, transactional_id_prefix=None))
    conn = psycopg.connect(_libpq(database_url), autocommit=True, row_factory=dict_row)
    identity = conn.execute(sql.READ_IDENTITY).fetchone()
    assert identity is not None
    relay.outbox_id = uuid.UUID(str(identity["outbox_id"]))
    row = conn.execute(sql.TRY_LOCK_SLOT, {"namespace": SLOT_NAMESPACE, "slot": 0}).fetchone()
    assert row is not None
    assert next(iter(row.values()))
    conn.execute(sql.RECORD_SLOT_COUNT, {"slots": 2})
    yield SlotWorker(relay._slot_context(0), 0, conn)
    conn.close()
