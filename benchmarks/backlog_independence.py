"""Backlog independence: claim + publish + delete time per batch with a small vs a big backlog.

A relay (1 slot, then the default 4; a fresh process each time) is running and
idle when the backlog commits in one transaction; the time between a slot's
consecutive batch completions is one batch's claim + produce + Kafka commit +
delete (a slot's first batch, which includes the wake-up, only starts its
clock). The claim
must stay an index range scan whatever the backlog, so the claim's plan
(``EXPLAIN ANALYZE``) for one slot of 1 and of 4 is recorded next to it.
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any

from benchmarks.harness import (
    Database,
    Result,
    RunningRelay,
    Services,
    Size,
    create_topics,
    figure,
    fill_outbox,
    isolated,
    median,
    percentile,
    quiet_logging,
    relay_config,
    reset_outbox,
)
from outbox import sql
from outbox.partitioner import shards_of_slot
from outbox.relay.config import RelayConfig

TARGET = 1.2


def per_batch_ms(
    svc: Services, db: Database, size: Size, backlog: int, topic: str, slots: int
) -> list[float]:
    """Each slot's batch durations (ms per ``batch_size`` rows) after the backlog commits.

    A slot's first batch only starts its clock; the relay's own counter notes
    which slot thread finished each batch, so slots running side by side do not
    mix their batches up.
    """
    quiet_logging()
    config = relay_config(db, svc, slots=slots, batch_size=size.batch_size)
    wanted = min(backlog, size.batch_size * slots * (size.backlog_batches + 1))
    with RunningRelay(config) as relay:
        relay.stats.expect(wanted)
        fill_outbox(db, backlog, topic=topic, value_bytes=size.value_bytes)
        relay.stats.reached.wait(600)
        with relay.stats.lock:
            ends = {slot: list(times) for slot, times in relay.stats.by_slot.items()}
    # Per batch_size rows: a slot's last batch of a small backlog is often a partial one.
    return [
        (b - a) * 1000 * size.batch_size / rows
        for batches in ends.values()
        for (a, _), (b, rows) in itertools.pairwise(batches[: size.backlog_batches + 1])
        if rows
    ]


def claim_plans(db: Database, size: Size) -> dict[str, Any]:
    """How the claim runs on the backlog as it is now (after the measured batches)."""
    plans: dict[str, Any] = {}
    with db.connect() as conn:
        for slots in (1, 4):
            claim = "EXPLAIN (ANALYZE, FORMAT JSON) " + sql.claim_batch(shards_of_slot(0, slots))
            defaults = RelayConfig(dsn=db.url, bootstrap_servers="unused:9092")
            params = sql.claim_params(
                limit=size.batch_size,
                held=[],
                max_value_bytes=defaults.producer_plan().message_max_bytes,
                max_bytes=defaults.batch_bytes,
            )
            rows = conn.execute(claim, params)
            doc = rows.fetchone()[0][0]  # type: ignore[index]
            node = doc["Plan"]
            while node.get("Plans") and node["Node Type"] == "Limit":
                node = node["Plans"][0]
            plans[f"slot 0 of {slots}"] = {
                "node": node["Node Type"],
                "index": node.get("Index Name"),
                "execution_ms": round(doc["Execution Time"], 2),
                "rows_removed_by_filter": node.get("Rows Removed by Filter", 0),
            }
    return plans


def run(svc: Services, size: Size) -> Result:
    slot_counts = size.backlog_slots
    db = svc.database("backlog")
    topic = f"bench.backlog.{uuid.uuid4().hex[:6]}"
    create_topics(svc, topic)
    results: dict[str, dict[str, Any]] = {}
    try:
        for slots in slot_counts:
            results[str(slots)] = {}
            for backlog in (size.backlog_small, size.backlog_big):
                reset_outbox(db)
                batches = isolated(per_batch_ms, svc, db, size, backlog, topic, slots)
                results[str(slots)][str(backlog)] = {
                    "pending_rows": backlog,
                    "batch_ms_median": round(median(batches), 2),
                    "batch_ms_p90": round(percentile(batches, 90), 2),
                    "batch_ms": [round(b, 2) for b in batches],
                    "claim_plan": claim_plans(db, size),
                }
            reset_outbox(db)
    finally:
        svc.drop(db)
    ratios = {
        slots: results[str(slots)][str(size.backlog_big)]["batch_ms_median"]
        / results[str(slots)][str(size.backlog_small)]["batch_ms_median"]
        for slots in slot_counts
    }
    one = results["1"]
    small, big = one[str(size.backlog_small)], one[str(size.backlog_big)]
    four = results[str(slot_counts[-1])]
    return figure(
        summary=(
            f"1 slot: {big['batch_ms_median']} ms per batch of {size.batch_size} with "
            f"{size.backlog_big:,} pending rows vs {small['batch_ms_median']} ms with "
            f"{size.backlog_small:,} ({ratios[1]:.2f}x); {slot_counts[-1]} slots: "
            f"{four[str(size.backlog_big)]['batch_ms_median']} vs "
            f"{four[str(size.backlog_small)]['batch_ms_median']} ms per slot and batch "
            f"({ratios[slot_counts[-1]]:.2f}x)"
        ),
        value=ratios[1],
        unit=f"time per batch, {size.backlog_big:,} / {size.backlog_small:,} pending (1 slot)",
        target=f"<= {TARGET} (1 and {slot_counts[-1]} slots)",
        met=all(r <= TARGET for r in ratios.values()),
        ratio_by_slots={str(n): round(r, 3) for n, r in ratios.items()},
        batch_size=size.batch_size,
        value_bytes=size.value_bytes,
        backlogs=results,
    )
