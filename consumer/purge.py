"""Purging dedup records older than the dedup window, in small batches.

Each batch is its own short transaction deleting at most ``batch_size`` rows
(by ``ctid``, ``FOR UPDATE SKIP LOCKED``), so a purge never holds locks for
long, never blocks the consumers' inserts, and two purgers of one group never
wait on each other. The consumer runs a bounded number of batches between
message batches; a backlog is worked off over several rounds.

The window must exceed the longest redelivery horizon (see ``ConsumerConfig``):
an event that arrives again after its record is purged is applied again.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Engine

from consumer.dedup import purge_batch

log = logging.getLogger("outbox.consumer")


def purge_processed(
    engine: Engine,
    group_id: str,
    window: timedelta,
    *,
    batch_size: int = 1000,
    max_batches: int | None = None,
    stop: threading.Event | None = None,
) -> tuple[int, bool]:
    """Delete ``group_id``'s dedup records older than ``window``.

    Returns (rows deleted, finished): ``finished`` is False when ``max_batches``
    or ``stop`` cut the purge short and old rows may remain.
    """
    total = 0
    batches = 0
    while max_batches is None or batches < max_batches:
        if stop is not None and stop.is_set():
            return total, False
        with engine.begin() as conn:
            deleted = purge_batch(conn, group_id, window, batch_size)
        total += deleted
        batches += 1
        if deleted < batch_size:
            return total, True
    return total, False


@dataclass(slots=True)
class PurgeSchedule:
    """When the next purge is due (monotonic seconds); pure, so it is testable without a clock."""

    interval: float
    next_at: float = 0.0
    backlog_delay: float = 1.0

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def ran(self, now: float, *, finished: bool) -> None:
        """A purge ran: come back soon if it left a backlog, else after the interval."""
        self.next_at = now + (self.interval if finished else min(self.backlog_delay, self.interval))
