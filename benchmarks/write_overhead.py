"""Write overhead: a typical ORM request transaction with vs without one ``publish()``.

The request inserts an order and its 3 lines through the SQLAlchemy ORM and
commits; the variants add one ``publish()`` without NOTIFY, and one with it
(the default). A fourth variant adds one ``SELECT 1`` instead: the price of
any one more statement and its round trip, the floor no ``publish()`` that
writes a row in the caller's transaction can go below. A notifying commit
takes a database-wide lock that is held through the commit's WAL flush, so
it is measured at 1 and at N concurrent writers (separate processes: the GIL
must not be what serialises them), on a server with ``fsync`` and
``synchronous_commit`` on.

Variants run in interleaved rounds (their order shuffled every round) and each
ratio is the median of per-round ratios, so slow drift of a shared machine
cancels out instead of favouring one variant.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import random
import threading
import time
import uuid
from decimal import Decimal
from multiprocessing.connection import Connection
from typing import Any

import psycopg
from sqlalchemy import ForeignKey, Numeric, String, create_engine, text
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from benchmarks.harness import (
    Database,
    Result,
    Services,
    Size,
    figure,
    load_during,
    median,
    percentile,
)
from outbox import publish
from outbox.schema import NOTIFY_CHANNEL

TARGET = 1.15
VARIANTS = ("no publish", "publish, no NOTIFY", "publish + NOTIFY", "one SELECT 1")
BASELINE = VARIANTS[0]
DEFAULT = VARIANTS[2]  # publish()'s default: notify=True
FLOOR = VARIANTS[3]  # any one more statement through the session: what publish() cannot beat


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "bench_orders"
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    customer: Mapped[str] = mapped_column(String(64))
    total: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    lines: Mapped[list[OrderLine]] = relationship(back_populates="order")


class OrderLine(Base):
    __tablename__ = "bench_order_lines"
    id: Mapped[int] = mapped_column(primary_key=True, autoincrement=True)
    order_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("bench_orders.id"), index=True)
    sku: Mapped[str] = mapped_column(String(32))
    quantity: Mapped[int]
    price: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    order: Mapped[Order] = relationship(back_populates="lines")


SELECT_1 = text("SELECT 1")


def request(session: Session, variant: str, rng: random.Random) -> None:
    """One application request: an order with 3 lines (and its event), committed."""
    with session.begin():
        lines = [
            OrderLine(sku=f"sku-{rng.randrange(1000)}", quantity=rng.randrange(1, 5), price=p)
            for p in (Decimal("9.90"), Decimal("19.50"), Decimal("4.25"))
        ]
        order = Order(customer=f"customer-{rng.randrange(10_000)}", lines=lines)
        order.total = sum((line.price * line.quantity for line in lines), Decimal(0))
        session.add(order)
        if variant == FLOOR:
            session.execute(SELECT_1)  # autoflushes the order first, as publish() does
        elif variant != BASELINE:
            publish(
                session,
                topic="orders.v1",
                key=str(order.id),
                value={
                    "order_id": str(order.id),
                    "customer": order.customer,
                    "total": str(order.total),
                    "lines": [
                        {"sku": line.sku, "quantity": line.quantity, "price": str(line.price)}
                        for line in lines
                    ],
                },
                headers={"event-type": "OrderPlaced"},
                notify=variant == DEFAULT,
            )


def writer(conn: Connection, url: str, seed: int) -> None:
    """A writer process: runs the variant it is told until the deadline, reports latencies."""
    engine = create_engine(url, pool_size=1, max_overflow=0)
    rng = random.Random(seed)
    with Session(engine) as session:
        request(session, DEFAULT, rng)  # connect and warm the ORM before any clock runs
        conn.send("ready")
        while (cmd := conn.recv()) is not None:
            variant, start_at, stop_at = cmd
            while (now := time.time()) < start_at:
                time.sleep(min(0.01, start_at - now))
            latencies = []
            while time.time() < stop_at:
                t0 = time.perf_counter()
                request(session, variant, rng)
                latencies.append(time.perf_counter() - t0)
            conn.send(latencies)
    engine.dispose()


class Writers:
    """N writer processes (spawned, so nothing of the driver is inherited)."""

    def __init__(self, url: str, count: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for i in range(count):
            here, there = ctx.Pipe()
            proc = ctx.Process(target=writer, args=(there, url, i), daemon=True)
            proc.start()
            self.pipes.append(here)
            self.procs.append(proc)
        # 64 interpreters importing SQLAlchemy on 2 shared cores take minutes: one deadline for
        # all of them, growing with their number.
        deadline = time.monotonic() + 60 + 5 * count
        for pipe in self.pipes:
            if self._recv(pipe, timeout=max(1.0, deadline - time.monotonic())) != "ready":
                raise RuntimeError("writer failed to start")

    def _recv(self, pipe: Connection, *, timeout: float) -> Any:
        """A reply, or an error as soon as a writer process died instead of answering."""
        deadline = time.monotonic() + timeout
        while not pipe.poll(0.2):
            dead = [p for p in self.procs if not p.is_alive()]
            if dead:
                self.close()
                raise RuntimeError(f"writer process exited with code {dead[0].exitcode}")
            if time.monotonic() > deadline:
                self.close()
                raise TimeoutError("writer process did not answer")
        return pipe.recv()

    def run(self, variant: str, seconds: float) -> tuple[int, list[float]]:
        """All writers run ``variant`` for ``seconds`` from the same instant."""
        start_at = time.time() + 0.2
        for pipe in self.pipes:
            pipe.send((variant, start_at, start_at + seconds))
        latencies: list[float] = []
        for pipe in self.pipes:
            latencies.extend(self._recv(pipe, timeout=seconds + 60))
        return len(latencies), latencies

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for proc in self.procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()


class Listener:
    """A LISTEN session that drains notifications, as a running relay would."""

    def __init__(self, db: Database) -> None:
        self.conn = psycopg.connect(db.dsn, autocommit=True)
        self.conn.execute(f"LISTEN {NOTIFY_CHANNEL}")
        self.received = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._drain, name="bench-listen", daemon=True)
        self.thread.start()

    def _drain(self) -> None:
        while not self.stop.is_set():
            for _ in self.conn.notifies(timeout=0.2):
                self.received += 1

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.conn.close()


def run(svc: Services, size: Size) -> Result:
    db = svc.database("write")
    engine = create_engine(db.url)
    Base.metadata.create_all(engine)
    engine.dispose()
    listener = Listener(db)
    per_concurrency: dict[str, Any] = {}
    try:
        for writers_n in size.write_concurrency:
            with load_during() as load:
                per_concurrency[str(writers_n)] = _measure(db, writers_n, size)
            per_concurrency[str(writers_n)]["load"] = load
    finally:
        listener.close()
        svc.drop(db)
    one = per_concurrency[str(size.write_concurrency[0])]
    many = per_concurrency[str(size.write_concurrency[-1])]
    head = one["ratios"][DEFAULT]
    each = "; ".join(
        f"{n} writer{'s' if int(n) > 1 else ''}: {c['ratios'][DEFAULT]}x with NOTIFY, "
        f"{c['ratios'][VARIANTS[1]]}x without, SELECT 1 {c['ratios'][FLOOR]}x "
        f"({c['transactions_per_s'][BASELINE]:.0f} -> {c['transactions_per_s'][DEFAULT]:.0f} / "
        f"{c['transactions_per_s'][VARIANTS[1]]:.0f} tx/s)"
        + (" TOO BUSY" if c["load"]["too_busy"] else "")
        for n, c in per_concurrency.items()
    )
    notify_cost = many["transactions_per_s"][DEFAULT] / many["transactions_per_s"][VARIANTS[1]]
    return figure(
        summary=(
            f"time per request transaction vs the same without publish(): {each}. NOTIFY at "
            f"{size.write_concurrency[-1]} writers: {notify_cost:.2f}x the commit throughput of "
            "publish() without it"
        ),
        value=head,
        unit="x time per request (1 writer, publish + NOTIFY)",
        target=f"<= {TARGET}",
        met=head <= TARGET,
        concurrency=per_concurrency,
        notify_throughput_at_most_writers=round(notify_cost, 3),
        rounds=size.write_rounds,
        seconds_per_variant_and_round=size.write_seconds,
        request="ORM: INSERT order + 3 lines, commit (SQLAlchemy Session)",
    )


def _measure(db: Database, writers_n: int, size: Size) -> dict[str, Any]:
    pool = Writers(db.url, writers_n)
    rng = random.Random(writers_n)
    tps: dict[str, list[float]] = {v: [] for v in VARIANTS}
    lat: dict[str, list[float]] = {v: [] for v in VARIANTS}
    ratios: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        for variant in VARIANTS:  # warm-up round, not recorded
            pool.run(variant, min(0.3, size.write_seconds))
        for _ in range(size.write_rounds):
            order = list(VARIANTS)
            rng.shuffle(order)
            this_round: dict[str, float] = {}
            for variant in order:
                count, latencies = pool.run(variant, size.write_seconds)
                this_round[variant] = count / size.write_seconds
                tps[variant].append(this_round[variant])
                lat[variant].extend(latencies)
            for variant in VARIANTS:
                ratios[variant].append(this_round[BASELINE] / this_round[variant])
    finally:
        pool.close()
    return {
        "writers": writers_n,
        "ratios": {v: round(median(ratios[v]), 3) for v in VARIANTS},
        "transactions_per_s": {v: round(median(tps[v]), 1) for v in VARIANTS},
        "latency_ms": {
            v: {
                "p50": round(percentile(lat[v], 50) * 1000, 3),
                "p99": round(percentile(lat[v], 99) * 1000, 3),
            }
            for v in VARIANTS
        },
        "per_round_ratios": {v: [round(r, 3) for r in ratios[v]] for v in VARIANTS},
    }
