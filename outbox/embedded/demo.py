"""``outbox demo``: the write path and the relay end to end, checked against what committed."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    String,
    create_engine,
    func,
    select,
    text,
)
from sqlalchemy import (
    Table as SATable,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from consumer import Event, IdempotentConsumer, RetryPolicy
from outbox.db import redact, sqlalchemy_url
from outbox.embedded.client_settings import consumer_settings
from outbox.embedded.kafka_cluster import create_topic
from outbox.errors import ConfigError
from outbox.migrate import TABLE_PREFIX, upgrade
from outbox.publish import publish
from outbox.relay.classify import message_headers

demo_metadata = MetaData()
orders = SATable(
    "demo_orders",
    demo_metadata,
    Column("id", Integer, primary_key=True),
    Column("customer", String, nullable=False),
    Column("seq", Integer, nullable=False),
)

effects = SATable(
    "demo_order_effects",
    demo_metadata,
    Column("event_id", String, nullable=False),  # deliberately not unique: doubles would show
    Column("customer", String, nullable=False),
    Column("seq", Integer, nullable=False),
)

REPLAYED = 50
"""Records the demo sends to the topic a second time (same event id), as a relay replay would."""


class DemoProjector(IdempotentConsumer):
    """Applies each order event once: one row in ``demo_order_effects`` per event."""

    group_id = "outbox-demo"
    retry = RetryPolicy(attempts=3, initial_backoff=0.1, max_backoff=1.0)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # commit -> handler entry in seconds (first delivery), per phase: burst or steady
        self.latencies: dict[str, list[float]] = defaultdict(list)

    def handle(self, session: Session, event: Event) -> None:
        order = event.value
        self.latencies[order["phase"]].append(time.time() - order["committed_at"])
        session.execute(
            effects.insert().values(event_id=event.id, customer=order["customer"], seq=order["seq"])
        )


@dataclass
class ConsumerRun:
    """The deduplicating consumer of the demo, in a thread."""

    projector: DemoProjector
    thread: threading.Thread
    error: BaseException | None = None
    replayed: int = 0
    applied_rows: int = 0
    distinct_events: int = 0
    matches_committed: bool = False


def _start_consumer(engine: Engine, bootstrap: str, topic: str, *, tansu: bool) -> ConsumerRun:
    projector = DemoProjector(
        engine,
        bootstrap,
        topics=[topic],
        group_id=f"outbox-demo-{topic}",
        batch_size=500,
        settings=consumer_settings(tansu=tansu),
    )
    run = ConsumerRun(projector, threading.Thread(name="consumer", daemon=True))

    def target() -> None:
        try:
            projector.run()
        except BaseException as exc:
            run.error = exc

    run.thread = threading.Thread(target=target, name="consumer", daemon=True)
    run.thread.start()
    return run


def _create_topic(bootstrap: str, topic: str) -> None:
    """Create the topic up front and wait for its leaders, so the consumer's subscription
    finds it at once (Apache Kafka here never creates topics on first use)."""
    create_topic(bootstrap, topic, 4)


def _replay(bootstrap: str, topic: str, count: int) -> int:
    """Send the first ``count`` records of the topic again, unchanged (a relay replay)."""
    reader = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"outbox-demo-replay-{uuid.uuid4()}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    records: list[Any] = []  # (key, value, headers), as read
    try:
        parts = reader.list_topics(topic, timeout=10).topics[topic].partitions
        reader.assign([TopicPartition(topic, p, 0) for p in parts])
        deadline = time.monotonic() + 30
        while len(records) < count and time.monotonic() < deadline:
            msg = reader.poll(0.5)
            if msg is not None and not msg.error():
                records.append((msg.key(), msg.value(), msg.headers() or []))
    finally:
        reader.close()
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for key, value, headers in records:
        producer.produce(topic, key=key, value=value, headers=headers)
    producer.flush(30)
    return len(records)


def _finish_consumer(run: ConsumerRun, engine: Engine, ledger: Ledger, progress: Progress) -> None:
    """Wait until every committed event is applied and every replay skipped, then stop."""
    task = progress.add_task("consumer -> effects (applied)", total=len(ledger.committed_ids))
    stats = run.projector.stats
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and run.thread.is_alive():
        progress.update(task, completed=stats.applied)
        if stats.applied >= len(ledger.committed_ids) and stats.duplicates >= run.replayed:
            break
        time.sleep(0.1)  # progress refresh only
    run.projector.stop.set()
    run.thread.join(60)
    progress.update(task, completed=stats.applied)
    with engine.connect() as conn:
        rows = conn.execute(select(effects.c.event_id)).scalars().all()
    run.applied_rows = len(rows)
    run.distinct_events = len(set(rows))
    run.matches_committed = set(rows) == ledger.committed_ids


class RelayProcesses:
    """``outbox relay`` as real processes, so the demo can SIGKILL one like a crash would."""

    def __init__(self, db: str, bootstrap: str) -> None:
        self.args = [
            sys.executable,
            "-m",
            "outbox.cli",
            "relay",
            "--db",
            db,
            "-b",
            bootstrap,
            "--slots",
            "2",
            "--poll-interval",
            "0.2",
            "--log-level",
            "ERROR",
        ]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.killed = 0

    def start(self) -> None:
        self.procs.append(subprocess.Popen(self.args, stdin=subprocess.DEVNULL))

    def crash_and_replace(self) -> None:
        self.procs[-1].kill()  # SIGKILL: no clean shutdown, the recovery marker takes over
        self.procs[-1].wait()
        self.killed += 1
        self.start()

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def _published(engine: Engine, ledger: Ledger) -> int:
    """Committed events no longer in the outbox: the relays have published them."""
    with engine.connect() as conn:
        pending = conn.execute(select(func.count()).select_from(text("outbox_events"))).scalar_one()
    with ledger.lock:
        return max(0, len(ledger.committed_ids) - int(pending))


@dataclass
class Ledger:
    """What the application committed and rolled back, per key in commit order."""

    committed: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    committed_ids: set[str] = field(default_factory=set)
    rolled_back_ids: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


BROKERS = ("tansu", "kafka")
"""What ``--broker`` starts: Tansu (zero setup) or a 3-node Apache Kafka cluster."""


@contextmanager
def _services(
    console: Console, db: str | None, bootstrap: str | None, broker: str = "tansu"
) -> Iterator[tuple[str, str]]:
    if broker not in BROKERS:
        raise ConfigError(f"--broker {broker!r}: pick one of {', '.join(BROKERS)}")
    with ExitStack() as stack:
        if db is None:
            from outbox.embedded import EmbeddedPostgres

            with console.status("starting embedded PostgreSQL..."):
                db = stack.enter_context(EmbeddedPostgres()).sqlalchemy_url
        if bootstrap is None and broker == "kafka":
            from outbox.embedded.kafka_cluster import KafkaCluster

            with console.status(
                "starting a 3-node Apache Kafka cluster (KRaft; the first run fetches its jars "
                "from Maven Central)..."
            ):
                cluster = stack.enter_context(KafkaCluster())
            console.print(
                f"Apache Kafka {cluster.version}: {cluster.node_count} nodes (replication "
                f"factor 3, min.insync.replicas 2) ready in {cluster.startup_seconds or 0:.1f}s"
            )
            bootstrap = cluster.bootstrap_servers
        elif bootstrap is None:
            from outbox.embedded import EmbeddedBroker

            with console.status("starting the embedded Kafka-API broker (Tansu)..."):
                bootstrap = stack.enter_context(EmbeddedBroker()).bootstrap_servers
        yield db, bootstrap


def _write(
    engine: Engine,
    ledger: Ledger,
    topic: str,
    writer: int,
    n: int,
    ratio: float,
    tick: Any,
    *,
    phase: str = "burst",
    interval: float = 0.0,
) -> None:
    """``n`` orders as fast as possible, or one every ``interval`` seconds (a steady rate)."""
    rng = random.Random(writer)
    seqs: dict[str, int] = defaultdict(int)
    next_at = time.monotonic()
    for i in range(n):
        if interval:
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))  # pacing the writer, not a wait
        customer = f"{phase}-customer-{writer}-{i % 7}"
        seqs[customer] += 1
        seq = seqs[customer]
        rollback = rng.random() < ratio
        with Session(engine) as session:
            with session.begin():
                order_id = session.execute(
                    orders.insert().values(customer=customer, seq=seq).returning(orders.c.id)
                ).scalar_one()
                event_id = publish(
                    session,
                    topic=topic,
                    key=customer,
                    value={
                        "order_id": order_id,
                        "customer": customer,
                        "seq": seq,
                        "phase": phase,
                        "committed_at": time.time(),  # stamped just before the commit
                    },
                    headers={"event-type": "OrderPlaced"},
                )
                if rollback:
                    session.rollback()
            with ledger.lock:
                if rollback:
                    ledger.rolled_back_ids.add(str(event_id))
                else:
                    ledger.committed_ids.add(str(event_id))
                    ledger.committed[customer].append(seq)
        tick()


def _read_topic(
    bootstrap: str, topic: str, expected: int, progress: Progress
) -> list[tuple[str, str, int]]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"outbox-demo-check-{uuid.uuid4()}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    task = progress.add_task("reading the topic back", total=expected)
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in parts
        }
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        seen: list[tuple[str, str, int]] = []
        remaining = {p for p, end in ends.items() if end > 0}
        deadline = time.monotonic() + 60
        while remaining and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                # A transactional partition ends with a commit marker, never delivered as a
                # message: the position passing the end offset says the partition is done.
                for tp in consumer.position([TopicPartition(topic, p) for p in remaining]):
                    if tp.offset >= ends[tp.partition]:
                        remaining.discard(tp.partition)
                continue
            if msg.error():
                continue
            event_id = message_headers(msg)["outbox-event-id"].decode()
            value = json.loads(msg.value() or b"{}")
            seen.append((event_id, value["customer"], value["seq"]))
            progress.advance(task)
            if (msg.offset() or 0) >= ends[msg.partition() or 0] - 1:
                remaining.discard(msg.partition() or 0)
        return seen
    finally:
        consumer.close()


def _wait_published(engine: Engine, ledger: Ledger, progress: Progress, task: Any) -> None:
    """Until every committed event has left the outbox (or two minutes passed)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        published = _published(engine, ledger)
        progress.update(task, completed=published)
        if published == len(ledger.committed_ids):
            return
        time.sleep(0.1)  # progress refresh only


