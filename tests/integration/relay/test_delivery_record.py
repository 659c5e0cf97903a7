"""The delivery record: where each published event went, written with its delete (I2)."""

from __future__ import annotations

import contextlib
import datetime as dt
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from outbox import publish, sql
from outbox.errors import SlotLost
from outbox.event_ids import new_event_id
from outbox.relay import Relay, Row, deliveries
from outbox.relay.deliveries import key_hash, maintain, partition_name
from outbox.relay.marker import Marker
from outbox.relay.slot_session import PsycopgSlotSession
from outbox.relay.worker import delete_recovered
from tests.conftest import Broker, RelayHandle, _libpq
from tests.support import KafkaReader, assert_exactly_once, wait_for


def _connect(database_url: str) -> psycopg.Connection[dict[str, Any]]:
    return psycopg.connect(_libpq(database_url), autocommit=True, row_factory=dict_row)


def _deliveries(database_url: str) -> dict[str, dict[str, Any]]:
    with _connect(database_url) as conn:
        rows = conn.execute("SELECT * FROM outbox_deliveries ORDER BY id").fetchall()
    return {str(r["event_id"]): r for r in rows}


def _pending(database_url: str) -> int:
    with _connect(database_url) as conn:
        row = conn.execute("SELECT count(*) AS n FROM outbox_events").fetchone()
    return int(row["n"]) if row else -1


def _partitions(database_url: str) -> set[str]:
    with _connect(database_url) as conn:
        return {
            r["relname"]
            for r in conn.execute(sql.DELIVERY_PARTITIONS, {"parent": "outbox_deliveries"})
        }


@pytest.mark.parametrize("guarantee", ["exactly-once", "at-least-once"])
def test_i2_the_relay_records_each_event_where_its_record_is_on_the_topic(
    guarantee: str,
    engine: Engine,
    database_url: str,
    topic: str,
    drain: Callable[..., Relay],
    kafka: KafkaReader,
) -> None:
    keys = [b"a", b"b", None, b"a", b"c"]
    with Session(engine) as session, session.begin():
        ids = [str(publish(session, topic=topic, key=k, value=b"v")) for k in keys]
    drain(guarantee=guarantee)
    records = {r.event_id: r for r in kafka.read(topic, len(ids))}
    recorded = _deliveries(database_url)
    assert set(recorded) == set(ids)
    for event_id, key in zip(ids, keys, strict=True):
        row, record = recorded[event_id], records[event_id]
        assert (row["topic"], row["partition"], row["kafka_offset"]) == (
            record.topic,
            record.partition,
            record.offset,
        )
        assert row["key_hash"] == key_hash(key)
    assert [recorded[e]["id"] for e in ids] == sorted(recorded[e]["id"] for e in ids)
    today = dt.datetime.now(dt.UTC).date()
    assert partition_name(today) in _partitions(database_url)  # the relay's upkeep made it


def test_i2_no_delivery_record_with_retention_zero(
    engine: Engine, database_url: str, topic: str, drain: Callable[..., Relay]
) -> None:
    with Session(engine) as session, session.begin():
        publish(session, topic=topic, key=b"k", value=b"v")
    relay = drain(delivery_retention=0)
    assert relay.stats.published == 1
    assert _deliveries(database_url) == {}


def test_i2_key_hash_in_sql_matches_the_relays(database_url: str) -> None:
    with _connect(database_url) as conn:
        for key in (b"", b"order-1", bytes(range(256))):
            row = conn.execute(
                f"SELECT {sql.KEY_HASH_SQL.format(key='%(k)s::bytea')} AS h", {"k": key}
            ).fetchone()
            assert row is not None
            assert row["h"] == key_hash(key)


def test_i2_upkeep_moves_a_days_rows_out_of_the_default_partition_and_drops_expired_days(
    database_url: str,
) -> None:
    now = dt.datetime(2026, 12, 7, 12, tzinfo=dt.UTC)
    old = now - dt.timedelta(days=9)
    with _connect(database_url) as conn:
        conn.execute(  # rows no daily partition covered yet: in the default one
            "INSERT INTO outbox_deliveries (published_at, event_id, id, topic) VALUES "
            "(%(now)s, gen_random_uuid(), 1, 't'), (%(old)s, gen_random_uuid(), 2, 't')",
            {"now": now, "old": old},
        )
        expired = dt.date(2026, 11, 27)
        conn.execute(
            f"CREATE TABLE {partition_name(expired)} PARTITION OF outbox_deliveries "
            "FOR VALUES FROM ('2026-11-27Z') TO ('2026-11-28Z')"
        )
        plan = maintain(conn, retention_days=7, now=now)
        assert plan is not None
        in_default = conn.execute("SELECT id FROM outbox_deliveries_default ORDER BY id").fetchall()
        in_today = conn.execute(f"SELECT id FROM {partition_name(now.date())}").fetchall()
    assert [r["id"] for r in in_today] == [1]
    assert in_default == []  # the 9-day-old row expired with the retention window
    names = _partitions(database_url)
    assert partition_name(expired) not in names
    assert {partition_name(now.date() + dt.timedelta(days=n)) for n in range(3)} <= names


