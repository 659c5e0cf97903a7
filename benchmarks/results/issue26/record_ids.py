"""The delivery record's statement alone, per 1000-row batch, on a durable PostgreSQL (fsync,
synchronous_commit, full_page_writes on, as the benchmarks run it): random (v4) against
time-ordered (v7) event ids, the key hashed by the server (SHA-256 in SQL) or by the relay
(an int8 array), v7 without an event_id index (the floor), and v7 with migration 0008's
indexes (a BRIN of v7 ids, a btree of the others: the relay now); a database per arm, each
with a record of PRE batches to start with, one batch per arm per round, the order rotating
(a shared machine's load then falls on every arm alike). Per batch: statement + COMMIT
(median, mean), the server process's CPU (less swayed by other users' load than the wall
clock), WAL bytes, and the relay's CPU to build the parameters.

    .venv/bin/python benchmarks/results/issue26/record_ids.py [ROUNDS] [PRE]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from benchmarks.harness import DURABLE_SETTINGS
from outbox import migrate, sql
from outbox.embedded.servers import EmbeddedPostgres
from outbox.event_ids import new_event_id
from outbox.relay import deliveries
from outbox.relay.rows import Row

B = 1000
SQL_HASH_INSERT = """
INSERT INTO outbox_deliveries (event_id, id, topic, partition, kafka_offset, key_hash)
SELECT e, i, t, p, o, ('x' || left(encode(sha256(k), 'hex'), 16))::bit(64)::int8
FROM unnest(%(event_ids)b::uuid[], %(ids)b::int8[], %(topics)b::text[],
            %(partitions)b::int4[], %(offsets)b::int8[], %(keys)b::bytea[]) AS b(e, i, t, p, o, k)
"""
_next_id = 0


def batch(make: Callable[[], uuid.UUID]) -> tuple[list[Row], dict[int, tuple[int, int]]]:
    global _next_id
    rows = [
        Row(
            _next_id + i,
            make(),
            "bench.deliveries.abcdef",
            b"key-%d" % (i % 100),
            b"",
            [],
            [],
            0,
            0,
        )
        for i in range(B)
    ]
    _next_id += B
    return rows, {r.id: (i % 3, 1_000_000 + i) for i, r in enumerate(rows)}


def sql_hash(
    conn: psycopg.Connection[Any], rows: list[Row], placed: dict[int, tuple[int, int]]
) -> float:
    """The statement before: the keys sent, hashed by the server."""
    cpu = time.process_time()
    params = deliveries.batch_params(rows, placed)
    del params["key_hashes"]
    params["keys"] = deliveries.pack_varlen([r.key for r in rows], deliveries.BYTEA)
    cpu = time.process_time() - cpu
    conn.execute(SQL_HASH_INSERT, params, prepare=True)
    return cpu


def py_hash(
    conn: psycopg.Connection[Any], rows: list[Row], placed: dict[int, tuple[int, int]]
) -> float:
    """The relay's statement: the keys hashed by the relay."""
    cpu = time.process_time()
    params = deliveries.batch_params(rows, placed)
    cpu = time.process_time() - cpu
    conn.execute(sql.RECORD_DELIVERIES, params, prepare=True)
    return cpu


def backend_cpu(conn: psycopg.Connection[Any]) -> float:
    """CPU seconds the connection's server process used so far (Linux /proc)."""
    stat = Path(f"/proc/{conn.info.backend_pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


ARMS = {
    "v4 ids, key hashed by the server (before)": ("v4", sql_hash, True),
    "v4 ids, key hashed by the relay": ("v4", py_hash, True),
    "v7 ids, key hashed by the server": ("v7", sql_hash, True),
    "v7 ids, key hashed by the relay, btree": ("v7", py_hash, True),
    "v7 ids, relay hash, no index (the floor)": ("v7", py_hash, False),
    "v7 ids, relay hash, BRIN + non-v7 btree (now)": ("v7", py_hash, "brin"),
}


def main(rounds: int, pre: int) -> None:
    pg = EmbeddedPostgres(extra_settings=DURABLE_SETTINGS).start()
    makers: dict[str, Callable[[], uuid.UUID]] = {"v4": uuid.uuid4, "v7": new_event_id}
    try:
        conns: dict[str, psycopg.Connection[Any]] = {}
        with psycopg.connect(pg.dsn, autocommit=True) as admin:
            for n, (arm, (kind, way, index)) in enumerate(ARMS.items()):
                admin.execute(f"CREATE DATABASE arm{n}")
                dsn = pg.dsn_for(f"arm{n}")
                migrate.upgrade("postgresql+psycopg" + dsn.removeprefix("postgresql"))
                conn = conns[arm] = psycopg.connect(dsn, autocommit=True)
                deliveries.maintain(conn, 7)
                if index != "brin":  # as migrated (0008): a BRIN of v7 ids, a btree of others
                    conn.execute("DROP INDEX outbox_deliveries_event_id")
                    conn.execute("DROP INDEX outbox_deliveries_event_id_v7")
                if index is True:  # as before 0008: one btree of every id
                    conn.execute(
                        "CREATE INDEX outbox_deliveries_event_id ON outbox_deliveries (event_id)"
                    )
                for _ in range(pre):  # a record of PRE batches to insert into
                    way(conn, *batch(makers[kind]))
            admin.execute("CHECKPOINT")
        names = list(ARMS)
        res: dict[str, list[tuple[float, float, float]]] = {a: [] for a in names}
        server: dict[str, float] = dict.fromkeys(names, 0.0)
        for r in range(rounds):
            if r and r % 20 == 0:  # a checkpoint now and then, as a server has
                next(iter(conns.values())).execute("CHECKPOINT")
            for arm in names[r % len(names) :] + names[: r % len(names)]:
                kind, way, _ = ARMS[arm]
                conn = conns[arm]
                rows, placed = batch(makers[kind])
                before = conn.execute("SELECT pg_current_wal_insert_lsn()").fetchone()
                cpu0 = backend_cpu(conn)
                started = time.perf_counter()
                with conn.transaction():
                    cpu = way(conn, rows, placed)
                took = time.perf_counter() - started
                server[arm] += backend_cpu(conn) - cpu0
                wal = conn.execute(
                    "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), %s)", before
                ).fetchone()
                assert wal is not None
                res[arm].append((took, float(wal[0]), cpu))
        print(f"# load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} (2 cores, shared)")
        print(
            f"{B}-row batches onto a record of {pre}+ batches, {rounds} rounds of one batch per"
            " arm, order rotating, a CHECKPOINT every 20 rounds"
        )
        print(
            f"{'':48s} statement+COMMIT ms: median  mean | server CPU ms | WAL KiB | relay CPU ms"
        )
        for arm, v in res.items():
            ms = statistics.median(t for t, _, _ in v) * 1e3
            mean = statistics.fmean(t for t, _, _ in v) * 1e3
            kib = statistics.fmean(w for _, w, _ in v) / 1024
            cpu = statistics.median(c for _, _, c in v) * 1e3
            srv = server[arm] / len(v) * 1e3
            print(f"{arm:48s} {ms:17.2f} {mean:6.2f} | {srv:13.2f} | {kib:7.0f} | {cpu:12.2f}")
    finally:
        pg.stop()


if __name__ == "__main__":
    main(
        int(sys.argv[1]) if len(sys.argv) > 1 else 60,
        int(sys.argv[2]) if len(sys.argv) > 2 else 100,
    )
