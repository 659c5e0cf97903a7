"""The first relay of a new outbox skips reading markers no one but itself can have written
(I4); a slot held by anyone else when it tries to take it ends that shortcut, even if the other
relay is gone before the next member count."""

from __future__ import annotations

from collections.abc import Callable

import psycopg

from outbox import sql
from outbox.relay import SLOT_NAMESPACE
from tests.conftest import RelayHandle, _libpq
from tests.support import wait_for


def test_i4_a_slot_held_by_another_session_ends_the_first_relays_marker_shortcut(
    database_url: str, start_relay: Callable[..., RelayHandle]
) -> None:
    with psycopg.connect(_libpq(database_url), autocommit=True) as other:
        other.execute(sql.TRY_LOCK_SLOT, {"namespace": SLOT_NAMESPACE, "slot": 1})
        handle = start_relay(slots=2, transactional_id_prefix=None)
        wait_for(lambda: 0 in handle.relay.workers, timeout=60, what="the relay takes slot 0")
        wait_for(lambda: not handle.relay.first_run, timeout=30, what="the shortcut to end")
    wait_for(lambda: 1 in handle.relay.workers, timeout=60, what="slot 1 taken once freed")
    assert not handle.relay.first_run
    handle.stop()
