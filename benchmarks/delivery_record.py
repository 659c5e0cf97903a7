"""The delivery record's cost: relay throughput with the record on and off, and verify's speed.

Both drains run the same backlog with the same settings in fresh relay processes, interleaved
round by round (which of the two goes first alternates, so a machine getting busier or idler
during a round does not favour one side); the figure is the median of the rounds' ratios
(target >= 0.90: the record costs at most 10 %). Then the topic is topped up (record on) to
``VERIFY_RECORDS`` and ``outbox verify``'s reading and comparison (``read_verify``) runs over
all of it and reports records/s (target >= 50,000 on 200,000 records).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

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
    load_during,
    median,
    quiet_logging,
    relay_config,
    reset_outbox,
)

TARGET = 0.90
VERIFY_TARGET = 50_000.0
MIN_ROUNDS = 4
"""At least this many on/off pairs (the smoke size only proves the code runs): one pair on a
shared machine swings from 0.4 to 1.0."""
VERIFY_RECORDS = {"smoke": 0, "default": 200_000, "full": 200_000}
"""Records on the topic when verify is timed (0: what the rounds left)."""


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


def top_up(svc: Services, db: Database, size: Size, topic: str, rows: int) -> None:
    """Relay ``rows`` more events (record on) onto ``topic``, unmeasured."""
    quiet_logging()
    config = relay_config(db, svc, slots=1, batch_size=size.batch_size, delivery_retention=7)
    with RunningRelay(config) as relay:
        drain_burst(relay, db, rows, topic=topic, value_bytes=size.value_bytes, seed=1)


def verify_rate(svc: Services, db: Database, topic: str) -> tuple[int, float, float, bool]:
    """Records read, records/s, CPU µs per record (this process: Python and librdkafka's
    threads; PostgreSQL and the broker not counted) and whether the topic verified clean, in
    a fresh process. The CPU figure tells a busy machine's waiting from verify's own work."""
    from outbox.cli.delivery import read_verify

    started, cpu = time.perf_counter(), time.process_time()
    report = read_verify(db.url, svc.bootstrap_servers, {}, topic, [], None)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return report.read, report.read / elapsed, cpu / max(report.read, 1) * 1e6, report.clean


def run(svc: Services, size: Size) -> Result:
    db = svc.database("deliveries")
    topic = f"bench.deliveries.{uuid.uuid4().hex[:6]}"
    create_topics(svc, topic)
    rounds: list[dict[str, Any]] = []
    try:
        pairs = size.relay_rounds if size.name == "smoke" else max(size.relay_rounds, MIN_ROUNDS)
        with load_during() as load:
            _rounds(svc, db, size, topic, pairs, rounds)
        on_topic = size.relay_rows * len(rounds) * 2
        if (wanted := VERIFY_RECORDS.get(size.name, 0)) > on_topic:
            isolated(top_up, svc, db, size, topic, wanted - on_topic)
        read, per_s, cpu_us, clean = isolated(verify_rate, svc, db, topic)
    finally:
        svc.drop(db)
    return _figure(rounds, load, read, per_s, cpu_us, clean)


def _rounds(
    svc: Services, db: Database, size: Size, topic: str, pairs: int, rounds: list[dict[str, Any]]
) -> None:
    """On/off pairs, the order alternating round by round."""
    for n in range(pairs):
        if n % 2:
            on = isolated(measure, svc, db, size, topic, 7)
            off = isolated(measure, svc, db, size, topic, 0)
        else:
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


def _figure(
    rounds: list[dict[str, Any]],
    load: dict[str, Any],
    read: int,
    per_s: float,
    cpu_us: float,
    clean: bool,
) -> Result:
    busy = " TOO BUSY: other processes held more than a quarter of the cores." * load["too_busy"]
    ratio = median([r["ratio"] for r in rounds])
    return figure(
        summary=(
            f"relay (1 slot) with the delivery record "
            f"{median([r['on_events_per_s'] for r in rounds]):,.0f} events/s vs without "
            f"{median([r['off_events_per_s'] for r in rounds]):,.0f} (ratio {ratio:.2f}); "
            f"verify read {read:,} records at {per_s:,.0f}/s ({cpu_us:.1f} µs CPU per record; "
            f"clean: {clean}){busy}"
        ),
        value=ratio,
        unit="x throughput, record on / off",
        target=f">= {TARGET}",
        met=None if load["too_busy"] else ratio >= TARGET,
        rounds=rounds,
        verify_records=read,
        verify_records_per_s=round(per_s),
        verify_cpu_us_per_record=round(cpu_us, 1),
        verify_met=per_s >= VERIFY_TARGET,
        verify_clean=clean,
        verify_target=f">= {VERIFY_TARGET:,.0f} records/s",
        load=load,
    )
