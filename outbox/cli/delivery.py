"""Proof of delivery for operators: where one event went (``outbox trace``).

Read once into plain data (``read_trace``), then printed as JSON or rendered (pure), like
``outbox.cli.views``. The consumer groups come from their dedup records; a group's dead letter
is found under the id the consumer publishes it with (``consumer.deadletter``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import gc
import logging
import math
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from psycopg.rows import tuple_row
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential,
)

from consumer.deadletter import dead_letter_id
from outbox import sql
from outbox.cli.views import _session, to_json
from outbox.codec import EVENT_ID_HEADER
from outbox.db import redact
from outbox.errors import ConfigError, TransientError
from outbox.logs import librdkafka_logger
from outbox.reconcile import GroupState, Recorded, Report, reconcile

Row = dict[str, Any]

__all__ = ["event_state", "read_trace", "read_verify", "render_trace", "render_verify", "to_json"]


def parse_event_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ConfigError(
            f"EVENT_ID {raw!r} is not a UUID: give the event id publish() returned "
            "(the record's outbox-event-id header)"
        ) from None


def event_state(pending: Row | None, dead: Row | None, deliveries: Sequence[Row]) -> str:
    """pending, dead, published or unknown: what the outbox knows of the event now. A row
    still pending wins over an older delivery (an event id reused after its publication)."""
    if pending is not None:
        return "pending"
    if dead is not None:
        return "dead"
    if deliveries:
        return "published"
    return "unknown"


def _iso(value: object) -> object:
    return value.isoformat() if hasattr(value, "isoformat") else value


def read_trace(db: str, event_id: uuid.UUID) -> Row:
    """Everything the database knows of one event, as plain data."""
    with _session(db, "outbox-trace") as conn:
        params = {"event_id": event_id}
        pending = conn.execute(sql.TRACE_PENDING, params).fetchone()
        dead = conn.execute(sql.TRACE_DEAD, params).fetchone()
        applied = conn.execute(sql.TRACE_APPLIED, {"event_id": str(event_id)}).fetchall()
        letters = {
            str(r["group_id"]): dead_letter_id(str(r["group_id"]), str(event_id)) for r in applied
        }
        found = conn.execute(
            sql.TRACE_DELIVERIES, {"event_ids": [event_id, *letters.values()]}
        ).fetchall()
        pending_letters = {
            g: conn.execute(sql.TRACE_PENDING, {"event_id": i}).fetchone() is not None
            for g, i in letters.items()
        }
    deliveries = [dict(r) for r in found if r["event_id"] == event_id]
    published_letters = {r["event_id"] for r in found if r["event_id"] != event_id}
    groups = []
    for r in applied:
        group = str(r["group_id"])
        letter = letters[group]
        state = (
            "pending"
            if pending_letters[group]
            else "published"
            if letter in published_letters
            else None
        )
        groups.append(
            {
                "group": group,
                "applied_at": _iso(r["processed_at"]),
                "dead_letter": None if state is None else {"event_id": str(letter), "state": state},
            }
        )
    return {
        "event_id": str(event_id),
        "state": event_state(pending, dead, deliveries),
        "pending": None
        if pending is None
        else {
            "outbox_id": pending["id"],
            "topic": pending["topic"],
            "created_at": _iso(pending["created_at"]),
            "dead_attempts": pending["dead_attempts"],
        },
        "dead": None
        if dead is None
        else {
            "outbox_id": dead["id"],
            "topic": dead["topic"],
            "error": dead["error"],
            "attempts": dead["attempts"],
            "failed_at": _iso(dead["failed_at"]),
        },
        "deliveries": [
            {
                "outbox_id": d["id"],
                "topic": d["topic"],
                "partition": d["partition"],
                "offset": d["kafka_offset"],
                "published_at": _iso(d["published_at"]),
            }
            for d in deliveries
        ],
        "groups": groups,
    }


def render_trace(trace: Row) -> str:
    """A few lines an operator reads at a glance."""
    lines = [f"event {trace['event_id']}: {trace['state']}"]
    if (p := trace["pending"]) is not None:
        lines.append(
            f"  pending in the outbox since {p['created_at']} (topic {p['topic']!r}, "
            f"outbox id {p['outbox_id']})"
        )
    if (d := trace["dead"]) is not None:
        lines.append(
            f"  dead since {d['failed_at']} after {d['attempts']} tries (topic {d['topic']!r}, "
            f"`outbox dead show {d['outbox_id']}`): {d['error']}"
        )
    for r in trace["deliveries"]:
        place = (
            f"partition {r['partition']} offset {r['offset']}"
            if r["partition"] is not None
            else "partition and offset unknown (recovered from a marker)"
        )
        lines.append(f"  published {r['published_at']} to {r['topic']!r} {place}")
    if trace["state"] == "unknown":
        lines.append(
            "  not in the outbox, not dead, not in the delivery record (older than its "
            "retention, published with the record off, or never published here)"
        )
    if not trace["groups"]:
        lines.append("  applied by no consumer group (within their dedup windows)")
    for g in trace["groups"]:
        letter = g["dead_letter"]
        dead = f"; dead-lettered ({letter['state']}, event {letter['event_id']})" if letter else ""
        lines.append(f"  applied by group {g['group']!r} at {g['applied_at']}{dead}")
    return "\n".join(lines) + "\n"


# -- verify ------------------------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
STALL_SECONDS = 30.0
"""verify gives up when the topic yields nothing for this long before its end."""


def parse_duration(raw: str) -> dt.timedelta:
    """``90s``, ``30m``, ``24h``, ``7d``: a positive window that starts after 1970 (before it
    there is neither a record nor a Kafka timestamp; NaN, infinity or a window no date can
    start are refused here, not left to fail in the date arithmetic)."""
    number, unit = raw[:-1], raw[-1:].lower()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or not 0 < value < math.inf:
        raise ConfigError(
            f"--since={raw!r} is not a duration: give a positive number with s, m, h or d "
            "(e.g. --since 24h)"
        )
    seconds = value * _UNITS[unit]
    if seconds >= time.time():
        raise ConfigError(
            f"--since={raw!r} reaches back before 1970: give a shorter window, or leave "
            "--since out to check the whole delivery record"
        )
    return dt.timedelta(seconds=seconds)


def _consumer(settings: dict[str, Any]) -> Consumer:
    """A consumer of verify's; settings librdkafka refuses (a SASL mechanism it lacks, a CA
    file that is not there, a malformed value) are a usage error naming them."""
    try:
        return Consumer(settings)
    except KafkaException as exc:
        raise ConfigError(
            f"librdkafka refused the client settings: {exc.args[0].str()} "
            "(fix the -X / --producer-config names and values)"
        ) from None


TopicRecord = tuple[int, int, str | None, bytes | None]
"""partition, offset, outbox event id (None: no header), key: what verify keeps of a record."""


log = logging.getLogger("outbox.verify")

MOVING_LEADER = frozenset(
    {
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.OFFSET_NOT_AVAILABLE,  # a new leader whose high watermark is catching up
        KafkaError.FENCED_LEADER_EPOCH,
        KafkaError.UNKNOWN_LEADER_EPOCH,
    }
)
"""What a partition whose leader is moving (a node down, or back and taking its partitions
again) answers for a moment; the watermarks are asked again for up to ``LEADER_MOVE_SECONDS``."""

LEADER_MOVE_SECONDS = 30.0


def _moving_leader(exc: BaseException) -> bool:
    error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    return isinstance(error, KafkaError) and error.code() in MOVING_LEADER


def watermarks(consumer: Consumer, topic: str, partition: int) -> tuple[int, int]:
    """A partition's low and high watermarks from its leader, asked again while it moves: a
    check run during a leader election should not fail on it. Bounded as a whole by
    ``LEADER_MOVE_SECONDS`` (each ask gets what is left), and each new ask is logged."""
    deadline = time.monotonic() + LEADER_MOVE_SECONDS

    def ask() -> tuple[int, int]:
        left = max(1.0, min(15.0, deadline - time.monotonic()))
        low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=left)
        return int(low), int(high)

    def told(state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        log.warning(
            "%s [%d]: the partition's leader is moving (%s); asking it again",
            topic,
            partition,
            error.args[0] if error is not None and error.args else error,
        )

    retrying = Retrying(
        retry=retry_if_exception(_moving_leader),
        stop=stop_after_delay(LEADER_MOVE_SECONDS),
        wait=wait_exponential(multiplier=0.1, max=2.0),
        before_sleep=told,
        reraise=True,
    )
    return retrying(ask)


def _high_watermarks(
    bootstrap_servers: str, settings: Mapping[str, str], topic: str, partitions: Sequence[int]
) -> dict[int, int]:
    """Each partition's high watermark: a read_committed client's watermark is the last
    stable offset, so this asks with read_uncommitted."""
    consumer = _consumer(
        {
            **settings,
            "bootstrap.servers": bootstrap_servers,
            "group.id": f"outbox-verify-{uuid.uuid4().hex}",  # never joins nor commits
            "enable.auto.commit": False,
            "isolation.level": "read_uncommitted",
            "logger": librdkafka_logger(),
        }
    )
    try:
        return {p: watermarks(consumer, topic, p)[1] for p in partitions}
    finally:
        consumer.close()


def read_topic_end(
    bootstrap_servers: str,
    settings: Mapping[str, str],
    topic: str,
    progress: Callable[[int, int], None] | None = None,
    *,
    since: dt.datetime | None = None,
    start: Mapping[int, int] | None = None,
) -> tuple[list[TopicRecord], dict[int, int], dict[int, int], dict[int, int]]:
    """The committed records of ``topic`` to the end of each partition (read_committed), each
    partition's first offset, where its read ended (its last stable offset, which a
    transaction still open there holds back) and, asked after the read, its high watermark:
    only a record below that exists, so only one between the two ends is held back.

    Every partition is read from its start, or with ``since`` from the first record of that
    time (offsets_for_times), or from ``start`` (a partition's first recorded offset) if that
    is earlier: a nightly check then reads the night, not the topic's whole retention.
    Records stay plain tuples, and only the outbox-event-id header is looked at.
    """
    consumer = _consumer(
        {
            # Large fetches answered at once: a broker that holds a fetch for the whole
            # fetch.wait.max.ms (Tansu) otherwise caps the read at ~1 MB per partition per wait.
            "fetch.wait.max.ms": 10,
            "max.partition.fetch.bytes": 16 * 1024 * 1024,
            "fetch.max.bytes": 64 * 1024 * 1024,
            "queued.max.messages.kbytes": 256 * 1024,
            **settings,
            "bootstrap.servers": bootstrap_servers,
            "group.id": f"outbox-verify-{uuid.uuid4().hex}",  # never joins nor commits
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "logger": librdkafka_logger(),
        }
    )
    try:
        meta = consumer.list_topics(topic, timeout=15).topics.get(topic)
        if meta is None or meta.error is not None:
            raise ConfigError(
                f"--topic {topic!r}: no such topic on the cluster ({meta and meta.error})"
            )
        partitions = sorted(meta.partitions)
        lows: dict[int, int] = {}
        highs: dict[int, int] = {}
        for p in partitions:
            lows[p], highs[p] = watermarks(consumer, topic, p)
        begin = dict(lows)
        if since is not None:
            at = int(since.timestamp() * 1000)
            for tp in consumer.offsets_for_times(
                [TopicPartition(topic, p, at) for p in partitions], timeout=15
            ):
                found = tp.offset if tp.offset >= 0 else highs[tp.partition]  # none that new
                first = (start or {}).get(tp.partition, found)
                begin[tp.partition] = max(lows[tp.partition], min(found, first))
        total = 0
        assign = []
        for p in partitions:
            if highs[p] > begin[p]:
                total += highs[p] - begin[p]
                assign.append(TopicPartition(topic, p, begin[p]))
        open_partitions = {tp.partition for tp in assign}
        ends = {p: highs[p] for p in partitions if p not in open_partitions}
        seen: list[TopicRecord] = []
        append = seen.append
        header = EVENT_ID_HEADER
        if assign:
            consumer.assign(assign)
        last_progress = time.monotonic()
        said = last_progress
        while open_partitions:
            messages = consumer.consume(10_000, timeout=1.0)
            now = time.monotonic()
            if messages:
                last_progress = now
            elif now - last_progress > STALL_SECONDS:
                raise TransientError(
                    f"topic {topic!r} yielded nothing for {STALL_SECONDS:g} s before the end of "
                    f"partitions {sorted(open_partitions)} (an open transaction, or the cluster)"
                )
            for msg in messages:
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        open_partitions.discard(msg.partition() or 0)
                        ends[msg.partition() or 0] = msg.offset() or 0
                        continue
                    raise TransientError(f"reading {topic!r}: {redact(str(err))}")
                event_id = None
                headers: Any = msg.headers()  # a list of (name, value) pairs, or None
                for name, value in headers or ():
                    if name == header:
                        if isinstance(value, bytes):
                            event_id = value.decode(errors="replace")
                        break
                append((msg.partition() or 0, msg.offset() or 0, event_id, msg.key()))
            if progress is not None and now - said >= 2.0:
                said = now
                progress(len(seen), total)
        return seen, lows, ends, _high_watermarks(bootstrap_servers, settings, topic, partitions)
    except KafkaException as exc:
        raise TransientError(f"reading {topic!r}: {redact(str(exc.args[0]))}") from None
    finally:
        consumer.close()


def read_committed_offsets(
    bootstrap_servers: str,
    settings: Mapping[str, str],
    group: str,
    topic: str,
    partitions: Iterable[int],
) -> dict[int, int]:
    """A group's committed offsets (read only: the group is not joined)."""
    consumer = _consumer(
        {
            **settings,
            "bootstrap.servers": bootstrap_servers,
            "group.id": group,
            "enable.auto.commit": False,
            "logger": librdkafka_logger(),
        }
    )
    try:
        found = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=15)
    except KafkaException as exc:
        raise TransientError(f"group {group!r}: {redact(str(exc.args[0]))}") from None
    finally:
        consumer.close()
    return {int(tp.partition): int(tp.offset) for tp in found if tp.offset >= 0}


