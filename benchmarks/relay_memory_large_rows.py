"""Memory with large rows: peak RSS of ``outbox relay --once`` draining rows of 900 KB.

Issue 14: the relay claimed 1000 whole rows before any size check, so a backlog of
large rows took ~1 GB per slot. A claim now stops at ``--batch-bytes`` (16 MiB by
default), so the peak RSS must not grow with the backlog. The same drain with the
budget lifted (``--batch-bytes`` of 4 GiB, the old behaviour) shows what it bounds.

    .venv/bin/python -m benchmarks.relay_memory_large_rows [--rows 20,200]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import time
import uuid

from benchmarks.harness import (
    Database,
    Services,
    create_topics,
    outbox_command,
    reset_outbox,
    services,
)
from outbox import sql

VALUE_BYTES = 900_000

# Rows of 900 KB made by the server (md5 hex decoded: 16 bytes per repeat), one per key.
_FILL = """
INSERT INTO outbox_events (event_id, topic, shard, key, value, header_names, header_values)
SELECT gen_random_uuid(), %(topic)s, i %% 32, convert_to('key-' || i, 'UTF8'),
       decode(repeat(md5(i::text), %(repeats)s), 'hex'), '{}', '{}'
FROM generate_series(1, %(rows)s) AS i
"""


def fill(db: Database, topic: str, rows: int) -> None:
    with db.connect() as conn, conn.transaction():
        conn.execute(_FILL, {"topic": topic, "rows": rows, "repeats": VALUE_BYTES // 16})
        conn.execute(sql.WAKE_ALL_SLOTS)


def drain(db: Database, svc: Services, *extra: str) -> tuple[float, float]:
    """``outbox relay --once`` in its own process: (peak RSS in MiB, seconds)."""
    args = ["relay", "--db", db.url, "-b", svc.bootstrap_servers, "--once", "--slots", "1"]
    args += ["--log-level", "WARNING"]
    args += ["-X", "request.timeout.ms=40000", *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(outbox_command(*args), stdin=subprocess.DEVNULL)
    _pid, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"outbox relay --once exited with {os.waitstatus_to_exitcode(status)}")
    return usage.ru_maxrss / 1024, time.perf_counter() - start  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="20,200", help="backlogs to drain, comma-separated")
    backlogs = [int(n) for n in parser.parse_args().rows.split(",")]
    with services() as svc:
        db = svc.database("bigrows")
        topic = f"bench.bigrows.{uuid.uuid4().hex[:6]}"
        create_topics(svc, topic)
        drain(db, svc)  # the first relay of a prefix scans the state topic: not measured
        for label, extra in (
            ("default --batch-bytes (16 MiB)", ()),
            ("--batch-bytes 4 GiB (no budget)", ("--batch-bytes", str(4 << 30))),
        ):
            for rows in backlogs:
                reset_outbox(db)
                fill(db, topic, rows)
                rss, seconds = drain(db, svc, *extra)
                print(
                    f"{label}: {rows} rows of {VALUE_BYTES // 1000} KB "
                    f"({rows * VALUE_BYTES / 1e6:.0f} MB): peak RSS {rss:.0f} MiB, {seconds:.1f} s",
                    flush=True,
                )
        svc.drop(db)


if __name__ == "__main__":
    main()
