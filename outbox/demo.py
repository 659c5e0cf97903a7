"""``outbox demo``: the write path and the relay end to end, checked against what committed."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import Consumer, TopicPartition
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from sqlalchemy import Column, Integer, MetaData, String, Table as SATable, create_engine, func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from outbox.config import RelayConfig
from outbox.db import sqlalchemy_url
from outbox.migrate import upgrade
from outbox.publish import publish
from outbox.relay import Relay

demo_metadata = MetaData()
orders = SATable(
    "demo_orders",
    demo_metadata,
    Column("id", Integer, primary_key=True),
    Column("customer", String, nullable=False),
    Column("seq", Integer, nullable=False),
)


@dataclass
class Ledger:
    """What the application committed and rolled back, per key in commit order."""

    committed: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))
    committed_ids: set[str] = field(default_factory=set)
    rolled_back_ids: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextmanager
def _services(console: Console, db: str | None, bootstrap: str | None) -> Iterator[tuple[str, str]]:
    with ExitStack() as stack:
        if db is None or bootstrap is None:
            from outbox.embedded import EmbeddedBroker, EmbeddedPostgres

            with console.status("starting embedded PostgreSQL and Kafka-API broker (Tansu)..."):
                if db is None:
                    db = stack.enter_context(EmbeddedPostgres()).sqlalchemy_url
                if bootstrap is None:
                    bootstrap = stack.enter_context(EmbeddedBroker()).bootstrap_servers
        yield db, bootstrap


def _write(engine: Engine, ledger: Ledger, topic: str, writer: int, n: int, ratio: float, tick: Any) -> None:
    rng = random.Random(writer)
    seqs: dict[str, int] = defaultdict(int)
    for i in range(n):
        customer = f"customer-{writer}-{i % 7}"
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
                    value={"order_id": order_id, "customer": customer, "seq": seq},
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


def _read_topic(bootstrap: str, topic: str, expected: int, progress: Progress) -> list[tuple[str, str, int]]:
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
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        seen: list[tuple[str, str, int]] = []
        remaining = {p for p, end in ends.items() if end > 0}
        deadline = time.monotonic() + 60
        while remaining and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None or msg.error():
                continue
            headers = dict(msg.headers() or [])
            import json

            value = json.loads(msg.value())
            seen.append((headers["outbox-event-id"].decode(), value["customer"], value["seq"]))
            progress.advance(task)
            if msg.offset() >= ends[msg.partition()] - 1:
                remaining.discard(msg.partition())
        return seen
    finally:
        consumer.close()


def run_demo(
    *, db: str | None, bootstrap_servers: str | None, events: int, writers: int, rollback_ratio: float
) -> bool:
    console = Console()
    topic = f"demo.orders.{uuid.uuid4().hex[:8]}"
    with _services(console, db, bootstrap_servers) as (dsn, bootstrap):
        url = sqlalchemy_url(dsn)
        upgrade(url)
        engine = create_engine(url, pool_size=writers + 2)
        demo_metadata.create_all(engine)
        ledger = Ledger()
        relay = Relay(RelayConfig(dsn=url, bootstrap_servers=bootstrap, slots=2, poll_interval=0.2))
        relay_thread = threading.Thread(target=relay.run, name="relay", daemon=True)
        relay_thread.start()
        started = time.monotonic()
        with Progress(
            TextColumn("{task.description:<34}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console,
        ) as progress:
            write_task = progress.add_task(f"{writers} writers -> outbox", total=events)
            relay_task = progress.add_task("relay -> Kafka (published)", total=None)
            per_writer = [events // writers + (1 if w < events % writers else 0) for w in range(writers)]
            with ThreadPoolExecutor(writers) as pool:
                futures = [
                    pool.submit(
                        _write, engine, ledger, topic, w, n, rollback_ratio,
                        lambda: progress.advance(write_task),
                    )
                    for w, n in enumerate(per_writer)
                ]
                while not all(f.done() for f in futures):
                    progress.update(relay_task, completed=relay.stats.published)
                    time.sleep(0.1)  # progress refresh only, not synchronisation
                for f in futures:
                    f.result()
            progress.update(relay_task, total=len(ledger.committed_ids))
            deadline = time.monotonic() + 120
            with engine.connect() as conn:
                while time.monotonic() < deadline:
                    pending = conn.execute(select(func.count()).select_from(text("outbox_events"))).scalar_one()
                    progress.update(relay_task, completed=relay.stats.published)
                    if pending == 0:
                        break
                    relay.wake_all()
                    time.sleep(0.1)  # progress refresh only
            relay.stop.set()
            relay_thread.join(60)
            drained = time.monotonic() - started
            seen = _read_topic(bootstrap, topic, len(ledger.committed_ids), progress)
        engine.dispose()
    return _report(console, ledger, seen, relay, drained)


def _report(console: Console, ledger: Ledger, seen: list[tuple[str, str, int]], relay: Relay, seconds: float) -> bool:
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
        ("duplicates on the topic", duplicates),
        ("relay batches", relay.stats.batches),
    ]
    for name, value in rows:
        table.add_row(name, str(value))
    table.add_row("per-key order preserved", "yes" if order_ok else "NO")
    table.add_row("seconds to drain", f"{seconds:.1f}")
    console.print(table)
    ok = not missing and not phantom and order_ok and duplicates == 0
    console.print("[bold green]OK[/]: every committed event arrived once, in order" if ok else "[bold red]MISMATCH[/]")
    return ok
