"""End-to-end latency: commit -> handler entry at a steady rate, NOTIFY wake-up vs polling.

Writers in this process commit one event per transaction on an open-loop
schedule (a slow commit does not slow the schedule down) and note the wall
clock when each commit returned. A relay (``outbox relay``, its own process,
default slots and profile) publishes them; a deduplicating consumer in a third
process notes the wall clock at handler entry, and a plain reader in a fourth
notes when each record became readable in Kafka, which separates the
relay's share from the consumer's batching.

The steady rate is the size's (1000/s by default) and, with the second consumer
setting, also 100/s: under load a relay never sleeps (each batch is followed by
another claim), so NOTIFY vs polling only shows when it has idle moments.

Relay modes: ``notify`` (``publish()`` notifies, the relay LISTENs),
``notify, 1 slot`` (the same with ``--slots 1``: one Kafka transaction at a
time instead of four smaller ones) and ``polling`` (``notify=False``,
``--no-listen``: the adaptive poll, 10 ms after rows were found, growing to
the default 1 s interval while claims find nothing). Each relay mode and consumer
setting gets a fresh topic, relay and consumer process: Tansu's memory storage
slows down as a partition fills, which would otherwise charge each phase for
the ones before it. The low rate runs before the high one on the same topic.

Consumer settings: its defaults (batches of up to 100: it blocks for the first
record only, then takes what is already fetched), and the same with
``fetch.wait.max.ms=5``. Tansu answers a fetch only when ``fetch.wait.max.ms``
(500 ms by default) has passed, not as soon as a record arrives as Apache Kafka
does (``fetch.min.bytes=1``), so on Tansu the defaults measure the broker's
long poll; the second setting approximates Kafka's behaviour.

The broker's floor runs beside them: the relay's producer settings and loop
(take every record waiting, one Kafka transaction, commit) with no database,
fed at the same rate, with 1 and with 4 producers (``--slots 1`` and the
default 4 slots). Hand-over -> readable is what the broker costs that loop
with no database, writers or consumer competing for the cores: a reference
for the relay's commit -> Kafka, not a bound (slower cycles make larger,
fewer transactions, which Tansu handles better).
"""

from __future__ import annotations

import contextlib
import queue
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

from confluent_kafka import Producer
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from benchmarks.consumers import RECEIVED_DDL
from benchmarks.harness import (
    Database,
    Result,
    Services,
    Size,
    create_topics,
    figure,
    isolated,
    machine_busy,
    outbox_command,
    percentile,
    raw_settings,
)
from outbox import publish
from outbox.codec import EVENT_ID_HEADER
from outbox.partitioner import SHARD_COUNT, shard_for
from outbox.relay.config import Profile

TARGET_P99_MS = 50.0
WRITER_THREADS = 4
NOTIFY, ONE_SLOT, POLLING = "notify", "notify, 1 slot", "polling"
RELAY_MODES = (NOTIFY, ONE_SLOT, POLLING)
DEFAULTS = "consumer defaults"
KAFKA_LIKE = "fetch.wait.max.ms=5"
CONSUMER_SETTINGS: dict[str, tuple[float, dict[str, str]]] = {
    DEFAULTS: (1.0, {}),
    KAFKA_LIKE: (1.0, {"fetch.wait.max.ms": "5"}),
}
LOW_RATE = 100
FLOOR = "broker floor"


def phase(mode: str, consumer: str, rate: int) -> str:
    return f"{mode} / {consumer} / {rate}/s"


def write_steadily(
    engine: Engine, topic: str, *, rate: float, seconds: float, notify: bool
) -> dict[str, float]:
    """Commit ``rate`` events/s for ``seconds``; returns event id -> commit time (wall clock)."""
    committed: dict[str, float] = {}
    lock = threading.Lock()
    total = int(rate * seconds)
    start = time.time() + 0.1

    def writer(index: int) -> None:
        with Session(engine) as session:
            for seq in range(index, total, WRITER_THREADS):
                due = start + seq / rate
                if (wait := due - time.time()) > 0:
                    time.sleep(wait)
                with session.begin():
                    event_id = publish(
                        session,
                        topic=topic,
                        key=f"key-{seq % 64}",
                        value={"seq": seq, "note": "latency probe"},
                        notify=notify,
                    )
                at = time.time()
                with lock:
                    committed[str(event_id)] = at

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITER_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return committed


