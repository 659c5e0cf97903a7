"""Handler attempts that survive the death of the process (I10): every statement named.

A record that kills the process (out of memory, a crash in a C extension, a
SIGKILL) leaves no exception behind to count: only what was written BEFORE the
handler ran survives. One row per (group, topic, partition) says which records
are being handled:

- before a batch, its offset range (``attempts`` 0): on a restart, a batch that
  overlaps the range of one that never finished is handled one record at a time;
- before each one-record attempt, that record's offset and the attempts it has
  started so far. Attempts ended by a transient fault are given back at once (or, when the
  database cannot be reached, by the next attempt).
  A record that has started ``RetryPolicy.attempts`` attempts without an
  outcome (the process died in them) is dead-lettered instead of run again.

The transaction that finishes a batch or record deletes its row, so finished work leaves
none behind. The other writes are short transactions of their own with ``synchronous_commit = off``:
they survive the death of the consumer process (not a crash of the database
server, which loses at most the last few, i.e. an attempt or two more), and
cost a round trip, not a disk flush.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import Connection, Engine, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.orm import Session
from sqlalchemy.types import BigInteger, Integer, Text

# A commit that waits for no disk flush: these rows only need to outlive the process.
ASYNC_COMMIT = text("SET LOCAL synchronous_commit = off")

# Mark the offset ranges of a batch as being handled; returns the partitions whose previous
# range overlaps it (a batch or record whose handling never finished): those are not marked.
MARK_BATCH = text(
    """
WITH batch AS (
  SELECT * FROM unnest(:topics, :partitions, :firsts, :lasts)
    AS b(topic, partition, first_offset, last_offset)
), unfinished AS (
  SELECT a.topic, a.partition FROM outbox_consumer_attempts a
  JOIN batch b ON a.topic = b.topic AND a.partition = b.partition
  WHERE a.group_id = :group_id
    AND a.first_offset <= b.last_offset AND a.last_offset >= b.first_offset
), marked AS (
  INSERT INTO outbox_consumer_attempts AS a
    (group_id, topic, partition, first_offset, last_offset, attempts)
  SELECT :group_id, b.topic, b.partition, b.first_offset, b.last_offset, 0 FROM batch b
  WHERE NOT EXISTS (
    SELECT 1 FROM unfinished u WHERE u.topic = b.topic AND u.partition = b.partition
  )
  ON CONFLICT (group_id, topic, partition) DO UPDATE
    SET first_offset = EXCLUDED.first_offset, last_offset = EXCLUDED.last_offset,
        attempts = 0, updated_at = now()
)
SELECT topic, partition FROM unfinished
"""
).bindparams(
    bindparam("topics", type_=ARRAY(Text)),
    bindparam("partitions", type_=ARRAY(Integer)),
    bindparam("firsts", type_=ARRAY(BigInteger)),
    bindparam("lasts", type_=ARRAY(BigInteger)),
)

# Count one more attempt at one record (minus one given back after a database fault);
# returns the attempts started on it, this one included. A record before the one a
# previous run was stuck on leaves that mark alone (no row returned: a first attempt).
START_ATTEMPT = text(
    """
INSERT INTO outbox_consumer_attempts AS a
  (group_id, topic, partition, first_offset, last_offset, attempts)
VALUES (:group_id, :topic, :partition, :offset, :offset, 1)
ON CONFLICT (group_id, topic, partition) DO UPDATE
  SET attempts = CASE
        WHEN a.first_offset = EXCLUDED.first_offset AND a.last_offset = EXCLUDED.last_offset
        THEN a.attempts + 1 - :given_back ELSE 1 END,
      first_offset = EXCLUDED.first_offset, last_offset = EXCLUDED.last_offset,
      updated_at = now()
  WHERE NOT (a.first_offset = a.last_offset AND EXCLUDED.first_offset < a.first_offset)
RETURNING attempts
"""
)

# Give back the attempt a transient fault ended at one record (it is not charged for it).
GIVE_BACK = text(
    """
UPDATE outbox_consumer_attempts
SET attempts = attempts - 1, updated_at = now()
WHERE group_id = :group_id AND topic = :topic AND partition = :partition
  AND first_offset = :offset AND last_offset = :offset AND attempts > 0
"""
)

# Forget the ranges of a batch (or record) that finished, in the transaction that finished it:
# a re-read of the same records later (a rebalance, an offset reset) is not taken for a death.
CLEAR_ATTEMPTS = text(
    """
DELETE FROM outbox_consumer_attempts a
USING unnest(:topics, :partitions, :firsts, :lasts)
  AS b(topic, partition, first_offset, last_offset)
WHERE a.group_id = :group_id AND a.topic = b.topic AND a.partition = b.partition
  AND a.first_offset = b.first_offset AND a.last_offset = b.last_offset
"""
).bindparams(
    bindparam("topics", type_=ARRAY(Text)),
    bindparam("partitions", type_=ARRAY(Integer)),
    bindparam("firsts", type_=ARRAY(BigInteger)),
    bindparam("lasts", type_=ARRAY(BigInteger)),
)

# Fail early when the table is missing (migrations not run).
CHECK_ATTEMPTS_TABLE = text("SELECT 1 FROM outbox_consumer_attempts LIMIT 0")


def mark_batch(
    engine: Engine, group_id: str, ranges: Iterable[tuple[str, int, int, int]]
) -> set[tuple[str, int]]:
    """Record ``(topic, partition, first, last)`` ranges as being handled; returns the
    partitions where an earlier batch or record never finished (handle those one by one)."""
    rows = sorted(ranges)
    with engine.begin() as conn:
        conn.execute(ASYNC_COMMIT)
        result = conn.execute(
            MARK_BATCH,
            {
                "group_id": group_id,
                "topics": [r[0] for r in rows],
                "partitions": [r[1] for r in rows],
                "firsts": [r[2] for r in rows],
                "lasts": [r[3] for r in rows],
            },
        )
        return {(str(topic), int(partition)) for topic, partition in result}


def start_attempt(
    engine: Engine, group_id: str, topic: str, partition: int, offset: int, given_back: int
) -> int:
    """Record one more attempt at a record before its handler runs; returns the attempts
    started on it so far, this one included."""
    with engine.begin() as conn:
        conn.execute(ASYNC_COMMIT)
        row = conn.execute(
            START_ATTEMPT,
            {
                "group_id": group_id,
                "topic": topic,
                "partition": partition,
                "offset": offset,
                "given_back": given_back,
            },
        ).first()
    return 1 if row is None else int(row[0])


def give_back(engine: Engine, group_id: str, topic: str, partition: int, offset: int) -> None:
    """Give back the attempt at one record that a transient fault ended."""
    with engine.begin() as conn:
        conn.execute(ASYNC_COMMIT)
        conn.execute(
            GIVE_BACK,
            {"group_id": group_id, "topic": topic, "partition": partition, "offset": offset},
        )


def clear_attempts(
    session: Session | Connection, group_id: str, ranges: Iterable[tuple[str, int, int, int]]
) -> None:
    """Delete the attempt rows of finished ranges, in the caller's (finishing) transaction."""
    rows = sorted(ranges)
    if not rows:
        return
    session.execute(
        CLEAR_ATTEMPTS,
        {
            "group_id": group_id,
            "topics": [r[0] for r in rows],
            "partitions": [r[1] for r in rows],
            "firsts": [r[2] for r in rows],
            "lasts": [r[3] for r in rows],
        },
    )
