"""Where commit -> handler time goes, stage by stage, beside the broker's floor of the same run.

At a steady 50 and 1,000 events/s (one event per database transaction, NOTIFY on,
the relay's defaults) each event's way is timed at every stage:

- **commit**: the writer's ``COMMIT`` returned (this process);
- **wake-up**: the relay received the NOTIFY for the event's slot (the latest one at
  or before the batch's Kafka transaction began; ``Relay.wake_for``);
- **claimed**: the batch's Kafka transaction began, i.e. the rows are claimed and
  deleted in the slot's (open) database transaction;
- **produced**: the records are handed to librdkafka, ``flush()`` starts;
- **acked**: ``flush()`` returned: every record acknowledged (``acks=all``);
- **committing**: the marker is produced and the delivery record written,
  ``commit_transaction()`` starts;
- **Kafka commit**: ``commit_transaction()`` returned;
- **readable**: a plain ``read_committed`` reader (the consumer's settings, no group)
  received the record;
- **fetched**: the deduplicating consumer's fetch handed the record to its loop
  (``readable -> fetched`` is the difference between two fetching clients, about 0;
  ``fetched -> handler`` is the consumer's own work before the handler);
- **handler**: the deduplicating consumer's handler was entered.

The relay runs in a process of its own (``outbox relay``, default slots, profile
and batch size); the stage times come from a timing subclass of its producer and
a wrapped ``wake_for`` installed in that process only (``--relay-stages``): the
product has no instrumentation and pays nothing for this.

The **floor** runs in the same run, just before each relay phase, on a fresh topic
with the same consumer and reader processes and settings: a raw transactional
producer with the relay's producer settings, fed on the same open-loop schedule,
takes every record waiting (one record per transaction at 50/s) into one
transaction and commits. Its hand-over -> readable -> handler is what the broker
and the consumer cost with no outbox at all; each relay figure is reported as its
difference to that floor.

Every phase records the load: ``os.getloadavg()`` and the share of the cores used by
processes that are not this run's (other users of a shared machine). A phase where
strangers took more than ``BUSY_OTHERS`` of the cores is marked ``too busy``: its
figures then measure waiting for a core, not the code.
"""

from __future__ import annotations

import argparse
import atexit
import bisect
import contextlib
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from confluent_kafka import Producer
from sqlalchemy import Engine, create_engine, text

from benchmarks.consumers import RECEIVED_DDL
from benchmarks.end_to_end_latency import (
    Process,
    arrivals,
    consumer_command,
    raw_steadily,
    wait_for_reader,
    warm_up,
    write_steadily,
)
from benchmarks.harness import (
    BUSY_OTHERS,
    Database,
    Result,
    Services,
    Size,
    create_topics,
    figure,
    load_during,
    percentile,
    raw_settings,
)
from outbox.codec import EVENT_ID_HEADER
from outbox.embedded.client_settings import TANSU_FETCH
from outbox.relay.config import Profile

RATES = (50, 1000)
TARGET_MS = 25.0
"""commit -> handler p99 may exceed the floor's hand-over -> handler p99 by this much."""
STAGES = (
    "commit",
    "wake",
    "claimed",
    "produced",
    "acked",
    "committing",
    "kafka_commit",
    "readable",
    "fetched",
    "handler",
)
WRITER_THREADS = 4

# -- inside the relay process --------------------------------------------------------------


class _Recorder:
    """Batches of one relay process: stage times and the event ids each batch carried."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.batches: list[dict[str, Any]] = []
        self.wakes: list[tuple[float, int | None]] = []

    def dump(self, path: Path) -> None:
        with self.lock:
            path.write_text(json.dumps({"batches": self.batches, "wakes": self.wakes}))


RECORDER = _Recorder()


class StageProducer(Producer):
    """The relay's producer with a clock on each call of a batch (benchmark only)."""

    def begin_transaction(self, *args: Any) -> Any:
        self._batch: dict[str, Any] | None = {"claimed": time.time(), "ids": [], "slot": None}
        return super().begin_transaction(*args)

    def produce(self, *args: Any, **kwargs: Any) -> Any:
        batch = getattr(self, "_batch", None)
        headers = kwargs.get("headers") or ()
        if batch is not None:
            ids = [v.decode() for k, v in headers if k == EVENT_ID_HEADER and v is not None]
            if ids:
                batch["ids"].extend(ids)
            elif "partition" in kwargs:  # the recovery marker: partition = slot
                batch["slot"] = kwargs["partition"]
        return super().produce(*args, **kwargs)

    def flush(self, *args: Any) -> Any:
        batch = getattr(self, "_batch", None)
        if batch is not None and "produced" not in batch:
            batch["produced"] = time.time()
        result = super().flush(*args)
        if batch is not None and "acked" not in batch:
            batch["acked"] = time.time()
        return result

    def commit_transaction(self, *args: Any) -> Any:
        batch = getattr(self, "_batch", None)
        if batch is not None:
            batch["committing"] = time.time()
        result = super().commit_transaction(*args)
        if batch is not None:
            batch["kafka_commit"] = time.time()
            with RECORDER.lock:
                RECORDER.batches.append(batch)
            self._batch = None
        return result


