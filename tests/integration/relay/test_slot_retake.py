"""Retaking a slot after its connection was lost (I12): a refusal that the control connection
retries too (a credential rotated or revoked meanwhile) leaves the slot to be tried again, it
does not end the daemon."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import RelayHandle, _libpq
from tests.support import wait_for


def _admin(database_url: str, statement: str) -> None:
    with psycopg.connect(_libpq(database_url), autocommit=True) as conn:
        conn.execute(statement)


def test_i12_a_role_refused_while_retaking_a_slot_does_not_end_the_daemon(
    database_url: str,
    start_relay: Callable[..., RelayHandle],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="outbox.relay")
    role = f"relay_{uuid.uuid4().hex[:8]}"
    _admin(database_url, f"CREATE ROLE {role} LOGIN SUPERUSER")
    handle = start_relay(
        dsn=make_url(database_url).set(username=role).render_as_string(hide_password=False),
        slots=1,
    )
    wait_for(lambda: 0 in handle.relay.workers, timeout=60, what="the relay owns its slot")
    _admin(database_url, f"ALTER ROLE {role} RENAME TO {role}_away")  # as if revoked
    _admin(
        database_url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name LIKE 'outbox-relay:%:slot-0'",
    )
    wait_for(
        lambda: any("cannot take it now" in r.getMessage() for r in caplog.records),
        timeout=60,
        what="the refused retake",
    )
    assert handle.thread.is_alive(), "the daemon ended"
    assert handle.relay.fatal is None
    _admin(database_url, f"ALTER ROLE {role}_away RENAME TO {role}")
    wait_for(lambda: 0 in handle.relay.workers, timeout=60, what="the slot retaken")
    handle.stop()
