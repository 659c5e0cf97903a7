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
import struct
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Any, Protocol

import psycopg
from psycopg.adapt import Dumper, PyFormat
from psycopg.pq import Format
from psycopg.rows import tuple_row

from outbox import sql
from outbox.locks import UPKEEP_NAMESPACE

log = logging.getLogger("outbox.relay")

TABLE = "outbox_deliveries"
DEFAULT_PARTITION = f"{TABLE}_default"
"""Catches rows no daily partition covers yet (a clock far ahead, maintenance behind)."""
AHEAD_DAYS = 2
"""Daily partitions kept ready past today, so a relay never waits on DDL to record a batch."""
MAINTENANCE_INTERVAL = 300.0
"""Seconds between partition upkeep runs of one relay (serialised across relays)."""
LOCK_KEY = UPKEEP_NAMESPACE
"""The advisory lock class serialising partition upkeep (``outbox.locks``)."""

_FIRST_8 = struct.Struct(">q")
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
    return _FIRST_8.unpack_from(hashlib.sha256(key).digest())[0]  # type: ignore[no-any-return]


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


# -- the batch's rows as one INSERT of pre-encoded arrays ---------------------------------
# psycopg dumps a list element by element in Python (about 0.3 us each): six arrays of a
# 1000-row batch cost the relay ~2 ms of CPU per batch. The arrays below are built in
# PostgreSQL's binary array format with one struct.pack each, about half of that.
#
# Not a COPY, though one appends faster (PostgreSQL's multi-row insert: about half the
# statement's time on 1000-row batches): a session in COPY FROM STDIN waits on its client as
# "active", out of reach of idle_in_transaction_session_timeout and statement_timeout, so a
# relay frozen between the server's CopyInResponse and its data (SIGSTOP, a paused VM) would
# hold its slot for ever (I12). An INSERT's parameters arrive in one message: until all of it
# is read the session is idle in transaction, and the server can end it.


class Packed:
    """An array already in PostgreSQL's binary format, with its type's oid."""

    __slots__ = ("data", "oid")

    def __init__(self, data: bytes, oid: int) -> None:
        self.data, self.oid = data, oid


class _PackedDumper(Dumper):
    format = Format.BINARY

    def dump(self, obj: Any) -> bytes:
        return bytes(obj.data)

    def get_key(self, obj: Any, format: PyFormat) -> Any:
        return (Packed, obj.oid)

    def upgrade(self, obj: Any, format: PyFormat) -> Dumper:
        dumper = _PackedDumper(Packed)
        dumper.oid = obj.oid
        return dumper


psycopg.adapters.register_dumper(Packed, _PackedDumper)

_HEAD = struct.Struct(">iiiii")  # dimensions, has nulls, element oid, length, lower bound
_LEN = struct.Struct(">i")
_NULL = b"\xff\xff\xff\xff"
_UUID_LEN = _LEN.pack(16)
_INT8_LEN = _LEN.pack(8)
_sha256 = hashlib.sha256
INT4, INT8, TEXT, BYTEA, UUID = 23, 20, 25, 17, 2950
_ARRAY_OF = {INT4: 1007, INT8: 1016, TEXT: 1009, BYTEA: 1001, UUID: 2951}


def pack_ints(values: Sequence[int | None], element: int) -> Packed:
    """int4[] or int8[]; None is NULL (an event acknowledged without an offset)."""
    code, size = ("i", 4) if element == INT4 else ("q", 8)
    n = len(values)
    if None not in values:
        pairs = zip(repeat(size, n), values, strict=True)  # each value after its length
        body = struct.pack(f">{n * ('i' + code)}", *chain.from_iterable(pairs))
        return Packed(_HEAD.pack(1, 0, element, n, 1) + body, _ARRAY_OF[element])
    one = struct.Struct(f">i{code}")
    body = b"".join([_NULL if v is None else one.pack(size, v) for v in values])
    return Packed(_HEAD.pack(1, 1, element, n, 1) + body, _ARRAY_OF[element])