def run_instrumented_relay(out: Path, relay_args: Sequence[str]) -> None:
    """``outbox relay ...`` with stage clocks; the batches go to ``out`` when it exits."""
    from outbox.cli.commands import main
    from outbox.relay import seams
    from outbox.relay.coordinator import Relay
    from outbox.relay.listen import notified_slot

    seams.Producer = StageProducer  # type: ignore[attr-defined]  # kafka_producer looks it up
    original = Relay.wake_for

    def wake_for(self: Relay, payload: str) -> None:
        slot = notified_slot(payload, self.config.slots)
        with RECORDER.lock:
            RECORDER.wakes.append((time.time(), slot))
        original(self, payload)

    Relay.wake_for = wake_for  # type: ignore[method-assign]
    atexit.register(RECORDER.dump, out)
    main(["relay", *relay_args])


# -- the driver ------------------------------------------------------------------------------


def _stats(values: list[float]) -> dict[str, float | int]:
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 50), 1),
        "p99_ms": round(percentile(values, 99), 1),
    }


def event_stages(
    committed: Mapping[str, float],
    batches: Sequence[Mapping[str, Any]],
    wakes: Sequence[tuple[float, int | None]],
    readable: Mapping[str, float],
    handled: Mapping[str, float],
    fetched: Mapping[str, float] | None = None,
) -> dict[str, dict[str, float]]:
    """Per event: the wall-clock time of every stage it reached (pure, for the tables)."""
    by_event: dict[str, dict[str, float]] = {}
    by_slot: dict[int | None, list[float]] = {}
    for at, slot in sorted(wakes):
        by_slot.setdefault(slot, []).append(at)

    def first_wake(slot: int | None, after: float, until: float) -> float | None:
        """The first NOTIFY for ``slot`` from just before ``after`` (the writer notes its
        commit after the server sent the notification) up to ``until``."""
        found = [
            times[i]
            for times in (by_slot.get(slot, []), by_slot.get(None, []))
            if (i := bisect.bisect_left(times, after - 0.005)) < len(times) and times[i] <= until
        ]
        return min(found, default=None)

    for batch in batches:
        for event_id in batch["ids"]:
            if event_id not in committed:
                continue
            times = {"commit": committed[event_id]}
            wake = first_wake(batch["slot"], committed[event_id], batch["claimed"])
            if wake is not None:
                times["wake"] = wake
            for stage in ("claimed", "produced", "acked", "committing", "kafka_commit"):
                if stage in batch:
                    times[stage] = batch[stage]
            by_event[event_id] = times
    for event_id, at in committed.items():
        times = by_event.setdefault(event_id, {"commit": at})
        if event_id in readable:
            times["readable"] = readable[event_id]
        if fetched and event_id in fetched:
            times["fetched"] = fetched[event_id]
        if event_id in handled:
            times["handler"] = handled[event_id]
    return by_event