def _wait_applied(run: ConsumerRun, count: int) -> None:
    """Until the consumer applied ``count`` events (or two minutes passed, or it died)."""
    deadline = time.monotonic() + 120
    while (
        run.projector.stats.applied < count
        and run.thread.is_alive()
        and time.monotonic() < deadline
    ):
        time.sleep(0.05)  # the steady phase starts a little later; nothing is decided by it


def demo_database_problem(tables: set[str], pending: int, dead: int) -> str | None:
    """Why the demo must not run on a database the user named, or None.

    It adds tables, runs relays (which would publish anything pending) and a consumer group
    there: only an empty database, or one with only empty outbox tables, is fit for that.
    """
    foreign = sorted(t for t in tables if not t.startswith(TABLE_PREFIX))
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        return f"the database holds tables the demo did not create ({shown})"
    if pending or dead:
        return (
            f"its outbox holds {pending} pending and {dead} dead rows, which the demo's "
            "relays would publish"
        )
    return None


def _user_database(url: str) -> int | None:
    """Refuse a database the demo could harm; the slot layout to restore afterwards."""
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            tables = set(
                conn.execute(
                    text(
                        "SELECT table_name FROM information_schema.tables WHERE table_schema "
                        "NOT IN ('pg_catalog', 'information_schema')"
                    )
                ).scalars()
            )
            migrated = {"outbox_events", "outbox_dead_events", "outbox_identity"} <= tables
            count = (
                "SELECT (SELECT count(*) FROM outbox_events), "
                "(SELECT count(*) FROM outbox_dead_events)"
            )
            pending, dead = conn.execute(text(count)).one() if migrated else (0, 0)
            slots = (
                conn.execute(text("SELECT slot_count FROM outbox_identity")).scalar()
                if migrated
                else None
            )
    finally:
        engine.dispose()
    if problem := demo_database_problem(tables, pending, dead):
        raise ConfigError(
            f"--db {redact(url)}: {problem}; the demo adds tables, relays and a consumer group "
            "there: give it an empty database (e.g. CREATE DATABASE outbox_demo), or leave "
            "--db out for an embedded one"
        )
    return None if slots is None else int(slots)