APPLIED_CHUNK = 50_000
"""Event ids per query when reading a group's dedup records."""

Params = dict[str, object]


@contextlib.contextmanager
def _no_gc_passes() -> Iterator[None]:
    """verify builds hundreds of thousands of tuples, none of them cyclic garbage: the cyclic
    collector's passes over the growing heap cost as much as the reading (measured: 200,000
    records in about half the time without them)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _first_offsets(db: str, params: Params) -> dict[int, int]:
    """Each partition's first recorded offset in the window (and the database's errors, such
    as a missing migration, before the topic is read)."""
    with _session(db, "outbox-verify") as conn, conn.cursor(row_factory=tuple_row) as cur:
        return {int(p): int(o) for p, o in cur.execute(sql.TOPIC_FIRST_OFFSETS, params)}


def _read_record(
    db: str, params: Params, groups: Sequence[str], snapshot: threading.Event | None = None
) -> tuple[list[Recorded], dict[str, frozenset[str]]]:
    """The delivery record of the window, and which of its events each group applied;
    ``snapshot`` is set once the record's snapshot is taken (its rows are fetched after)."""
    with _session(db, "outbox-verify") as conn, conn.transaction():
        # A server-side cursor: the record of a long range comes in chunks.
        with conn.cursor(name="outbox_verify", row_factory=tuple_row) as cur:
            cur.itersize = 20_000
            cur.execute(sql.TOPIC_DELIVERIES, params)  # DECLARE: the snapshot is taken
            if snapshot is not None:
                snapshot.set()
            recorded: list[Recorded] = cur.fetchall()  # type: ignore[assignment]
        ids = [r[0] for r in recorded]
        applied: dict[str, frozenset[str]] = {}
        for g in groups:
            found: set[str] = set()
            for lo in range(0, len(ids), APPLIED_CHUNK):
                chunk = ids[lo : lo + APPLIED_CHUNK]
                with conn.cursor(row_factory=tuple_row) as cur:
                    rows = cur.execute(sql.GROUP_APPLIED, {"group": g, "event_ids": chunk})
                    found.update(str(r[0]) for r in rows)
            applied[g] = frozenset(found)
    return recorded, applied