def pack_uuids(values: Sequence[uuid.UUID]) -> Packed:
    """uuid[] (no NULLs)."""
    body = b"".join([_UUID_LEN + u.bytes for u in values])
    return Packed(_HEAD.pack(1, 0, UUID, len(values), 1) + body, _ARRAY_OF[UUID])


def pack_varlen(
    values: Sequence[str | bytes | None], element: int, encoding: str = "utf-8"
) -> Packed:
    """text[] or bytea[]; each distinct value is encoded once (a batch's topics repeat). Text
    goes in ``encoding``, the session's client encoding, in which the server reads it."""
    encoded: dict[str | bytes, bytes] = {}
    parts = []
    nulls = 0
    for v in values:
        if v is None:
            parts.append(_NULL)
            nulls = 1
            continue
        chunk = encoded.get(v)
        if chunk is None:
            raw = v.encode(encoding) if isinstance(v, str) else v
            chunk = encoded[v] = _LEN.pack(len(raw)) + raw
        parts.append(chunk)
    return Packed(
        _HEAD.pack(1, nulls, element, len(values), 1) + b"".join(parts), _ARRAY_OF[element]
    )


def pack_key_hashes(keys: Sequence[bytes | None]) -> Packed:
    """int8[] of ``key_hash`` of each key, straight from the digests: an int8 in binary is the
    digest's first 8 bytes, so no int is made per key."""
    parts = [_NULL if k is None else _INT8_LEN + _sha256(k).digest()[:8] for k in keys]
    nulls = 1 if None in keys else 0
    return Packed(_HEAD.pack(1, nulls, INT8, len(keys), 1) + b"".join(parts), _ARRAY_OF[INT8])


@dataclass(frozen=True, slots=True)
class Draft:
    """The part of a batch's record its rows decide (ids, topics, key hashes), packed while
    the broker acknowledges the batch: the relay waits then, and packing costs it about
    1.5 us a row, which it would otherwise spend between the acknowledgements and the
    commit. Only the places (partition, offset) are left for after."""

    rows: Sequence[_Row]
    params: Mapping[str, Packed]


def draft(rows: Sequence[_Row], encoding: str = "utf-8") -> Draft:
    """The record of ``rows`` without their places. Text goes in ``encoding``, the session's
    client encoding."""
    return Draft(
        rows,
        {
            "event_ids": pack_uuids([r.event_id for r in rows]),
            "ids": pack_ints([r.id for r in rows], INT8),
            "topics": pack_varlen([r.topic for r in rows], TEXT, encoding),
            "key_hashes": pack_key_hashes([r.key for r in rows]),
        },
    )


def places(rows: Sequence[_Row], placed: Mapping[int, tuple[int, int]]) -> dict[str, Packed]:
    """The partition and offset arrays of ``rows``: a row ``placed`` lacks (its report came
    without an offset) is recorded without a place, as recovery records."""
    where = [placed.get(r.id) for r in rows]
    return {
        "partitions": pack_ints([None if p is None else p[0] for p in where], INT4),
        "offsets": pack_ints([None if p is None else p[1] for p in where], INT8),
    }


def batch_params(
    rows: Sequence[_Row],
    placed: Mapping[int, tuple[int, int]],
    encoding: str = "utf-8",
    drafted: Draft | None = None,
) -> dict[str, Packed]:
    """RECORD_DELIVERIES's arrays for the rows of a batch with their delivery reports'
    (partition, offset), pre-encoded; ``drafted`` is used if it was made of these very rows.
    The keys are hashed here: the server would take longer, and the relay waits for its
    statement (``sql``)."""
    if drafted is None or drafted.rows is not rows:
        drafted = draft(rows, encoding)
    return {**drafted.params, **places(rows, placed)}


def record(
    conn: psycopg.Connection[Any],
    rows: Sequence[_Row],
    placed: Mapping[int, tuple[int, int]],
    drafted: Draft | None = None,
) -> None:
    """Append the batch to the record in one INSERT, completed (synced) on return."""
    params = batch_params(rows, placed, conn.info.encoding, drafted)
    conn.execute(sql.RECORD_DELIVERIES, params, prepare=True)


