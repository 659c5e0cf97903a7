"""The delivery record's statement alone, per 1000-row batch, on a durable PostgreSQL
(fsync, synchronous_commit and full_page_writes on, as the benchmarks run it): the binary
COPY the relay now uses against the INSERT ... SELECT FROM unnest(...) it replaced, each with
the event_id btree index and without, interleaved; time of statement + COMMIT and WAL bytes.

    .venv/bin/python benchmarks/results/issue26/record_statement.py [REPS]
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from typing import Any

import psycopg

from benchmarks.harness import DURABLE_SETTINGS
from outbox import migrate
from outbox.embedded.servers import EmbeddedPostgres
from outbox.relay import deliveries
from outbox.relay.rows import Row

B = 1000
OLD_INSERT = """
INSERT INTO outbox_deliveries (event_id, id, topic, partition, kafka_offset, key_hash)
SELECT e, i, t, p, o, ('x' || left(encode(sha256(k), 'hex'), 16))::bit(64)::int8
FROM unnest(%(event_ids)b::uuid[], %(ids)b::int8[], %(topics)b::text[],
            %(partitions)b::int4[], %(offsets)b::int8[], %(keys)b::bytea[]) AS b(e, i, t, p, o, k)
"""


def batch() -> tuple[list[Row], dict[int, tuple[int, int]]]:
    rows = [
        Row(i, uuid.uuid4(), "bench.deliveries.abcdef", b"key-%d" % i, b"", [], [], 0, 0)
        for i in range(B)
    ]
    return rows, {r.id: (i % 3, 1_000_000 + i) for i, r in enumerate(rows)}


def old(conn: psycopg.Connection[Any], rows: list[Row], placed: dict[int, tuple[int, int]]) -> None:
    conn.execute(
        OLD_INSERT,
        {
            "event_ids": [r.event_id for r in rows],
            "ids": [r.id for r in rows],
            "topics": [r.topic for r in rows],
            "partitions": [placed[r.id][0] for r in rows],
            "offsets": [placed[r.id][1] for r in rows],
            "keys": [r.key for r in rows],
        },
        prepare=True,
    )


def main(reps: int) -> None:
    pg = EmbeddedPostgres(extra_settings=DURABLE_SETTINGS).start()
    try:
        migrate.upgrade(pg.sqlalchemy_url)
        conn = psycopg.connect(pg.dsn, autocommit=True)
        deliveries.maintain(conn, 7)
        ways = {"insert unnest": old, "binary COPY": deliveries.record}
        res: dict[tuple[str, str], list[tuple[float, float]]] = {}
        for _ in range(reps):
            for index in ("btree", "none"):
                for name, way in ways.items():
                    conn.execute("DROP INDEX IF EXISTS outbox_deliveries_event_id")
                    if index == "btree":
                        conn.execute(
                            "CREATE INDEX outbox_deliveries_event_id"
                            " ON outbox_deliveries (event_id)"
                        )
                    conn.execute("TRUNCATE outbox_deliveries")
                    for _ in range(50):  # a record of 50 batches to insert into
                        way(conn, *batch())
                    for _ in range(10):
                        rows, placed = batch()
                        before = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
                        started = time.perf_counter()
                        with conn.transaction():
                            way(conn, rows, placed)
                        took = time.perf_counter() - started
                        wal = conn.execute(
                            "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s)", before
                        ).fetchone()
                        assert wal is not None
                        res.setdefault((name, index), []).append((took, float(wal[0])))
        print(f"{B}-row batches, {reps} x 10 each, interleaved; median statement + COMMIT, WAL")
        for (name, index), v in res.items():
            ms = statistics.median(t for t, _ in v) * 1e3
            kib = statistics.median(w for _, w in v) / 1024
            print(f"{name:14s} index {index:5s}  {ms:6.2f} ms  {kib:5.0f} KiB WAL")
    finally:
        pg.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3)