def read_verify(
    db: str,
    bootstrap_servers: str,
    settings: Mapping[str, str],
    topic: str,
    groups: Sequence[str],
    since: dt.timedelta | None,
    progress: Callable[[int, int], None] | None = None,
) -> Report:
    """Read the delivery record, the topic and the groups, then reconcile them (read-only).

    The record is read in a thread while the topic is read here: both mostly wait (on
    PostgreSQL, on librdkafka's fetches). The topic's read starts once the record's snapshot
    is taken, so every event the record holds was committed to the topic before the read
    began: an event the relay publishes meanwhile is never reported lost (I2).
    """
    start = dt.datetime.now(dt.UTC) - since if since is not None else None
    params: Params = {"topic": topic, "since": start or dt.datetime(1970, 1, 1, tzinfo=dt.UTC)}
    with _no_gc_passes(), ThreadPoolExecutor(1, thread_name_prefix="outbox-verify") as pool:
        first = _first_offsets(db, params)
        snapshot = threading.Event()
        record = pool.submit(_read_record, db, params, groups, snapshot)
        while not snapshot.wait(0.05):
            if record.done():
                record.result()  # the record's read failed before its snapshot: say why
                break
        seen, lows, ends, tops = read_topic_end(
            bootstrap_servers, settings, topic, progress, since=start, start=first
        )
        recorded, applied = record.result()
        states = {
            g: GroupState(
                read_committed_offsets(bootstrap_servers, settings, g, topic, lows), applied[g]
            )
            for g in groups
        }
        return reconcile(recorded, seen, lows, states, ends, tops)