@contextlib.contextmanager
def recording(
    conn: psycopg.Connection[Any],
    rows: Sequence[_Row],
    placed: Mapping[int, tuple[int, int]] | None,
    drafted: Draft | None = None,
) -> Iterator[None]:
    """Record the batch, then run the block (the Kafka commit), in the batch's transaction.

    The INSERT completes before the block, not in pipeline mode beside it: a statement sent
    but not yet synced keeps the session "active" on the server, out of reach of
    ``idle_in_transaction_session_timeout``, so a relay frozen in its Kafka commit would hold
    its slot's lock forever instead of losing it after --takeover-timeout (I12).
    """
    if placed is not None and rows:
        record(conn, rows, placed, drafted)
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
    (an advisory lock); None when another relay held it. Runs in its own transaction.

    Days are the database's (``now()``, as ``published_at`` is), not the relay host's: a
    relay clock ahead by more than the retention would drop the partition being written.
    A role that may not run the DDL (a least-privilege relay role that does not own the
    record) still keeps the retention window: the expired rows are deleted through the
    parent table instead of dropped with their partitions, and a warning names the fix."""
    with conn.transaction():
        with conn.cursor(row_factory=tuple_row) as cur:
            row = cur.execute(sql.TRY_LOCK_UPKEEP, {"key": LOCK_KEY}).fetchone()
            if not row or not row[0]:
                return None
            if now is None:
                clock = cur.execute(sql.DATABASE_NOW).fetchone()
                assert clock is not None
                now = clock[0]
        assert now is not None
        conn.execute(sql.UPKEEP_LOCK_TIMEOUT)
        days, has_default = existing_partitions(conn)
        plan = plan_partitions(now.astimezone(dt.UTC).date(), days, retention_days)
        refused = _apply(conn, plan, has_default)
        if refused:
            conn.execute(sql.expire_deliveries(TABLE), {"before": plan.expire_before})
            log.warning(
                "delivery record upkeep: the relay's database role %r may not create or drop "
                "some of the record's daily partitions (%s): rows no daily partition takes go "
                "to the default partition, and expired rows go by DELETE, which leaves vacuum "
                "work; let the relay's role own the record and each of its partitions (ALTER "
                "TABLE %s OWNER TO ..., and the same for each partition: ownership does not "
                "pass on to them; and CREATE on its schema) or run the relay as the tables' "
                "owner",
                conn.info.user,
                str(refused[0]).splitlines()[0],
                TABLE,
            )
            return plan
        conn.execute(sql.expire_deliveries(DEFAULT_PARTITION), {"before": plan.expire_before})
    if plan.create or plan.drop:
        log.info(
            "delivery record: created partitions %s, dropped %s",
            [f"{d}" for d in plan.create],
            [f"{d}" for d in plan.drop],
        )
    return plan


def _apply(
    conn: psycopg.Connection[Any], plan: PartitionPlan, has_default: bool
) -> list[psycopg.errors.InsufficientPrivilege]:
    """The plan's DDL: the default partition if missing, the days ahead, the expired days;
    each in its own savepoint, so a step the role may not take (a partition another role
    owns) costs only that step. Returns the refusals."""
    steps: list[list[str]] = []
    if not has_default:
        steps.append([sql.create_default_delivery_partition(TABLE, DEFAULT_PARTITION)])
    for day in plan.create:
        lower, upper = day_start(day), day_start(day + dt.timedelta(days=1))
        steps.append(
            sql.create_delivery_partition(
                TABLE, DEFAULT_PARTITION, partition_name(day), lower, upper
            )
        )
    steps.extend([sql.drop_delivery_partition(partition_name(day))] for day in plan.drop)
    refused = []
    for statements in steps:
        try:
            with conn.transaction():  # a savepoint
                for statement in statements:
                    conn.execute(statement)
        except psycopg.errors.InsufficientPrivilege as exc:
            refused.append(exc)
    return refused
