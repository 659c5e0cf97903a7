"""The delivery record's cost: relay throughput with the record on and off, and verify's speed.

Both drains run the same backlog with the same settings in fresh relay processes, interleaved
round by round; the figure is their ratio (target >= 0.90: the record costs at most 10 %).
Then ``outbox verify``'s reading and comparison (``read_verify``) runs over everything the
rounds put on the topic and reports records/s (target >= 50,000).
"""

from __future__ import annotations

import time
import uuid

from benchmarks.harness import (
    Database,
    Drain,
    Result,
    RunningRelay,
    Services,
    Size,
    create_topics,
    drain_burst,
    figure,
    isolated,
    median,
    quiet_logging,
    relay_config,
    reset_outbox,
)

TARGET = 0.90
VERIFY_TARGET = 50_000.0


def measure(svc: Services, db: Database, size: Size, topic: str, retention: int) -> Drain:
    """One relay process (retention days; 0: no record) drains one backlog."""
    quiet_logging()
    config = relay_config(
        db, svc, slots=1, batch_size=size.batch_size, delivery_retention=retention
    )
    with RunningRelay(config) as relay:
        drained = drain_burst(relay, db, size.relay_rows, topic=topic, value_bytes=size.value_bytes)
    reset_outbox(db)
    return drained


def verify_rate(svc: Services, db: Database, topic: str) -> tuple[int, float, bool]:
    """Records read, records/s and whether the topic verified clean."""
    from outbox.cli.delivery import read_verify

    started = time.perf_counter()
    report = read_verify(db.url, svc.bootstrap_servers, {}, topic, [], None)
    return report.read, report.read / (time.perf_counter() - started), report.clean


def run(svc: Services, size: Size) -> Result:
    db = svc.database("deliveries")
    topic = f"bench.deliveries.{uuid.uuid4().hex[:6]}"
    create_topics(svc, topic)
    rounds = []
    try:
        for _ in range(size.relay_rounds):
            off = isolated(measure, svc, db, size, topic, 0)
            on = isolated(measure, svc, db, size, topic, 7)
            rounds.append(
                {
                    "on_events_per_s": round(on.events_per_s),
                    "off_events_per_s": round(off.events_per_s),
                    "ratio": round(on.events_per_s / off.events_per_s, 3),
                    "on_cpu_us_per_event": round(on.cpu_us_per_event, 1),
                    "off_cpu_us_per_event": round(off.cpu_us_per_event, 1),
                }
            )
        read, per_s, clean = verify_rate(svc, db, topic)
    finally:
        svc.drop(db)
    ratio = median([r["ratio"] for r in rounds])
    return figure(
        summary=(
            f"relay (1 slot) with the delivery record "
            f"{median([r['on_events_per_s'] for r in rounds]):,.0f} events/s vs without "
            f"{median([r['off_events_per_s'] for r in rounds]):,.0f} (ratio {ratio:.2f}); "
            f"verify read {read:,} records at {per_s:,.0f}/s"
        ),
        value=ratio,
        unit="x throughput, record on / off",
        target=f">= {TARGET}",
        met=ratio >= TARGET,
        rounds=rounds,
        verify_records=read,
        verify_records_per_s=round(per_s),
        verify_clean=clean,
        verify_target=f">= {VERIFY_TARGET:,.0f} records/s",
    )
