"""Relay throughput: events/s drained from a pre-filled outbox vs a raw transactional producer.

The reference is the best raw producer of the same run: the same records
(keys, values, headers; only the event ids differ) and the same producer
settings (the ``throughput`` preset: idempotent, ``acks=all``), with no database
in the loop, either transactional with the relay's records per transaction or
idempotent without transactions and one ``flush()`` at the end; the faster one
counts. Each runs in a fresh process, as the relay does.
The raw clock runs from the first record to the last commit; the relay clock
from the commit of the backlog (the relay is already running and idle) to the
last row published and deleted. Relay start-up is reported on its own.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from confluent_kafka import Producer

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
    fill_outbox,
    isolated,
    load_during,
    machine_cpu_seconds,
    median,
    quiet_logging,
    raw_settings,
    relay_config,
    reset_outbox,
)

TARGET = 0.7

RawRecord = tuple[bytes | None, bytes | None, list[tuple[str, str | bytes | None]], int]


def load_records(db: Database) -> list[RawRecord]:
    """The pending rows as the relay would send them (key, value, headers, timestamp)."""
    with db.connect() as conn:
        rows = conn.execute(
            "SELECT key, value, header_names, header_values, created_at "
            "FROM outbox_events ORDER BY id"
        ).fetchall()
    return [
        (k, v, list(zip(names, values, strict=True)), int(ts.timestamp() * 1000))
        for k, v, names, values, ts in rows
    ]


def raw_producer_run(
    records: list[RawRecord], settings: dict[str, Any], *, topic: str, batch_size: int
) -> Drain:
    """One transactional producer, ``batch_size`` records per transaction, measured like a drain.

    CPU is this process's (its thread and librdkafka's) and the whole machine's
    (the broker's included); there is no start-up to report.
    """
    producer = Producer({**settings, "transactional.id": f"bench-raw-{uuid.uuid4().hex[:8]}"})
    producer.init_transactions(60)
    start, cpu, machine = time.perf_counter(), time.process_time(), machine_cpu_seconds()
    for lo in range(0, len(records), batch_size):
        producer.begin_transaction()
        for key, value, headers, ts in records[lo : lo + batch_size]:
            while True:
                try:
                    producer.produce(topic, value=value, key=key, headers=headers, timestamp=ts)
                    break
                except BufferError:
                    producer.poll(0.05)
        producer.commit_transaction(60)
    seconds = time.perf_counter() - start
    cpu, machine = time.process_time() - cpu, machine_cpu_seconds() - machine
    producer.flush(10)
    n = len(records)
    return Drain(n / seconds, cpu / n * 1e6, 0.0, machine / n * 1e6)


def raw_idempotent_run(records: list[RawRecord], settings: dict[str, Any], *, topic: str) -> Drain:
    """The best a producer does with these records: idempotent, ``acks=all``, no transactions,
    one ``flush()`` at the end (the same settings otherwise), measured like a drain."""
    producer = Producer(settings)
    producer.list_topics(topic, timeout=30)  # connected, metadata known: start-up not timed
    start, cpu, machine = time.perf_counter(), time.process_time(), machine_cpu_seconds()
    for key, value, headers, ts in records:
        while True:
            try:
                producer.produce(topic, value=value, key=key, headers=headers, timestamp=ts)
                break
            except BufferError:
                producer.poll(0.05)
    unsent = producer.flush(120)
    seconds = time.perf_counter() - start
    cpu, machine = time.process_time() - cpu, machine_cpu_seconds() - machine
    if unsent:
        raise RuntimeError(f"raw idempotent producer: {unsent} records not acknowledged")
    n = len(records)
    return Drain(n / seconds, cpu / n * 1e6, 0.0, machine / n * 1e6)


def raw_records(db: Database, size: Size, *, topic: str) -> list[RawRecord]:
    """The records a fill with seed 0 commits: fill, read back, empty the table again."""
    fill_outbox(db, size.relay_rows, topic=topic, value_bytes=size.value_bytes)
    records = load_records(db)
    reset_outbox(db)
    return records


def relay_rate(svc: Services, db: Database, size: Size, *, slots: int, topic: str) -> Drain:
    """``measure_relay`` in a fresh process of its own, like a real relay."""
    return isolated(measure_relay, svc, db, size, slots, topic)


def measure_relay(svc: Services, db: Database, size: Size, slots: int, topic: str) -> Drain:
    """Start a relay, wait until it is ready, commit the backlog, time the drain."""
    quiet_logging()
    config = relay_config(db, svc, slots=slots, batch_size=size.batch_size)
    with RunningRelay(config) as relay:
        drained = drain_burst(relay, db, size.relay_rows, topic=topic, value_bytes=size.value_bytes)
    reset_outbox(db)  # no dead rows left for the next measurement
    return drained


def _median_of(rounds: list[dict[str, Any]], name: str) -> float:
    return round(median([r[name] for r in rounds]), 3)


def measure_rounds(
    svc: Services,
    db: Database,
    size: Size,
    topic: str,
    records: list[RawRecord],
    settings: dict[str, Any],
    rounds: list[dict[str, Any]],
) -> None:
    """Interleaved rounds: both raw producers, then the relay, on the same records."""
    for _ in range(size.relay_rounds):
        raw_txn = isolated(
            raw_producer_run,
            records,
            settings,
            topic=f"{topic}.raw",
            batch_size=size.batch_size,
        )
        raw_idem = isolated(raw_idempotent_run, records, settings, topic=f"{topic}.raw")
        raw = max(raw_txn, raw_idem, key=lambda d: d.events_per_s)
        relay = relay_rate(svc, db, size, slots=1, topic=topic)
        rounds.append(
            {
                "relay_events_per_s": round(relay.events_per_s),
                "raw_events_per_s": round(raw.events_per_s),
                "raw_transactional_events_per_s": round(raw_txn.events_per_s),
                "raw_idempotent_events_per_s": round(raw_idem.events_per_s),
                "ratio": round(relay.events_per_s / raw.events_per_s, 3),
                "relay_cpu_us_per_event": round(relay.cpu_us_per_event, 1),
                "raw_cpu_us_per_event": round(raw.cpu_us_per_event, 1),
                "relay_machine_cpu_us_per_event": round(relay.machine_cpu_us_per_event, 1),
                "raw_machine_cpu_us_per_event": round(raw.machine_cpu_us_per_event, 1),
                # What the ratio could be if the path were CPU-bound on this machine alone.
                "cpu_bound_ratio": round(
                    raw.machine_cpu_us_per_event / relay.machine_cpu_us_per_event, 3
                ),
                "relay_startup_s": round(relay.startup_s, 3),
            }
        )


def run(svc: Services, size: Size) -> Result:
    db = svc.database("throughput")
    topic = f"bench.throughput.{uuid.uuid4().hex[:6]}"
    create_topics(svc, topic, f"{topic}.raw")
    rounds: list[dict[str, Any]] = []
    try:
        records = raw_records(db, size, topic=topic)
        settings = raw_settings(db, svc)
        with load_during() as load:
            measure_rounds(svc, db, size, topic, records, settings, rounds)
    finally:
        svc.drop(db)
    busy = " TOO BUSY: other processes held more than a quarter of the cores." * load["too_busy"]
    ratio = median([r["ratio"] for r in rounds])
    return figure(
        summary=(
            f"relay (1 slot) {median([r['relay_events_per_s'] for r in rounds]):,.0f} events/s "
            f"vs the best raw producer {median([r['raw_events_per_s'] for r in rounds]):,.0f}"
            f" events/s (transactional, {size.batch_size} per transaction: "
            f"{median([r['raw_transactional_events_per_s'] for r in rounds]):,.0f}; idempotent, "
            f"one flush: {median([r['raw_idempotent_events_per_s'] for r in rounds]):,.0f}; "
            f"{size.relay_rows:,} rows x {size.value_bytes} B, acks=all); relay start-up "
            f"{median([r['relay_startup_s'] for r in rounds]):.2f} s, not timed; relay "
            f"process CPU {_median_of(rounds, 'relay_cpu_us_per_event')} us per event; "
            f"CPU of the whole machine per event "
            f"{_median_of(rounds, 'relay_machine_cpu_us_per_event')} us (relay path: relay, "
            f"PostgreSQL, broker) vs {_median_of(rounds, 'raw_machine_cpu_us_per_event')} us "
            f"(raw): {_median_of(rounds, 'cpu_bound_ratio')} if CPU-bound here.{busy}"
        ),
        value=ratio,
        unit="relay / raw",
        target=f">= {TARGET}",
        met=None if load["too_busy"] else ratio >= TARGET,
        rows=size.relay_rows,
        value_bytes=size.value_bytes,
        batch_size=size.batch_size,
        profile="throughput",
        rounds=rounds,
        load=load,
    )
