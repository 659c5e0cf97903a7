"""The delivery record's cost: relay throughput with the record on and off, and verify's speed.

Four drains of the same backlog with the same settings, each in a fresh relay process: the
record off and on, with publish()'s time-ordered (v7) event ids and with random (v4) ones (a
database, a record and a topic for each kind of id). The four run interleaved round by round,
their order rotating, so a machine getting busier or idler during a round favours none; each
round gives a ratio (on / off) per kind, and the figure is the median of the v7 rounds' ratios
(target >= 0.90: the record costs at most 10 %), with the v4 ratio beside it. Then the v7
topic is topped up (record on) to ``VERIFY_RECORDS`` and ``outbox verify``'s reading and
comparison (``read_verify``) runs over all of it and reports records/s (target >= 50,000 on
200,000 records).
"""

from __future__ import annotations

import os
import statistics
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
MIN_ROUNDS = 8
"""At least this many rounds (the smoke size only proves the code runs): one on/off pair on a
shared machine swings from 0.4 to 1.0, and the median of a few does by +-0.1."""
ARMS = (("off", "v7"), ("on", "v7"), ("off", "v4"), ("on", "v4"))
"""(record, event ids) of the drains of a round, rotated by one each round."""
VERIFY_RECORDS = {"smoke": 0, "default": 200_000, "full": 200_000}
"""Records on the topic when verify is timed (0: what the rounds left)."""


def measure(svc: Services, db: Database, size: Size, topic: str, retention: int, ids: str) -> Drain:
    """One relay process (retention days; 0: no record) drains one backlog of ``ids``; the
    CPU of the driver's process tree (this relay, and the servers the driver started) too."""
    quiet_logging()
    config = relay_config(
        db, svc, slots=1, batch_size=size.batch_size, delivery_retention=retention
    )
    with RunningRelay(config) as relay:
        drained = drain_burst(
            relay,
            db,
            size.relay_rows,
            topic=topic,
            value_bytes=size.value_bytes,
            ids=ids,
            tree=os.getppid(),
        )
    reset_outbox(db)
    return drained


def top_up(svc: Services, db: Database, size: Size, topic: str, rows: int) -> None:
    """Relay ``rows`` more events (record on) onto ``topic``, unmeasured."""
    quiet_logging()
    config = relay_config(db, svc, slots=1, batch_size=size.batch_size, delivery_retention=7)
    with RunningRelay(config) as relay:
        drain_burst(relay, db, rows, topic=topic, value_bytes=size.value_bytes, seed=1, ids="v7")


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
    dbs = {ids: svc.database(f"deliveries_{ids}") for ids in ("v7", "v4")}
    run_id = uuid.uuid4().hex[:6]
    topics = {ids: f"bench.deliveries.{ids}.{run_id}" for ids in dbs}
    create_topics(svc, *topics.values())
    rounds: list[dict[str, Any]] = []
    try:
        n = size.relay_rounds if size.name == "smoke" else max(size.relay_rounds, MIN_ROUNDS)
        with load_during() as load:
            for r in range(n):
                rounds.append(_round(svc, dbs, size, topics, r))
        on_topic = size.relay_rows * len(rounds) * 2
        if (wanted := VERIFY_RECORDS.get(size.name, 0)) > on_topic:
            isolated(top_up, svc, dbs["v7"], size, topics["v7"], wanted - on_topic)
        read, per_s, cpu_us, clean = isolated(verify_rate, svc, dbs["v7"], topics["v7"])
    finally:
        for db in dbs.values():
            svc.drop(db)
    return _figure(rounds, load, read, per_s, cpu_us, clean)


