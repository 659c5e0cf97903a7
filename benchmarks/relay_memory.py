"""Memory: peak RSS of ``outbox relay --once`` draining a big backlog vs a small one.

The relay is the real command in its own process (default slots and profile),
and its peak RSS comes from the kernel (``wait4``'s ``ru_maxrss``), so it counts
Python, psycopg and librdkafka buffers alike. A relay whose memory followed the
backlog (a claim without LIMIT, a growing id list) would show here.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid

from benchmarks.harness import (
    Database,
    Result,
    Services,
    Size,
    create_topics,
    figure,
    fill_outbox,
    outbox_command,
    reset_outbox,
)

TARGET = 1.2  # "flat": within 20 %


def drain_with_cli(db: Database, svc: Services, slots: int) -> tuple[float, float]:
    """Run ``outbox relay --once``; (peak RSS in MiB, seconds)."""
    args = ["relay", "--db", db.url, "-b", svc.bootstrap_servers, "--once", "--slots", str(slots)]
    args += ["--log-level", "WARNING"]
    args += ["-X", "request.timeout.ms=40000"]
    start = time.perf_counter()
    proc = subprocess.Popen(outbox_command(*args), stdin=subprocess.DEVNULL)
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"outbox relay --once exited with {proc.returncode}")
    return usage.ru_maxrss / 1024, seconds  # Linux reports KiB


def pending(db: Database) -> int:
    with db.connect() as conn:
        row = conn.execute("SELECT count(*) FROM outbox_events").fetchone()
    return int(row[0]) if row else 0


def run(svc: Services, size: Size) -> Result:
    db = svc.database("memory")
    topic = f"bench.memory.{uuid.uuid4().hex[:6]}"
    create_topics(svc, topic)
    runs: dict[str, dict[str, float]] = {}
    try:
        # The first relay of a transactional-id prefix scans the state topic for markers it
        # never wrote (seconds per slot): do that on an empty outbox, and keep its peak RSS as
        # the start-up share (it reads recovery markers with librdkafka's prefetch buffers).
        rss, seconds = drain_with_cli(db, svc, size.memory_slots)
        runs["0"] = {"pending_rows": 0, "peak_rss_mib": round(rss, 1), "seconds": round(seconds, 2)}
        for backlog in (size.memory_small, size.memory_big):
            reset_outbox(db)
            fill_outbox(db, backlog, topic=topic, value_bytes=size.value_bytes)
            rss, seconds = drain_with_cli(db, svc, size.memory_slots)
            left = pending(db)
            if left:
                raise RuntimeError(f"relay --once left {left} of {backlog} rows")
            runs[str(backlog)] = {
                "pending_rows": backlog,
                "peak_rss_mib": round(rss, 1),
                "seconds": round(seconds, 2),
                "events_per_s_incl_startup": round(backlog / seconds),
            }
    finally:
        svc.drop(db)
    small = runs[str(size.memory_small)]["peak_rss_mib"]
    big = runs[str(size.memory_big)]["peak_rss_mib"]
    ratio = big / small
    return figure(
        summary=(
            f"peak RSS {big:.0f} MiB draining {size.memory_big:,} rows vs {small:.0f} MiB for "
            f"{size.memory_small:,} and {runs['0']['peak_rss_mib']:.0f} MiB for none "
            f"(outbox relay --once, {size.memory_slots} slots, {size.value_bytes} B values)"
        ),
        value=ratio,
        unit=f"peak RSS, {size.memory_big:,} / {size.memory_small:,} rows",
        target=f"flat (<= {TARGET}x)",
        met=ratio <= TARGET,
        runs=runs,
    )
