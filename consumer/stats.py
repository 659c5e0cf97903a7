"""The counters of one consumer runner (read by the CLI's metrics, the demo and tests)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ConsumerStats:
    """Counters of one consumer (written by its loop only)."""

    applied: int = 0  # handler ran and its transaction committed
    duplicates: int = 0  # skipped: the dedup record was already there
    dead_lettered: int = 0  # sent to <topic>.DLT through the outbox
    retries: int = 0  # handler re-runs after a failure of the record
    outages: int = 0  # database failures retried without counting against the record
    transactions: int = 0  # database transactions committed
    fallbacks: int = 0  # batches redone one record at a time
    not_dead_lettered: int = 0  # failed records of a dead-letter topic: marked processed, logged
    offset_commits: int = 0
    purged: int = 0  # dedup records purged
