"""The delivery record: where each published event went (topic, partition, offset, when).

The relay writes one row per event in the database transaction that deletes the batch, so an
event leaves the outbox and enters the record together. The table is partitioned by day on the
publish time: expiry drops whole partitions (no DELETE, no vacuum churn). The decisions (which
partitions to create ahead, which to drop, a key's hash) are pure; ``maintain`` applies them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
from psycopg.rows import tuple_row

from outbox import sql

log = logging.getLogger("outbox.relay")

TABLE = "outbox_deliveries"
DEFAULT_PARTITION = f"{TABLE}_default"
"""Catches rows no daily partition covers yet (a clock far ahead, maintenance behind)."""
AHEAD_DAYS = 2
"""Daily partitions kept ready past today, so a relay never waits on DDL to record a batch."""
MAINTENANCE_INTERVAL = 300.0
"""Seconds between partition upkeep runs of one relay (serialised across relays)."""
LOCK_KEY = 0x6F757476  # 'outv': advisory lock class serialising partition upkeep

_NAME = re.compile(rf"^{TABLE}_p(\d{{8}})$")


class _Row(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def event_id(self) -> Any: ...
    @property
    def topic(self) -> str: ...
    @property
    def key(self) -> bytes | None: ...


def key_hash(key: bytes | None) -> int | None:
    """A signed 64-bit hash of a record key: the first 8 bytes of its SHA-256.

    The same as ``KEY_HASH_SQL`` computes in the database, so rows recorded by recovery
    (from the outbox row) and by a batch (from the record) compare.
    """
    if key is None:
        return None
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big", signed=True)


def partition_name(day: dt.date) -> str:
    return f"{TABLE}_p{day:%Y%m%d}"


def partition_day(name: str) -> dt.date | None:
    """The day a daily partition covers, or None for another table (the default one)."""
    match = _NAME.match(name)
    if match is None:
        return None
    return dt.datetime.strptime(match.group(1), "%Y%m%d").replace(tzinfo=dt.UTC).date()


def day_start(day: dt.date) -> dt.datetime:
    """Partitions split days at midnight UTC."""
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


@dataclass(frozen=True, slots=True)
class PartitionPlan:
    create: tuple[dt.date, ...]
    drop: tuple[dt.date, ...]
    expire_before: dt.datetime  # rows of the default partition older than this go too


def plan_partitions(
    today: dt.date, existing: Iterable[dt.date], retention_days: int, ahead: int = AHEAD_DAYS
) -> PartitionPlan:
    """Which daily partitions to create (today and ``ahead`` days) and which to drop: those
    wholly older than the retention window (a day's partition goes once its last row is
    ``retention_days`` old)."""
    have = set(existing)
    wanted = [today + dt.timedelta(days=n) for n in range(ahead + 1)]
    oldest_kept = today - dt.timedelta(days=retention_days)
    return PartitionPlan(
        create=tuple(d for d in wanted if d not in have),
        drop=tuple(sorted(d for d in have if d < oldest_kept)),
        expire_before=day_start(oldest_kept),
    )


def batch_params(
    rows: Sequence[_Row], placed: Mapping[int, tuple[int, int]]
) -> dict[str, list[Any]]:
    """RECORD_DELIVERIES's arrays for the rows of a batch with their delivery reports'
    (partition, offset); one statement records the batch."""
    return {
        "event_ids": [r.event_id for r in rows],
        "ids": [r.id for r in rows],
        "topics": [r.topic for r in rows],
        "partitions": [placed[r.id][0] for r in rows],
        "offsets": [placed[r.id][1] for r in rows],
        "keys": [r.key for r in rows],  # hashed by the server (sql.KEY_HASH_SQL)
    }


@contextlib.contextmanager
def recording(
    conn: psycopg.Connection[Any],
    rows: Sequence[_Row],
    placed: Mapping[int, tuple[int, int]] | None,
) -> Iterator[None]:
    """Record the batch while the caller commits its Kafka transaction.

    The INSERT is sent in pipeline mode and the server runs it during the block (the Kafka
    commit's round trips), instead of before it: the record then costs the batch only what
    outlasts the commit. Its result is read when the block ends, so an INSERT that failed
    raises there, after the Kafka commit: the database transaction rolls back and the rows
    stay in the outbox with their records committed, the case the recovery marker covers
    (I4), as for a connection lost at the database COMMIT.
    """
    if placed is None or not rows:
        yield
        return
    if not psycopg.Pipeline.is_supported():  # libpq before 14: record first, then commit
        conn.execute(sql.RECORD_DELIVERIES, batch_params(rows, placed), prepare=True)
        yield
        return
    with conn.pipeline():
        conn.execute(sql.RECORD_DELIVERIES, batch_params(rows, placed), prepare=True)
        yield


def existing_partitions(conn: psycopg.Connection[Any]) -> tuple[list[dt.date], bool]:
    """The daily partitions there are, and whether the default one exists."""
    with conn.cursor(row_factory=tuple_row) as cur:
        names = [str(row[0]) for row in cur.execute(sql.DELIVERY_PARTITIONS, {"parent": TABLE})]
    days = [d for d in map(partition_day, names) if d is not None]
    return days, DEFAULT_PARTITION in names


def maintain(
    conn: psycopg.Connection[Any], retention_days: int, now: dt.datetime | None = None
) -> PartitionPlan | None:
    """Create the partitions ahead and drop the expired ones, if no other relay is doing it
    (an advisory lock); None when another relay held it. Runs in its own transaction."""
    now = now or dt.datetime.now(dt.UTC)
    with conn.transaction():
        with conn.cursor(row_factory=tuple_row) as cur:
            row = cur.execute(sql.TRY_LOCK_UPKEEP, {"key": LOCK_KEY}).fetchone()
        if not row or not row[0]:
            return None
        conn.execute(sql.UPKEEP_LOCK_TIMEOUT)
        days, has_default = existing_partitions(conn)
        plan = plan_partitions(now.date(), days, retention_days)
        if not has_default:
            conn.execute(sql.create_default_delivery_partition(TABLE, DEFAULT_PARTITION))
        for day in plan.create:
            lower, upper = day_start(day), day_start(day + dt.timedelta(days=1))
            for statement in sql.create_delivery_partition(
                TABLE, DEFAULT_PARTITION, partition_name(day), lower, upper
            ):
                conn.execute(statement)
        for day in plan.drop:
            conn.execute(sql.drop_delivery_partition(partition_name(day)))
        conn.execute(
            sql.expire_default_deliveries(DEFAULT_PARTITION), {"before": plan.expire_before}
        )
    if plan.create or plan.drop:
        log.info(
            "delivery record: created partitions %s, dropped %s",
            [f"{d}" for d in plan.create],
            [f"{d}" for d in plan.drop],
        )
    return plan
