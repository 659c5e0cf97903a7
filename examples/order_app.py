"""Example application: each order and its ``OrderPlaced`` event commit together.

The order row and the outbox row are written in ONE database transaction, so
an order never exists without its event, nor an event without its order. The
relay publishes the event to Kafka afterwards; nothing here talks to Kafka.

Environment:
    OUTBOX_DB          SQLAlchemy URL, e.g. postgresql+psycopg://outbox:outbox@localhost:5432/outbox
    ORDER_INTERVAL_MS  pause between orders (default 500)
    ORDER_COUNT        stop after this many orders (default 0: run until SIGTERM/SIGINT)

Run: ``python -m examples.order_app`` (after ``outbox migrate``).
"""

from __future__ import annotations

import logging
import os
import random
import signal
import sys
import threading
import uuid
from datetime import UTC, datetime
from decimal import Decimal

from sqlalchemy import DateTime, Numeric, String, Uuid, create_engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from outbox import publish

TOPIC = "orders.v1"
CUSTOMERS = ("alice", "bob", "carol", "dave", "erin")

log = logging.getLogger("order_app")


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True)
    customer: Mapped[str] = mapped_column(String(64))
    total: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    placed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


def place_order(session: Session, customer: str, total: Decimal) -> uuid.UUID:
    """Add an order and its event to ``session``'s transaction; the caller commits."""
    order = Order(id=uuid.uuid4(), customer=customer, total=total, placed_at=datetime.now(UTC))
    session.add(order)
    return publish(
        session,
        topic=TOPIC,
        key=str(order.id),
        value={
            "order_id": str(order.id),
            "customer": customer,
            "total": str(total),  # decimal as a string: no float rounding
            "placed_at": order.placed_at.isoformat(),
        },
        headers={"event-type": "OrderPlaced"},
    )


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        sys.exit(f"{name}={raw!r} is not a whole number >= 0; set it to e.g. {default}")
    return value


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    url = os.environ.get("OUTBOX_DB")
    if not url:
        sys.exit(
            "OUTBOX_DB is not set: give it a SQLAlchemy URL such as "
            "postgresql+psycopg://outbox:outbox@localhost:5432/outbox"
        )
    interval = env_int("ORDER_INTERVAL_MS", 500) / 1000
    limit = env_int("ORDER_COUNT", 0)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda _signum, _frame: stop.set())

    engine = create_engine(url, pool_pre_ping=True)
    Base.metadata.create_all(engine)  # the app's own tables; the outbox's come from migrate
    rng = random.Random()
    placed = 0
    while not stop.is_set() and (limit == 0 or placed < limit):
        customer = rng.choice(CUSTOMERS)
        total = Decimal(rng.randrange(100, 50_000)).scaleb(-2)  # 1.00 .. 499.99
        try:
            with Session(engine) as session, session.begin():
                event_id = place_order(session, customer, total)
        except OperationalError as exc:  # database restarting: try again later
            log.warning("order not placed, database unavailable: %s", exc.orig)
        else:
            placed += 1
            log.info("order #%d for %s, total %s, event %s", placed, customer, total, event_id)
        stop.wait(interval)
    engine.dispose()


if __name__ == "__main__":
    main()