def test_i2_upkeep_is_done_by_one_relay_at_a_time(database_url: str) -> None:
    with _connect(database_url) as holder, _connect(database_url) as other:
        with holder.transaction():
            holder.execute(sql.TRY_LOCK_UPKEEP, {"key": 0x6F757476})
            assert maintain(other, retention_days=7) is None
        assert maintain(other, retention_days=7) is not None


def test_i4_recovery_from_a_marker_records_the_events_it_deletes_without_a_place(
    engine: Engine, database_url: str, topic: str
) -> None:
    with Session(engine) as session, session.begin():
        event_id = publish(session, topic=topic, key=b"k", value=b"v")
    with _connect(database_url) as conn:
        row = conn.execute(
            "SELECT id, shard FROM outbox_events WHERE event_id = %(e)s", {"e": event_id}
        ).fetchone()
        assert row is not None
        marker = Marker.of_batch(uuid.uuid4(), "tid-0", 0, 1, [(row["id"], event_id)])
        with conn.transaction():
            assert delete_recovered(conn, marker, [row["shard"]], record=True) == 1
    recorded = _deliveries(database_url)[str(event_id)]
    assert (recorded["topic"], recorded["id"]) == (topic, row["id"])
    assert (recorded["partition"], recorded["kafka_offset"]) == (None, None)
    assert recorded["key_hash"] == key_hash(b"k")


def test_i12_upkeep_gives_up_on_a_lock_held_by_a_batch_instead_of_queueing_batches_behind_it(
    database_url: str,
) -> None:
    now = dt.datetime(2026, 12, 7, 12, tzinfo=dt.UTC)
    expired = partition_name(dt.date(2026, 11, 20))
    with _connect(database_url) as batch, _connect(database_url) as upkeep:
        batch.execute(
            f"CREATE TABLE {expired} PARTITION OF outbox_deliveries "
            "FOR VALUES FROM ('2026-11-20Z') TO ('2026-11-21Z')"
        )
        with batch.transaction():
            batch.execute("SELECT count(*) FROM outbox_deliveries")  # a reader of every day
            started = time.monotonic()
            with pytest.raises(psycopg.errors.LockNotAvailable):
                maintain(upkeep, retention_days=7, now=now)
            assert time.monotonic() - started < 10
        assert maintain(upkeep, retention_days=7, now=now) is not None  # next turn drops it
    assert expired not in _partitions(database_url)


REFUSE_FIRST_RECORD = """
CREATE SEQUENCE refused_records;
CREATE FUNCTION refuse_first_record() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF nextval('refused_records') = 1 THEN  -- outlives the rollback: refuses once
    RAISE EXCEPTION 'outbox_deliveries refused once';
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER refuse_first_record BEFORE INSERT ON outbox_deliveries
FOR EACH STATEMENT EXECUTE FUNCTION refuse_first_record();
"""


@pytest.mark.both_brokers
def test_i12_a_refused_delivery_record_aborts_its_batch_and_each_event_is_published_once(
    engine: Engine,
    database_url: str,
    topic: str,
    broker: Broker,
    start_relay: Callable[..., RelayHandle],
    kafka: KafkaReader,
) -> None:
    """The record's INSERT completes before the Kafka commit: when the database refuses it,
    the batch's Kafka transaction is aborted (I12) and its rows stay in the outbox, to be
    published again and recorded with their places."""
    with _connect(database_url) as conn:
        conn.execute(REFUSE_FIRST_RECORD)
    with Session(engine) as session, session.begin():
        ids = [str(publish(session, topic=topic, key="k", value=b"v")) for _ in range(10)]
    handle = start_relay(slots=1)
    wait_for(lambda: not _pending(database_url), timeout=60, what="the outbox drained")
    handle.stop()
    assert_exactly_once(
        kafka.read(topic, 10), ids, aborted_copies_visible=not broker.filters_aborts
    )
    recorded = _deliveries(database_url)
    assert set(recorded) == set(ids)
    with _connect(database_url) as conn:
        refused = conn.execute("SELECT last_value FROM refused_records").fetchone()
    assert refused is not None
    assert refused["last_value"] >= 2  # refused once, then accepted
    assert handle.relay.stats.recovered == 0
    assert handle.relay.stats.aborts >= 1
    assert all(r["partition"] is not None for r in recorded.values())


