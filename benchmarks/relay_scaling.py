"""Relay scaling: one relay process draining the same backlog with 1, 2 and 4 slots.

Each slot is a thread with its own connection and transactional producer, so
more slots overlap one slot's database round trips with another's Kafka
commit. The reference for every slot count is the raw transactional producer
of ``relay_throughput``, measured again in each round on the same records.
"""

from __future__ import annotations

import itertools
import uuid

from benchmarks.harness import (
    Result,
    Services,
    Size,
    create_topics,
    figure,
    median,
    raw_settings,
)
from benchmarks.relay_throughput import raw_producer_run, raw_records, relay_rate


def run(svc: Services, size: Size) -> Result:
    slot_counts = size.scaling_slots
    db = svc.database("scaling")
    topic = f"bench.scaling.{uuid.uuid4().hex[:6]}"
    create_topics(svc, topic, f"{topic}.raw")
    rates: dict[int, list[float]] = {n: [] for n in slot_counts}
    startup: dict[int, list[float]] = {n: [] for n in slot_counts}
    machine_cpu: dict[int, list[float]] = {n: [] for n in slot_counts}
    raw_rates: list[float] = []
    try:
        records = raw_records(db, size, topic=topic)
        settings = raw_settings(db, svc)
        for round_no in range(size.relay_rounds):
            raw_run = raw_producer_run(
                records, settings, topic=f"{topic}.raw", batch_size=size.batch_size
            )
            raw_rates.append(raw_run.events_per_s)
            # Alternate the order between rounds so drift does not favour one slot count.
            order = slot_counts if round_no % 2 == 0 else tuple(reversed(slot_counts))
            for slots in order:
                measured = relay_rate(svc, db, size, slots=slots, topic=topic)
                rates[slots].append(measured.events_per_s)
                startup[slots].append(measured.startup_s)
                machine_cpu[slots].append(measured.machine_cpu_us_per_event)
    finally:
        svc.drop(db)
    raw = median(raw_rates)
    per_slots = {
        str(n): {
            "events_per_s": round(median(rates[n])),
            "vs_raw": round(median(rates[n]) / raw, 3),
            "vs_1_slot": round(median(rates[n]) / median(rates[1]), 3),
            "startup_s": round(median(startup[n]), 3),
            # relay + PostgreSQL + broker: more slots on few cores cost more CPU per event
            "machine_cpu_us_per_event": round(median(machine_cpu[n]), 1),
        }
        for n in slot_counts
    }
    no_drop = all(
        median(rates[b]) >= 0.95 * median(rates[a]) for a, b in itertools.pairwise(slot_counts)
    )
    best = max(slot_counts, key=lambda n: median(rates[n]))
    return figure(
        summary=", ".join(
            f"{n} slot{'s' if n > 1 else ''}: {per_slots[str(n)]['events_per_s']:,} events/s "
            f"({per_slots[str(n)]['vs_raw']}x raw)"
            for n in slot_counts
        )
        + f"; raw producer {raw:,.0f} events/s",
        value=per_slots[str(slot_counts[-1])]["vs_1_slot"],
        unit=f"{slot_counts[-1]} slots / 1 slot",
        target="reported, no drop from 1 to 2 to 4 slots (5 % tolerance)",
        met=no_drop,
        slots=per_slots,
        best_slots=best,
        raw_events_per_s=round(raw),
        rows=size.relay_rows,
        batch_size=size.batch_size,
        cpu_cores=_cores(),
    )


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))
