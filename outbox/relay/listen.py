"""LISTEN for ``publish()``'s NOTIFY and wake the slot it names; polling covers any gap."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import psycopg

from outbox import sql
from outbox.db import redact
from outbox.partitioner import SHARD_COUNT, slot_of_shard
from outbox.relay.backoff import backoff
from outbox.relay.database import Connection

log = logging.getLogger("outbox.relay")


def notified_slot(payload: str, slots: int) -> int | None:
    """The slot a NOTIFY payload (``publish()`` sends the shard) wakes; None: every slot."""
    if payload.isdecimal() and int(payload) < SHARD_COUNT:
        return slot_of_shard(int(payload), slots)
    return None


def listen(
    session: Callable[[], Connection],
    wake: Callable[[str], None],
    *,
    listening: threading.Event,
    stop: threading.Event,
    poll_interval: float,
) -> None:
    """Wake workers on publish()'s NOTIFY until ``stop``; ``listening`` is set while a LISTEN
    session is up (the slots poll adaptively while it is not)."""
    failures = 0
    while not stop.is_set():
        try:
            with session() as conn:  # idle by design: unbounded
                conn.execute(sql.LISTEN)
                listening.set()
                failures = 0
                while not stop.is_set():
                    for note in conn.notifies(timeout=0.5, stop_after=1):
                        wake(note.payload)
        except (psycopg.Error, ConnectionError) as exc:
            listening.clear()  # the slots poll adaptively until it is back
            failures += 1
            log.warning(
                "LISTEN connection failed (%s); polling (10 ms after rows were found, "
                "backing off to every %.1fs) until it is back. LISTEN needs a direct "
                "session, not a transaction-pooling PgBouncer",
                redact(str(exc)),
                poll_interval,
            )
            stop.wait(backoff(failures))