def _round(
    svc: Services, dbs: dict[str, Database], size: Size, topics: dict[str, str], n: int
) -> dict[str, Any]:
    """The four drains of round ``n``, in ARMS's order rotated by ``n``."""
    order = ARMS[n % len(ARMS) :] + ARMS[: n % len(ARMS)]
    drains: dict[tuple[str, str], Drain] = {}
    for record, ids in order:
        retention = 7 if record == "on" else 0
        drains[record, ids] = isolated(measure, svc, dbs[ids], size, topics[ids], retention, ids)
    out: dict[str, Any] = {"order": [f"{record}-{ids}" for record, ids in order]}
    for ids in ("v7", "v4"):
        on, off = drains["on", ids], drains["off", ids]
        out[ids] = {
            "on_events_per_s": round(on.events_per_s),
            "off_events_per_s": round(off.events_per_s),
            "ratio": round(on.events_per_s / off.events_per_s, 3),
            "on_cpu_us_per_event": round(on.cpu_us_per_event, 1),
            "off_cpu_us_per_event": round(off.cpu_us_per_event, 1),
            "on_machine_cpu_us_per_event": round(on.machine_cpu_us_per_event, 1),
            "off_machine_cpu_us_per_event": round(off.machine_cpu_us_per_event, 1),
            "on_ours_cpu_us_per_event": round(on.tree_cpu_us_per_event, 1),
            "off_ours_cpu_us_per_event": round(off.tree_cpu_us_per_event, 1),
            "cpu_ratio": round(off.tree_cpu_us_per_event / on.tree_cpu_us_per_event, 3),
        }
    return out


def _figure(
    rounds: list[dict[str, Any]],
    load: dict[str, Any],
    read: int,
    per_s: float,
    cpu_us: float,
    clean: bool,
) -> Result:
    busy = " TOO BUSY: other processes held more than a quarter of the cores." * load["too_busy"]

    def med(ids: str, name: str) -> float:
        return median([r[ids][name] for r in rounds])

    ratio, ratio_v4 = med("v7", "ratio"), med("v4", "ratio")
    cpu, cpu_v4 = med("v7", "cpu_ratio"), med("v4", "cpu_ratio")
    return figure(
        summary=(
            f"relay (1 slot) with the delivery record {med('v7', 'on_events_per_s'):,.0f} "
            f"events/s vs without {med('v7', 'off_events_per_s'):,.0f} (ratio {ratio:.2f}, "
            f"median of {len(rounds)} rounds, publish()'s v7 event ids; with random v4 ids "
            f"{med('v4', 'on_events_per_s'):,.0f} vs {med('v4', 'off_events_per_s'):,.0f}, "
            f"ratio {ratio_v4:.2f}); by the CPU of relay, PostgreSQL and broker per event "
            f"(off / on, strangers left out) {cpu:.2f} with v7 ids, {cpu_v4:.2f} with v4; "
            f"verify read {read:,} records at {per_s:,.0f}/s "
            f"({cpu_us:.1f} µs CPU per record; clean: {clean}){busy}"
        ),
        value=ratio,
        unit="x throughput, record on / off",
        target=f">= {TARGET}",
        met=None if load["too_busy"] else ratio >= TARGET,
        ratio_v4_ids=ratio_v4,
        cpu_ratio=cpu,
        cpu_ratio_v4_ids=cpu_v4,
        ratio_quartiles={
            ids: [round(q, 3) for q in quantiles([r[ids]["ratio"] for r in rounds])]
            for ids in ("v7", "v4")
        },
        cpu_ratio_quartiles={
            ids: [round(q, 3) for q in quantiles([r[ids]["cpu_ratio"] for r in rounds])]
            for ids in ("v7", "v4")
        },
        rounds=rounds,
        verify_records=read,
        verify_records_per_s=round(per_s),
        verify_cpu_us_per_record=round(cpu_us, 1),
        verify_met=per_s >= VERIFY_TARGET,
        verify_clean=clean,
        verify_target=f">= {VERIFY_TARGET:,.0f} records/s",
        load=load,
    )


def quantiles(values: list[float]) -> list[float]:
    """Lower quartile, median, upper quartile (the median alone for fewer than two)."""
    if len(values) < 2:
        return [median(values)] * 3
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return [q1, q2, q3]