def wake_waits(
    by_event: Mapping[str, Mapping[str, float]], batches: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """wake -> claimed split by what the slot was doing when the NOTIFY came (pure).

    ``busy``: the slot's previous batch had not committed its Kafka transaction yet, so the
    event waited for the batch cycle; ``free``: it had, so the wait is the wake-up, the
    previous batch's database commit and the claim.
    """
    waits: dict[str, list[float]] = {"busy": [], "free": []}
    by_slot: dict[Any, list[Mapping[str, Any]]] = {}
    for batch in batches:
        if "kafka_commit" in batch:
            by_slot.setdefault(batch["slot"], []).append(batch)
    for slot_batches in by_slot.values():
        slot_batches.sort(key=lambda b: float(b["claimed"]))
        for previous, batch in zip([None, *slot_batches], slot_batches, strict=False):
            for event_id in batch["ids"]:
                times = by_event.get(event_id, {})
                if "wake" not in times or "claimed" not in times:
                    continue
                busy = previous is not None and times["wake"] < previous["kafka_commit"]
                waits["busy" if busy else "free"].append((times["claimed"] - times["wake"]) * 1000)
    total = sum(len(v) for v in waits.values())
    return {
        name: {**_stats(values), "share": round(len(values) / total, 3) if total else None}
        for name, values in waits.items()
        if values
    }


def breakdown(by_event: Mapping[str, Mapping[str, float]]) -> dict[str, Any]:
    """Each stage's share (from the stage before it that the event reached) and commit -> it."""
    steps: dict[str, list[float]] = {}
    cumulative: dict[str, list[float]] = {}
    for times in by_event.values():
        previous = "commit"
        for stage in STAGES[1:]:
            if stage not in times:
                continue
            steps.setdefault(f"{previous} -> {stage}", []).append(
                (times[stage] - times[previous]) * 1000
            )
            cumulative.setdefault(stage, []).append((times[stage] - times["commit"]) * 1000)
            previous = stage
    return {
        "steps": {name: _stats(v) for name, v in steps.items()},
        "from_commit": {name: _stats(v) for name, v in cumulative.items()},
    }


def relay_process(db: Database, svc: Services, out: Path) -> Process:
    args = [sys.executable, "-m", "benchmarks.latency_stages", "--relay-stages", str(out), "--"]
    args += ["--db", db.url, "-b", svc.bootstrap_servers, "--log-level", "WARNING"]
    return Process(args)


def consumer_settings(svc: Services) -> dict[str, str]:
    """What a user of that broker runs: the consumer's defaults (Tansu's fetch fix on Tansu)."""
    return dict(TANSU_FETCH) if "Tansu" in svc.broker else {}


@contextlib.contextmanager
def consumer_processes(
    db: Database, svc: Services, topic: str, settings: Mapping[str, str]
) -> Iterator[Process]:
    """The consumer under test and the arrival reader, with the same fetch settings."""
    extra = [arg for key, value in settings.items() for arg in ("-X", f"{key}={value}")]
    with (
        Process(
            consumer_command(db, svc, topic, "--role", "arrivals", "--reader-uses-settings", *extra)
        ),
        Process(consumer_command(db, svc, topic, *extra)) as consumer,
    ):
        yield consumer


def _clear(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM bench_received"))


def floor_phase(
    db: Database, svc: Services, engine: Engine, rate: int, seconds: float
) -> dict[str, Any]:
    """Hand-over -> readable -> handler for one raw transactional producer (no database)."""
    settings = raw_settings(db, svc, profile=Profile.BALANCED)  # the relay's default preset
    topic = f"bench.stages.floor.{uuid.uuid4().hex[:6]}"
    create_topics(svc, topic, f"{topic}.DLT")  # the reader's probes are not JSON: dead letters
    _clear(engine)
    with consumer_processes(db, svc, topic, consumer_settings(svc)):
        wait_for_reader(engine, svc, topic)
        _wait_group(engine, svc, topic)
        _clear(engine)
        with load_during() as load:
            handed = raw_steadily(settings, topic, rate=rate, seconds=seconds, producers=1)
        readable = arrivals(engine, set(handed), "kafka", timeout=60)
        handled = arrivals(engine, set(handed), "handler", timeout=60)
        fetched = arrivals(engine, set(handed), "fetched", timeout=5)
    by_event = {
        i: {"commit": at}
        | ({"readable": readable[i]} if i in readable else {})
        | ({"fetched": fetched[i]} if i in fetched else {})
        | ({"handler": handled[i]} if i in handled else {})
        for i, at in handed.items()
    }
    return {
        "rate": rate,
        "events": len(handed),
        "lost": len(handed) - min(len(readable), len(handled)),
        "load": load,
        **breakdown(by_event),
    }


def _wait_group(engine: Engine, svc: Services, topic: str, timeout: float = 120.0) -> None:
    """Produce probes until the consumer under test handled one: its group has joined."""
    producer = Producer({"bootstrap.servers": svc.bootstrap_servers})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = str(uuid.uuid4())
        producer.produce(topic, b"{}", headers=[(EVENT_ID_HEADER, probe)])
        producer.flush(30)
        if arrivals(engine, {probe}, "handler", timeout=5):
            return
    raise TimeoutError(f"the consumer under test joined no group on {topic} in {timeout:.0f} s")


def relay_phase(
    db: Database, svc: Services, engine: Engine, rate: int, seconds: float, workdir: Path
) -> dict[str, Any]:
    topic = f"bench.stages.relay.{uuid.uuid4().hex[:6]}"
    create_topics(svc, topic)
    out = workdir / f"stages-{uuid.uuid4().hex[:6]}.json"
    _clear(engine)
    with consumer_processes(db, svc, topic, consumer_settings(svc)):
        with relay_process(db, svc, out):
            warm_up(engine, topic)
            _clear(engine)
            with load_during() as load:
                committed = write_steadily(engine, topic, rate=rate, seconds=seconds, notify=True)
            readable = arrivals(engine, set(committed), "kafka", timeout=60)
            handled = arrivals(engine, set(committed), "handler", timeout=60)
            fetched = arrivals(engine, set(committed), "fetched", timeout=5)
        recorded = json.loads(out.read_text()) if out.exists() else {"batches": [], "wakes": []}
    out.unlink(missing_ok=True)
    by_event = event_stages(
        committed, recorded["batches"], recorded["wakes"], readable, handled, fetched
    )
    batches = [b for b in recorded["batches"] if set(b["ids"]) & committed.keys()]
    sizes = sorted(len(b["ids"]) for b in batches)
    return {
        "rate": rate,
        "events": len(committed),
        "lost": len(committed) - min(len(readable), len(handled)),
        "batches": len(batches),
        "batch_size_p50": percentile(sizes, 50) if sizes else None,
        "wake_waits": wake_waits(by_event, batches),
        "load": load,
        **breakdown(by_event),
    }


def _p(phase: Mapping[str, Any], stage: str, q: str) -> float:
    return float(phase["from_commit"].get(stage, {}).get(q, float("nan")))


def run(svc: Services, size: Size) -> Result:
    db = svc.database("stages")
    engine = create_engine(db.url, pool_size=WRITER_THREADS + 2)
    with engine.begin() as conn:
        conn.execute(text(RECEIVED_DDL))
    seconds = max(2.0, size.latency_seconds)
    workdir = Path(os.environ.get("TMPDIR", "/tmp"))
    phases: dict[str, dict[str, Any]] = {}
    try:
        for rate in RATES if size.name != "smoke" else (50,):
            phases[f"floor / {rate}/s"] = floor_phase(db, svc, engine, rate, seconds)
            phases[f"relay / {rate}/s"] = relay_phase(db, svc, engine, rate, seconds, workdir)
    finally:
        engine.dispose()
        svc.drop(db)
    return summary(phases)


_WAIT_NAMES = {"busy": "in the slot's previous Kafka transaction", "free": "with the slot free"}


def _waits_text(waits: Mapping[str, Mapping[str, Any]]) -> str:
    if not waits:
        return ""
    parts = [
        f"{stats['share']:.0%} {_WAIT_NAMES[name]} p50/p99 {stats['p50_ms']}/{stats['p99_ms']}"
        for name, stats in waits.items()
    ]
    return "; wake -> claimed: " + ", ".join(parts) + " ms"


def summary(phases: Mapping[str, Mapping[str, Any]]) -> Result:
    """The figure: each rate's relay beside its floor, the largest stages, the load verdict."""
    lines, met, worst, void = [], True, None, False
    for rate in RATES:
        floor, relay = phases.get(f"floor / {rate}/s"), phases.get(f"relay / {rate}/s")
        if floor is None or relay is None:
            continue
        over = _p(relay, "handler", "p99_ms") - _p(floor, "handler", "p99_ms")
        over50 = _p(relay, "handler", "p50_ms") - _p(floor, "handler", "p50_ms")
        worst = over if worst is None else max(worst, over)
        met = met and over <= TARGET_MS
        busy = [n for n, p in (("floor", floor), ("relay", relay)) if p["load"]["too_busy"]]
        void = void or bool(busy)
        lines.append(
            f"{rate}/s: commit->handler p50/p99 {_p(relay, 'handler', 'p50_ms')}/"
            f"{_p(relay, 'handler', 'p99_ms')} ms vs floor {_p(floor, 'handler', 'p50_ms')}/"
            f"{_p(floor, 'handler', 'p99_ms')} ms ({over50:+.1f}/{over:+.1f} ms); "
            f"commit->readable p50/p99 {_p(relay, 'readable', 'p50_ms')}/"
            f"{_p(relay, 'readable', 'p99_ms')} ms vs floor {_p(floor, 'readable', 'p50_ms')}/"
            f"{_p(floor, 'readable', 'p99_ms')} ms; commit->Kafka commit p50 "
            f"{_p(relay, 'kafka_commit', 'p50_ms')} ms; the largest relay stages at p50: "
            + ", ".join(
                f"{name} {stats['p50_ms']}"
                for name, stats in sorted(
                    relay["steps"].items(), key=lambda kv: -float(kv[1]["p50_ms"])
                )[:3]
            )
            + " ms"
            + _waits_text(relay.get("wake_waits", {}))
            + (
                f"; TOO BUSY ({', '.join(busy)}: strangers > {BUSY_OTHERS:.0%} of cores)"
                if busy
                else ""
            )
        )
    return figure(
        summary="; ".join(lines),
        value=None if worst is None else round(worst, 1),
        unit="ms p99 commit->handler over the floor's (worst rate)",
        target=f"<= {TARGET_MS:.0f} ms over the floor at p99, 50/s and 1000/s",
        # Not judged when strangers held the cores: the figures then measure waiting for one.
        met=met if worst is not None and not void else None,
        phases=phases,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency_stages")
    parser.add_argument("--relay-stages", type=Path, required=True, help="where to write stages")
    parser.add_argument("relay_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    relay_args = [a for a in args.relay_args if a != "--"]
    run_instrumented_relay(args.relay_stages, relay_args)


if __name__ == "__main__":
    main()
