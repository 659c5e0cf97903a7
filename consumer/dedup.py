"""The processed-events table: every statement named, each with its one-line purpose (I5).

A dedup record is ``(group_id, event_id)``. Inserting it in the handler's own
transaction is what makes effects exactly-once: a duplicate's insert finds the
row (or, if another group member is applying the same event right now, waits
for its transaction on the primary key and then finds it) and the handler is
skipped.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from datetime import timedelta

from sqlalchemy import Connection, Engine, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, INTERVAL
from sqlalchemy.orm import Session
from sqlalchemy.types import Integer, Text

MAX_KEY_LENGTH = 200
"""Longer dedup keys are stored as their SHA-256, so index entries stay small."""
HASHED_PREFIX = "sha256:"
# Control characters (PostgreSQL refuses NUL in text; the others break logs and headers)
# and lone surrogates (what undecodable bytes become; not storable as UTF-8).
_UNSTORABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

# Record events as processed for a group; returns only the ids that were not there yet.
MARK_PROCESSED = text(
    """
INSERT INTO outbox_processed_events (group_id, event_id)
SELECT :group_id, event_id FROM unnest(:event_ids) AS ids(event_id)
ON CONFLICT (group_id, event_id) DO NOTHING
RETURNING event_id
"""
).bindparams(bindparam("event_ids", type_=ARRAY(Text)))

# Forget events recorded as processed (their handler did not finish: see the runner).
UNMARK_PROCESSED = text(
    "DELETE FROM outbox_processed_events WHERE group_id = :group_id AND event_id = ANY(:event_ids)"
).bindparams(bindparam("event_ids", type_=ARRAY(Text)))

# Whether one event is recorded as processed for a group (operations and tests).
IS_PROCESSED = text(
    "SELECT EXISTS (SELECT 1 FROM outbox_processed_events "
    "WHERE group_id = :group_id AND event_id = :event_id)"
)

# Delete one small batch of a group's records older than the dedup window; skips rows
# another purger holds, so purges never queue up behind each other or hold long locks.
PURGE_BATCH = text(
    """
DELETE FROM outbox_processed_events
WHERE ctid = ANY(ARRAY(
  SELECT ctid FROM outbox_processed_events
  WHERE group_id = :group_id AND processed_at < now() - :window
  LIMIT :limit
  FOR UPDATE SKIP LOCKED
))
"""
).bindparams(bindparam("window", type_=INTERVAL), bindparam("limit", type_=Integer))

# Fail early when the table is missing (migrations not run).
CHECK_TABLE = text("SELECT 1 FROM outbox_processed_events LIMIT 0")


def normalise_key(key: str) -> str:
    """The stored form of a dedup key: itself, or ``sha256:<hex>`` when it is longer than
    ``MAX_KEY_LENGTH`` or holds a control character or undecodable bytes (I10).

    Deterministic: every member of a group, in every run, hashes a key the same way.
    Undecodable bytes (surrogate escapes) are hashed as the original bytes.
    """
    if len(key) <= MAX_KEY_LENGTH and _UNSTORABLE.search(key) is None:
        return key
    try:
        data = key.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        data = key.encode("utf-8", "surrogatepass")
    return HASHED_PREFIX + hashlib.sha256(data).hexdigest()


def mark_processed(session: Session | Connection, group_id: str, keys: Iterable[str]) -> set[str]:
    """Insert dedup records in the caller's transaction; returns the keys that were new.

    Keys are inserted in sorted order so two members racing on overlapping
    batches lock them in the same order (no deadlock).
    """
    ordered = sorted(set(keys))
    if not ordered:
        return set()
    rows = session.execute(MARK_PROCESSED, {"group_id": group_id, "event_ids": ordered})
    return {row[0] for row in rows}


def unmark_processed(engine: Engine, group_id: str, keys: Iterable[str]) -> None:
    """Delete dedup records in a transaction of its own."""
    with engine.begin() as conn:
        conn.execute(UNMARK_PROCESSED, {"group_id": group_id, "event_ids": sorted(set(keys))})


def is_processed(session: Session | Connection, group_id: str, key: str) -> bool:
    row = session.execute(IS_PROCESSED, {"group_id": group_id, "event_id": normalise_key(key)})
    return bool(row.scalar_one())


def purge_batch(conn: Connection, group_id: str, window: timedelta, limit: int) -> int:
    """Run one purge batch in ``conn``'s transaction; returns the rows deleted."""
    result = conn.execute(PURGE_BATCH, {"group_id": group_id, "window": window, "limit": limit})
    return int(result.rowcount)