def raw_steadily(
    settings: dict[str, Any],
    topic: str,
    *,
    rate: float,
    seconds: float,
    producers: int,
    partitions: int = 4,
) -> dict[str, float]:
    """The broker's floor: the relay's Kafka loop without PostgreSQL; event id -> hand-over time.

    Records are handed to ``producers`` transactional producers (threads, as
    slots are) on the open-loop schedule the writers use; each producer takes
    every record waiting, produces them in one transaction and commits.
    """
    handed: dict[str, float] = {}
    queues: list[queue.SimpleQueue[str | None]] = [queue.SimpleQueue() for _ in range(producers)]
    value = b'{"seq": 0, "note": "latency probe"}'
    ready = threading.Barrier(producers + 1)

    errors: list[BaseException] = []

    def produce(index: int) -> None:
        try:
            loop(index)
        except BaseException as exc:
            errors.append(exc)
            ready.abort()  # the schedule must not wait for a producer that is gone

    def loop(index: int) -> None:
        producer = Producer({**settings, "transactional.id": f"bench-floor-{uuid.uuid4().hex}"})
        producer.init_transactions(60)
        producer.begin_transaction()  # warm-up: every partition joins a transaction once
        for partition in range(partitions):
            producer.produce(topic, b"warm-up", partition=partition)
        producer.commit_transaction(60)
        ready.wait(120)
        inbox = queues[index]
        while True:
            batch: list[str] = []
            item = inbox.get()
            while item is not None:
                batch.append(item)
                if inbox.empty():
                    break
                item = inbox.get()
            if batch:
                producer.begin_transaction()
                for event_id in batch:
                    producer.produce(
                        topic, value, event_id.encode(), headers=[(EVENT_ID_HEADER, event_id)]
                    )
                producer.commit_transaction(60)
            if item is None:
                return

    threads = [threading.Thread(target=produce, args=(i,)) for i in range(producers)]
    for thread in threads:
        thread.start()
    try:
        ready.wait(120)
    except threading.BrokenBarrierError:
        for thread in threads:
            thread.join(60)
        raise RuntimeError(f"a raw producer failed to start: {errors[:1]}") from None
    total = int(rate * seconds)
    start = time.time()
    for seq in range(total):
        if (wait := start + seq / rate - time.time()) > 0:
            time.sleep(wait)
        event_id = str(uuid.uuid4())
        handed[event_id] = time.time()
        queues[seq % producers].put(event_id)
    for inbox in queues:
        inbox.put(None)
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"a raw producer failed: {errors[0]!r}")
    return handed


def wait_for_reader(engine: Engine, svc: Services, topic: str, *, timeout: float = 60.0) -> None:
    """Probe ``topic`` until the arrival reader noted a probe: it reads from the end."""
    producer = Producer({"bootstrap.servers": svc.bootstrap_servers})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = str(uuid.uuid4())
        producer.produce(topic, b"probe", headers=[(EVENT_ID_HEADER, probe)])
        producer.flush(30)
        if arrivals(engine, {probe}, "kafka", timeout=5):
            return
    raise TimeoutError(f"the arrival reader saw no probe on {topic} in {timeout:.0f} s")


def arrivals(engine: Engine, ids: set[str], kind: str, *, timeout: float) -> dict[str, float]:
    """Wait until every id arrived (``handler`` or ``kafka``), up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    got: dict[str, float] = {}
    while True:
        with engine.connect() as conn:
            rows = conn.execute(
                text("SELECT event_id, at FROM bench_received WHERE kind = :kind"), {"kind": kind}
            ).all()
        got = {event_id: at for event_id, at in rows if event_id in ids}
        if len(got) >= len(ids) or time.monotonic() > deadline:
            return got
        time.sleep(0.25)


class Process:
    """A child process that is always terminated (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)

    def __enter__(self) -> Process:
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def relay_process(db: Database, svc: Services, mode: str) -> Process:
    args = ["relay", "--db", db.url, "-b", svc.bootstrap_servers, "--log-level", "WARNING"]
    args += ["-X", "request.timeout.ms=40000"]
    if mode == POLLING:
        args.append("--no-listen")
    if mode == ONE_SLOT:
        args += ["--slots", "1"]
    return Process(outbox_command(*args))


def consumer_command(db: Database, svc: Services, topic: str, *args: str) -> list[str]:
    common = [sys.executable, "-m", "benchmarks.consumers", "--db", db.url]
    common += ["--bootstrap-servers", svc.bootstrap_servers, "--topic", topic]
    return [*common, "--group", f"bench-latency-{uuid.uuid4().hex[:8]}", *args]


@contextlib.contextmanager
def consumer_processes(
    db: Database, svc: Services, topic: str, poll_timeout: float, settings: dict[str, str]
) -> Iterator[Process]:
    """The consumer under test and the arrival reader, each in a process of its own."""
    extra = [arg for key, value in settings.items() for arg in ("-X", f"{key}={value}")]
    with (
        Process(consumer_command(db, svc, topic, "--role", "arrivals")),
        Process(
            consumer_command(db, svc, topic, "--poll-timeout", str(poll_timeout), *extra)
        ) as consumer,
    ):
        yield consumer