def _ended_within(conn: psycopg.Connection[dict[str, Any]], pid: int, timeout: float) -> bool:
    """Whether the server ends backend ``pid`` within ``timeout`` seconds."""

    def gone() -> bool:
        row = conn.execute(
            "SELECT count(*) AS n FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
        return row is not None and row["n"] == 0

    try:
        wait_for(gone, timeout=timeout, what="the server ends the session")
    except AssertionError:
        return False
    return True


def test_i12_a_slot_session_recording_its_batch_stays_within_reach_of_the_servers_timeout(
    database_url: str,
) -> None:
    """While the batch's Kafka commit runs (inside ``recording``), the slot's session must be
    one the server ends after idle_in_transaction_session_timeout, as it does for a relay
    frozen there: a statement sent but not synced (pipeline mode) keeps the session "active",
    out of the timeout's reach, and the frozen relay would hold its slot forever."""
    row = Row(1, uuid.uuid4(), "t", b"k", b"v", [], [], 0, 1)
    with _connect(database_url) as watch, _connect(database_url) as conn:
        conn.execute("SET idle_in_transaction_session_timeout = 1000")
        session = PsycopgSlotSession(conn)
        ended = False
        with (
            contextlib.suppress(SlotLost),
            session.transaction(),
            session.recording([row], {row.id: (0, 7)}),  # a Kafka commit that hangs
        ):
            ended = _ended_within(watch, conn.info.backend_pid, timeout=30)
    assert ended, "the server could not end a session frozen in its batch's Kafka commit"


def test_i2_an_event_acknowledged_without_an_offset_is_recorded_without_a_place(
    database_url: str,
) -> None:
    """librdkafka can report a record delivered with no offset (a broker restarted mid-batch):
    the batch is still recorded, that event without a place, like a recovered one."""
    placed_row = Row(1, uuid.uuid4(), "t", b"k", b"v", [], [], 0, 1)
    unplaced_row = Row(2, uuid.uuid4(), "t", None, b"v", [], [], 0, 1)
    with _connect(database_url) as conn:
        session = PsycopgSlotSession(conn)
        with session.transaction():
            session.record_deliveries([placed_row, unplaced_row], {placed_row.id: (3, 41)})
    recorded = _deliveries(database_url)
    place = {e: (r["partition"], r["kafka_offset"], r["key_hash"]) for e, r in recorded.items()}
    assert place == {
        str(placed_row.event_id): (3, 41, key_hash(b"k")),
        str(unplaced_row.event_id): (None, None, None),
    }


_INSERT_REFERENCE = f"""
INSERT INTO outbox_deliveries (event_id, id, topic, partition, kafka_offset, key_hash)
SELECT e, i, t, p, o, {sql.KEY_HASH_SQL.format(key="k")}
FROM unnest(%(event_ids)s::uuid[], %(ids)s::int8[], %(topics)s::text[],
            %(partitions)s::int4[], %(offsets)s::int8[], %(keys)s::bytea[]) AS b(e, i, t, p, o, k)
RETURNING event_id, id, topic, partition, kafka_offset, key_hash
"""


def test_i2_the_batch_record_holds_what_the_database_computes_from_each_row(
    database_url: str,
) -> None:
    """The relay builds the batch's COPY itself, key hashes included: whatever the rows hold
    (no key, an empty or a 1 MB key, long, non-ASCII and many topics, offsets and partitions
    at their limits, a report without an offset), the record holds what a plain INSERT with
    the database's own key hash (``KEY_HASH_SQL``, used by recovery) writes."""
    keys: list[bytes | None] = [None, b"", b"\x00", bytes(range(256)), b"k" * (1 << 20)]
    topics = ["t", "é-topic-ü" * 20, "x" * 249, "日本", *(f"many.{n}" for n in range(40))]
    rows = [
        Row(n + 1, uuid.uuid4(), topics[n % len(topics)], keys[n % len(keys)], b"v", [], [], 0, 1)
        for n in range(200)
    ]
    extremes = [(0, 0), (2**31 - 1, 2**63 - 1), (7, 2**31)]
    placed = {r.id: extremes[r.id % 3] for r in rows if r.id % 11}  # some without a place
    with _connect(database_url) as conn:
        session = PsycopgSlotSession(conn)
        with session.transaction():
            session.record_deliveries(rows, placed)
        copied = conn.execute(
            "SELECT event_id, id, topic, partition, kafka_offset, key_hash "
            "FROM outbox_deliveries ORDER BY id"
        ).fetchall()
        conn.execute("TRUNCATE outbox_deliveries")
        expected = conn.execute(
            _INSERT_REFERENCE,
            {
                "event_ids": [r.event_id for r in rows],
                "ids": [r.id for r in rows],
                "topics": [r.topic for r in rows],
                "partitions": [placed.get(r.id, (None, None))[0] for r in rows],
                "offsets": [placed.get(r.id, (None, None))[1] for r in rows],
                "keys": [r.key for r in rows],
            },
        ).fetchall()
    assert len(copied) == len(rows)
    assert copied == sorted(expected, key=lambda r: r["id"])


@dataclass(frozen=True)
class _FreezingRow:
    """A batch row whose key, when the record reads it, runs ``freeze``: the relay frozen
    (SIGSTOP, a paused VM) while it builds the batch's record."""

    id: int
    event_id: uuid.UUID
    topic: str
    freeze: Callable[[], None]

    @property
    def key(self) -> bytes:
        self.freeze()
        return b"k"


def test_i12_a_relay_frozen_while_building_its_batch_record_stays_within_reach_of_the_timeout(
    database_url: str,
) -> None:
    """While the relay builds the batch's record, its session must be idle in transaction, so
    the server ends it after idle_in_transaction_session_timeout and the slot's lock goes to
    another relay. A session already in COPY FROM STDIN waits on the client as "active",
    which neither that timeout nor statement_timeout ends: a relay frozen there would hold
    its slot forever."""
    with _connect(database_url) as watch, _connect(database_url) as conn:
        conn.execute("SET idle_in_transaction_session_timeout = 1000")
        ended: list[bool] = []

        def freeze() -> None:
            if not ended:
                ended.append(_ended_within(watch, conn.info.backend_pid, timeout=10))

        row = _FreezingRow(1, uuid.uuid4(), "t", freeze)
        with contextlib.suppress(psycopg.Error), conn.transaction():  # the server ended it
            deliveries.record(conn, [row], {1: (0, 1)})
    assert ended == [True], "the server could not end a session frozen in its batch's record"


def test_i2_the_batch_record_keeps_a_topics_name_whatever_the_sessions_client_encoding(
    database_url: str,
) -> None:
    """The COPY's text is read in the session's client encoding (a DSN or PGCLIENTENCODING
    may set one other than UTF-8): a topic's name is recorded as it is, as an INSERT's
    parameter would be."""
    row = Row(1, uuid.uuid4(), "événements.é", b"k", b"v", [], [], 0, 1)
    with _connect(database_url) as conn:
        conn.execute("SET client_encoding = 'LATIN1'")
        with conn.transaction():
            PsycopgSlotSession(conn).record_deliveries([row], {row.id: (0, 5)})
        conn.execute("SET client_encoding = 'UTF8'")
    assert _deliveries(database_url)[str(row.event_id)]["topic"] == row.topic


def test_i2_trace_looks_v7_ids_up_in_the_brin_index_and_other_ids_in_the_btree(
    database_url: str,
) -> None:
    """publish()'s v7 ids are indexed by a BRIN index (next to free for the relay's INSERT),
    other ids by a btree: trace's lookup must reach each kind through its own index, not a scan
    of every day of the record."""
    v7 = new_event_id()
    with _connect(database_url) as conn:
        deliveries.maintain(conn, 7)
        with conn.transaction():
            conn.execute(
                "INSERT INTO outbox_deliveries (event_id, id, topic)"
                " SELECT CASE WHEN n %% 2 = 0 THEN gen_random_uuid() ELSE %(v7)s END, n, 't'"
                " FROM generate_series(1, 2000) AS n",
                {"v7": v7},
            )
        conn.execute("ANALYZE outbox_deliveries")
        indexes = conn.execute(
            "SELECT tablename, indexdef FROM pg_indexes WHERE tablename LIKE 'outbox_deliveries_%%'"
        ).fetchall()
        days = {r["tablename"] for r in indexes}
        assert len(days) >= 4  # today, two days ahead, the default partition
        for day in days:  # every partition: a BRIN of v7 ids and a btree of the others
            defs = [r["indexdef"] for r in indexes if r["tablename"] == day]
            assert any("USING brin" in d and "= 7)" in d for d in defs), defs
            assert any("USING btree" in d and "<> 7)" in d for d in defs), defs
        conn.execute("SET enable_seqscan = off")  # a small table: rule the size out
        for wanted in (v7, uuid.uuid4()):
            plan = "\n".join(
                str(row["QUERY PLAN"])
                for row in conn.execute(
                    f"EXPLAIN {sql.TRACE_DELIVERIES}", {"event_ids": [wanted]}
                ).fetchall()
            )
            assert "Seq Scan" not in plan, plan  # each branch can use its partial index
        found = conn.execute(sql.TRACE_DELIVERIES, {"event_ids": [v7]}).fetchall()
        assert len(found) == 1000