def _clean_up(engine: Engine, group: str, slots: int | None) -> None:
    """Leave a user's database as the demo found it: no demo tables, rows or slot layout."""
    demo_metadata.drop_all(engine)
    with engine.begin() as conn:
        for table in ("outbox_processed_events", "outbox_consumer_attempts"):
            conn.execute(text(f"DELETE FROM {table} WHERE group_id = :g"), {"g": group})
        conn.execute(text("UPDATE outbox_identity SET slot_count = :s"), {"s": slots})


def run_demo(
    *,
    db: str | None,
    bootstrap_servers: str | None,
    events: int,
    writers: int,
    rollback_ratio: float,
    crash_relay: bool = True,
    steady_rate: float = 50.0,
    steady_seconds: float = 4.0,
    broker: str = "tansu",
) -> bool:
    """The whole pipeline, checked. ``broker``: what to start when no ``bootstrap_servers`` is
    given (``tansu`` or ``kafka``); with them, ``kafka`` says they are an Apache Kafka, which
    hides aborted transactions, so the topic must then hold no duplicate at all."""
    console = Console()
    topic = f"demo.orders.{uuid.uuid4().hex[:8]}"
    tansu = broker == "tansu" and bootstrap_servers is None
    slots = _user_database(sqlalchemy_url(db)) if db is not None else None
    with _services(console, db, bootstrap_servers, broker) as (dsn, bootstrap), ExitStack() as undo:
        url = sqlalchemy_url(dsn)
        upgrade(url)
        engine = create_engine(url, pool_size=writers + 4)
        undo.callback(engine.dispose)
        if db is not None:
            undo.callback(_clean_up, engine, f"outbox-demo-{topic}", slots)
        demo_metadata.create_all(engine)
        ledger = Ledger()
        _create_topic(bootstrap, topic)
        relays = RelayProcesses(url, bootstrap)
        relays.start()
        consumer = _start_consumer(engine, bootstrap, topic, tansu=tansu)
        with console.status("deduplicating consumer joining its group..."):
            deadline = time.monotonic() + 60
            while not consumer.projector.joined and time.monotonic() < deadline:
                time.sleep(0.05)  # a status spinner, not synchronisation: the run goes on anyway
        started = time.monotonic()
        with Progress(
            TextColumn("{task.description:<34}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            write_task = progress.add_task(f"{writers} writers -> outbox", total=events)
            relay_task = progress.add_task("relay -> Kafka (published)", total=None)
            crash_at = events // 2 if crash_relay else None
            per_writer = [
                events // writers + (1 if w < events % writers else 0) for w in range(writers)
            ]
            with ThreadPoolExecutor(writers) as pool:
                futures = [
                    pool.submit(
                        _write,
                        engine,
                        ledger,
                        topic,
                        w,
                        n,
                        rollback_ratio,
                        lambda: progress.advance(write_task),
                    )
                    for w, n in enumerate(per_writer)
                ]
                while not all(f.done() for f in futures):
                    written = int(progress.tasks[write_task].completed)
                    if crash_at is not None and written >= crash_at:
                        progress.console.print(
                            f"[yellow]relay killed with SIGKILL after {written} writes; "
                            "a new relay takes its slots over[/]"
                        )
                        relays.crash_and_replace()
                        crash_at = None
                    progress.update(relay_task, completed=_published(engine, ledger))
                    time.sleep(0.1)  # progress refresh only, not synchronisation
                for f in futures:
                    f.result()
            progress.update(relay_task, total=len(ledger.committed_ids))
            _wait_published(engine, ledger, progress, relay_task)
            drained = time.monotonic() - started
            steady = int(steady_rate * steady_seconds)
            if steady:
                # The burst above measures a queue draining; latency is measured here, at a
                # steady rate the relay and consumer keep up with, once the consumer has
                # worked off the burst too.
                _wait_applied(consumer, len(ledger.committed_ids))
                steady_task = progress.add_task(f"steady {steady_rate:g}/s -> outbox", total=steady)
                _write(
                    engine,
                    ledger,
                    topic,
                    writers,
                    steady,
                    0.0,
                    lambda: progress.advance(steady_task),
                    phase="steady",
                    interval=1 / steady_rate,
                )
                progress.update(relay_task, total=len(ledger.committed_ids))
                _wait_published(engine, ledger, progress, relay_task)
            relays.stop()
            seen = _read_topic(bootstrap, topic, len(ledger.committed_ids), progress)
            consumer.replayed = _replay(bootstrap, topic, REPLAYED)
            _finish_consumer(consumer, engine, ledger, progress)
    return _report(
        console,
        ledger,
        seen,
        relays,
        drained,
        consumer,
        embedded=tansu,
        burst=events,
        filters_aborts=broker == "kafka",
        steady_rate=steady_rate,
    )


def _report(
    console: Console,
    ledger: Ledger,
    seen: list[tuple[str, str, int]],
    relays: RelayProcesses,
    seconds: float,
    consumer: ConsumerRun,
    *,
    embedded: bool,
    burst: int = 0,
    steady_rate: float = 0.0,
    filters_aborts: bool = False,
) -> bool:
    arrived_ids = [s[0] for s in seen]
    arrived = set(arrived_ids)
    duplicates = len(arrived_ids) - len(arrived)
    missing = ledger.committed_ids - arrived
    phantom = arrived & ledger.rolled_back_ids
    by_key: dict[str, list[int]] = defaultdict(list)
    for _eid, customer, seq in seen:
        by_key[customer].append(seq)
    dedup_by_key = {k: list(dict.fromkeys(v)) for k, v in by_key.items()}
    order_ok = all(dedup_by_key.get(k, []) == v for k, v in ledger.committed.items())
    table = Table(title="outbox demo: what committed vs what arrived in Kafka")
    table.add_column("measure")
    table.add_column("count", justify="right")
    rows = [
        ("transactions committed (events)", len(ledger.committed_ids)),
        ("transactions rolled back", len(ledger.rolled_back_ids)),
        ("records on the topic", len(arrived_ids)),
        ("distinct events on the topic", len(arrived)),
        ("lost (committed, not on topic)", len(missing)),
        ("from rolled-back transactions", len(phantom)),
        (
            "duplicates on the topic"
            + (" (aborted by the crash; Tansu shows them)" if embedded else ""),
            duplicates,
        ),
        ("relay processes SIGKILLed", relays.killed),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    table.add_row("per-key order preserved", "yes" if order_ok else "NO")
    table.add_row(f"seconds to write and drain the burst of {burst}", f"{seconds:.1f}")
    stats = consumer.projector.stats
    for name, value in [
        ("consumer: records replayed (same event id)", consumer.replayed),
        ("consumer: duplicates skipped", stats.duplicates),
        ("consumer: effects applied (rows)", consumer.applied_rows),
        ("consumer: distinct events applied", consumer.distinct_events),
    ]:
        table.add_row(name, str(value))
    effects_ok = (
        consumer.error is None
        and consumer.matches_committed
        and consumer.applied_rows == consumer.distinct_events == len(ledger.committed_ids)
    )
    table.add_row("effects applied == events committed", "yes" if effects_ok else "NO")
    for label, (p50, p99) in latency_rows(
        consumer.projector.latencies, burst=burst, steady_rate=steady_rate
    ):
        table.add_row(f"{label} p50", f"{p50 * 1000:.0f} ms")
        table.add_row(f"{label} p99", f"{p99 * 1000:.0f} ms")
    console.print(table)
    if steady_rate:
        console.print(
            "Latency: the steady figure is commit -> handler while the pipeline keeps up; the "
            "burst figure is how long events queued behind the burst. Both depend on this "
            "machine, whose cores PostgreSQL, the broker, the relays and the consumer share."
        )
    if consumer.error is not None:
        error = consumer.error
        console.print(f"[bold red]consumer failed[/]: {type(error).__name__}: {error}")
    # Records of a transaction aborted by the SIGKILL stay visible on Tansu (not on Apache
    # Kafka); the deduplicating consumer absorbs them, so effects must still be exact.
    # On Apache Kafka no record of an aborted transaction reaches a read_committed reader:
    # one duplicate there is a broken exactly-once publish (I4).
    ok = (
        not missing
        and not phantom
        and order_ok
        and effects_ok
        and (duplicates == 0 or not filters_aborts)
    )
    console.print(
        "[bold green]OK[/]: every committed event arrived once, in order, and was applied once"
        if ok
        else "[bold red]MISMATCH[/]"
    )
    return ok


def percentiles(samples: list[float]) -> tuple[float, float]:
    """(p50, p99) of ``samples`` (nearest rank)."""
    ordered = sorted(samples)
    return ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def latency_rows(
    latencies: dict[str, list[float]], *, burst: int, steady_rate: float
) -> list[tuple[str, tuple[float, float]]]:
    """Each phase's latency with a label that says what it measures (steady first)."""
    rows = []
    if latencies.get("steady"):
        rows.append(
            (
                f"latency commit -> handler at a steady {steady_rate:g} events/s",
                percentiles(latencies["steady"]),
            )
        )
    if latencies.get("burst"):
        rows.append(
            (
                f"queueing of the {burst}-event burst (not the steady latency)",
                percentiles(latencies["burst"]),
            )
        )
    return rows