def broker_floor(
    db: Database, svc: Services, engine: Engine, size: Size
) -> dict[str, dict[str, Any]]:
    """Hand-over -> readable for the size's numbers of raw transactional producers (1 and 4: as
    --slots 1 and the relay's default of 4 slots), at the size's rate."""
    settings = raw_settings(db, svc, profile=Profile.BALANCED)  # the latency relay's preset
    phases: dict[str, dict[str, Any]] = {}
    for producers in size.floor_producers:
        topic = f"bench.floor.{uuid.uuid4().hex[:6]}"
        create_topics(svc, topic)
        with Process(consumer_command(db, svc, topic, "--role", "arrivals")):
            wait_for_reader(engine, svc, topic)
            with machine_busy() as busy:
                handed = isolated(
                    raw_steadily,
                    settings,
                    topic,
                    rate=size.latency_rate,
                    seconds=size.latency_seconds,
                    producers=producers,
                )
            in_kafka = arrivals(engine, set(handed), "kafka", timeout=30)
        plural = "s" if producers > 1 else ""
        phases[f"{FLOOR}, {producers} producer{plural} / {size.latency_rate}/s"] = {
            "relay": f"no relay: {producers} raw producer{plural}, no database",
            "rate": size.latency_rate,
            "topic": topic,
            "commit_to_kafka": summarise(handed, in_kafka, f"floor, {producers} producers"),
            "achieved_rate": round(len(handed) / size.latency_seconds),
            "machine_cpu_busy": round(busy["share"], 2),
        }
    return phases


def probe_keys() -> list[str]:
    """One key per shard, so a probe of each reaches every slot of the relay."""
    keys: dict[int, str] = {}
    i = 0
    while len(keys) < SHARD_COUNT:
        key = f"probe-{i}"
        keys.setdefault(shard_for(key.encode(), uuid.uuid4()), key)
        i += 1
    return list(keys.values())


def warm_up(engine: Engine, topic: str, *, timeout: float = 120.0) -> None:
    """Probe every shard until the consumer handled all probes: group joined, every slot up.

    A relay takes its slots one after another (each reads its recovery marker
    first), so one handled probe would only prove that the first slot runs.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ids = set()
        with Session(engine) as session, session.begin():
            for key in probe_keys():
                ids.add(str(publish(session, topic=topic, key=key, value={"probe": True})))
        handled = len(arrivals(engine, ids, "handler", timeout=5)) == len(ids)
        if handled and len(arrivals(engine, ids, "kafka", timeout=5)) == len(ids):
            return
    raise TimeoutError("the latency consumer did not handle a probe of every shard in 120 s")


class LostEvents(RuntimeError):
    """A phase's events did not all arrive: its latencies would describe only the lucky ones."""


def summarise(committed: dict[str, float], got: dict[str, float], where: str) -> dict[str, Any]:
    """Latency figures of one phase; ``LostEvents`` when an event never arrived (``where``)."""
    missing = len(committed.keys() - got.keys())
    if missing or not committed:
        raise LostEvents(
            f"{where}: {missing} of {len(committed)} events never arrived; the phase is void"
        )
    lat = [(got[i] - at) * 1000 for i, at in committed.items() if i in got]
    return {
        "events": len(committed),
        "received": len(lat),
        "p50_ms": round(percentile(lat, 50), 1),
        "p99_ms": round(percentile(lat, 99), 1),
        "max_ms": round(max(lat), 1) if lat else None,
    }


def _p50_p99(measured: dict[str, Any]) -> str:
    handler = measured["commit_to_handler"]
    return f"p50 {handler['p50_ms']} ms, p99 {handler['p99_ms']} ms"