def verify_json(report: Report) -> Row:
    return {
        "clean": report.clean,
        "recorded": report.recorded,
        "read": report.read,
        "lost": report.lost,
        "duplicates": report.duplicates,
        "order_violations": report.order_violations,
        "foreign": report.foreign,
        "unrecorded": report.unrecorded,
        "unplaced": report.unplaced,
        "beyond_stable_offset": report.beyond_stable_offset,
        "groups": [
            {
                "group": g.group,
                "applied": g.applied,
                "lag": len(g.lag),
                "unreadable": g.unreadable,
                "passed_unapplied": g.passed_unapplied,
            }
            for g in report.groups
        ],
    }


def render_verify(report: Report, topic: str, limit: int = 20) -> str:
    """A summary, then the first findings of each kind."""
    verdict = "clean" if report.clean else "FINDINGS"
    lines = [
        f"{topic}: {verdict}: {report.recorded} events recorded, {report.read} records read; "
        f"{len(report.lost)} lost, {len(report.duplicates)} duplicated, "
        f"{len(report.order_violations)} out of key order; {report.foreign} foreign records, "
        f"{report.unrecorded} outbox records not in the record, {report.unplaced} recorded "
        "without a place (recovered)"
    ]
    if report.beyond_stable_offset:
        lines.append(
            f"  {len(report.beyond_stable_offset)} recorded events not checked: they lie "
            "beyond their partition's last stable offset, where a transaction still open "
            "(a frozen or slow producer's, until the broker's transaction timeout) holds every "
            "read_committed reader; run verify again once it ends"
        )
    for x in report.lost[:limit]:
        where = f"partition {x['partition']} offset {x['offset']}"
        lines.append(f"  lost {x['event_id']} ({where}): {x['reason']}")
    for e, n in list(report.duplicates.items())[:limit]:
        lines.append(f"  duplicate {e}: {n} times on the topic")
    for x in report.order_violations[:limit]:
        where = f"partition {x['partition']} offset {x['offset']}"
        lines.append(f"  out of order {x['event_id']} ({where}): {x['reason']}")
    for g in report.groups:
        lines.append(
            f"  group {g.group!r}: {g.applied} applied, {len(g.lag)} not yet (lag), "
            f"{len(g.unreadable)} gone before it read them, {len(g.passed_unapplied)} read past "
            "without a dedup record"
        )
        lines.extend(f"    unreadable {e}" for e in g.unreadable[:limit])
        lines.extend(f"    passed {e}" for e in g.passed_unapplied[:limit])
    return "\n".join(lines)
