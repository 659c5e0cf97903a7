"""The consumer the chaos run starts as ``outbox consume tests.chaos.projector:ChaosProjector``.

Its effect is one row per applied event in ``chaos_effects``, a table with no
unique constraint on purpose: a second application of an event shows up as a
second row instead of failing, and the bigserial ``id`` records the order in
which effects were applied, so per-key order can be checked afterwards.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from sqlalchemy import text
from sqlalchemy.orm import Session

from consumer import Event, IdempotentConsumer, RetryPolicy

TABLES = """
CREATE TABLE IF NOT EXISTS chaos_orders (
    event_id uuid PRIMARY KEY,
    key text NOT NULL,
    seq int NOT NULL,
    written_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE TABLE IF NOT EXISTS chaos_effects (
    id bigserial PRIMARY KEY,
    event_id uuid NOT NULL,
    key text NOT NULL,
    seq int NOT NULL,
    pid int NOT NULL,
    kafka_partition int NOT NULL,
    kafka_offset bigint NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS chaos_effects_event_id ON chaos_effects (event_id);
"""
"""The business table of the writers and the effects table of the projector."""

_INSERT_EFFECT = text(
    "INSERT INTO chaos_effects (event_id, key, seq, pid, kafka_partition, kafka_offset) "
    "VALUES (:event_id, :key, :seq, :pid, :partition, :offset)"
)

OFFSET_COMMIT_DELAY_ENV = "CHAOS_OFFSET_COMMIT_DELAY"
"""Seconds to wait between the DB commit of a batch and its offset commit (the harness sets it)."""

WINDOW_DIR_ENV = "CHAOS_WINDOW_DIR"
"""Where the projector shows that it is inside that window: the file ``<pid>`` exists while it
waits, so the harness can aim a kill at the moment only the dedup table can absorb."""

FAULTS_OVER = "faults-over"
"""A file in that directory the harness creates when the faults are over (schedule and
extension): no kill can come any more, so the window needs no widening. Without it the catch-up
after the faults crawled: a consumer that took over a killed one's partitions handles their
records one at a time, and each waited the delay (3 records/s, 20 to 30 s of a CI-size run)."""

GROUP_SETTINGS: dict[str, str] = {
    "session.timeout.ms": "6000",
    "heartbeat.interval.ms": "1000",
    "reconnect.backoff.max.ms": "1000",
}
"""Group joins take ~3 s on Tansu with these (~23 s with the defaults); reconnect fast
after a cut broker link."""


class ChaosProjector(IdempotentConsumer):
    """Applies each order event by writing one effect row (topic and group come from the CLI)."""

    topics: ClassVar[list[str]] = ["chaos.orders"]
    group_id = "chaos"
    batch_size = 100
    retry = RetryPolicy(attempts=5, initial_backoff=0.1, max_backoff=1.0)
    consumer_settings = GROUP_SETTINGS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Each skipped duplicate is logged at DEBUG: the chaos run counts them, to show the
        # dedup table really absorbed redeliveries (the rest of the process stays at INFO).
        logging.getLogger("outbox.consumer").setLevel(logging.DEBUG)
        self.offset_commit_delay = float(os.environ.get(OFFSET_COMMIT_DELAY_ENV, "0"))
        window_dir = os.environ.get(WINDOW_DIR_ENV)
        self.window_flag = Path(window_dir) / str(os.getpid()) if window_dir else None
        self.faults_over = Path(window_dir) / FAULTS_OVER if window_dir else None

    def handle(self, session: Session, event: Event) -> None:
        order = event.value
        session.execute(
            _INSERT_EFFECT,
            {
                "event_id": event.id,
                "key": order["key"],
                "seq": order["seq"],
                "pid": os.getpid(),
                "partition": event.partition,
                "offset": event.offset,
            },
        )

    def on_committed(self, events: Sequence[Event]) -> None:
        """Widen the window between the DB commit and the offset commit.

        A consumer SIGKILLed in that window gets its batch delivered again after
        the restart, and only the dedup table stands between it and a second
        effect. Without the delay that window is a few milliseconds and the
        chaos run would hardly ever exercise the dedup path.
        """
        if self.faults_over is not None and self.faults_over.exists():
            return
        if self.offset_commit_delay > 0:
            if self.window_flag is not None:
                self.window_flag.touch()
            threading.Event().wait(self.offset_commit_delay)
            if self.window_flag is not None:
                self.window_flag.unlink(missing_ok=True)