def run(svc: Services, size: Size) -> Result:
    db = svc.database("latency")
    engine = create_engine(db.url, pool_size=WRITER_THREADS + 2)
    with engine.begin() as conn:
        conn.execute(text(RECEIVED_DDL))
    phases: dict[str, dict[str, Any]] = {}
    try:
        chosen = list(CONSUMER_SETTINGS.items())[::-1][: size.latency_consumers]
        for consumer_name, (poll_timeout, settings) in chosen:
            rates = [size.latency_rate]
            if consumer_name == KAFKA_LIKE and size.latency_rate > LOW_RATE:
                rates.insert(0, LOW_RATE)  # the wake-up path alone, with the machine mostly idle
            modes: tuple[str, ...] = (
                RELAY_MODES if consumer_name == KAFKA_LIKE else (NOTIFY, POLLING)
            )
            if not size.latency_one_slot:
                modes = tuple(m for m in modes if m != ONE_SLOT)
            for mode in modes:
                # A topic of its own per relay mode and consumer: Tansu's memory storage gets
                # slower as a partition fills (p50 23 -> 81 ms over four 6 s rounds at 1000/s
                # on one topic, with a new relay process each round), so a shared topic
                # would make each phase pay for the ones before it.
                topic = f"bench.latency.{uuid.uuid4().hex[:6]}"
                create_topics(svc, topic)
                with (
                    consumer_processes(db, svc, topic, poll_timeout, settings) as consumer,
                    relay_process(db, svc, mode) as relay,
                ):
                    pids = {"relay": relay.proc.pid, "consumer": consumer.proc.pid}
                    warm_up(engine, topic)
                    for rate in rates if mode != ONE_SLOT else [size.latency_rate]:
                        with machine_busy(pids) as busy:
                            committed = write_steadily(
                                engine,
                                topic,
                                rate=rate,
                                seconds=size.latency_seconds,
                                notify=mode != POLLING,
                            )
                        ids = set(committed)
                        handled = arrivals(engine, ids, "handler", timeout=60)
                        in_kafka = arrivals(engine, ids, "kafka", timeout=10)
                        name = phase(mode, consumer_name, rate)
                        phases[name] = {
                            "relay": mode,
                            "consumer": consumer_name,
                            "rate": rate,
                            "topic": topic,
                            "commit_to_handler": summarise(committed, handled, f"{name}, handler"),
                            "commit_to_kafka": summarise(committed, in_kafka, f"{name}, Kafka"),
                            "achieved_rate": round(len(committed) / size.latency_seconds),
                            "machine_cpu_busy": round(busy["share"], 2),
                            "writers_cpu_share": round(busy["this_process"], 2),
                            "relay_cpu_share": round(busy["relay"], 3),
                            "consumer_cpu_share": round(busy["consumer"], 3),
                        }
        floor = broker_floor(db, svc, engine, size)
        phases.update(floor)
    finally:
        engine.dispose()
        svc.drop(db)
    rate = size.latency_rate
    best = phases[phase(NOTIFY, KAFKA_LIKE, rate)]
    polling = phases[phase(POLLING, KAFKA_LIKE, rate)]
    head = best["commit_to_handler"]["p99_ms"]
    plain = phases.get(phase(NOTIFY, DEFAULTS, rate))
    one_slot = phases.get(phase(ONE_SLOT, KAFKA_LIKE, rate))
    low = phases.get(phase(NOTIFY, KAFKA_LIKE, LOW_RATE))
    low_polling = phases.get(phase(POLLING, KAFKA_LIKE, LOW_RATE))
    long_poll = "Tansu's 500 ms long poll" if "Tansu" in svc.broker else "fetch.wait.max.ms=500"
    defaults = f"; with the defaults, {long_poll}: {_p50_p99(plain)}" if plain else ""
    summary = (
        f"NOTIFY: commit->handler {_p50_p99(best)} (consumer fetch.wait.max.ms=5{defaults}); "
        f"commit->Kafka p99 {best['commit_to_kafka']['p99_ms']} ms. "
        f"Polling, no NOTIFY (adaptive, 10 ms to 1 s): {_p50_p99(polling)}. "
        f"At {rate} events/s."
    )
    if one_slot:
        summary += (
            f" With --slots 1 (fewer, larger Kafka transactions): {_p50_p99(one_slot)} "
            f"(commit->Kafka p99 {one_slot['commit_to_kafka']['p99_ms']} ms)."
        )
    floors = [
        f"{p['commit_to_kafka']['p50_ms']} / {p['commit_to_kafka']['p99_ms']} ms"
        for p in floor.values()
    ]
    summary += (
        f" Broker floor (the relay's Kafka loop, no database; "
        f"{' / '.join(map(str, size.floor_producers))} producers): "
        f"hand-over->readable p50/p99 {' and '.join(floors)}. "
        f"Machine CPU busy (all cores): {best['machine_cpu_busy']:.0%} in the NOTIFY phase "
        f"(the writers' process {best['writers_cpu_share']:.0%}, the relay's "
        f"{best['relay_cpu_share']:.0%}, the consumer's {best['consumer_cpu_share']:.0%}), "
        f"{next(iter(floor.values()))['machine_cpu_busy']:.0%} for the "
        f"{size.floor_producers[0]}-producer floor."
    )
    if low and low_polling and rate > LOW_RATE:
        summary += (
            f" At {LOW_RATE} events/s: NOTIFY {_p50_p99(low)}; polling {_p50_p99(low_polling)}."
        )
    return figure(
        summary=summary,
        value=head,
        unit="ms p99 commit->handler (NOTIFY, consumer fetch.wait.max.ms=5)",
        target=f"p99 <= {TARGET_P99_MS:.0f} ms with NOTIFY",
        met=head <= TARGET_P99_MS,
        rate=size.latency_rate,
        seconds=size.latency_seconds,
        phases=phases,
    )
