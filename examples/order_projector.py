"""Example deduplicating consumer: ``orders.v1`` -> ``order_totals`` (per customer).

``handle`` runs inside the database transaction that also records ``event.id``
as processed, so a redelivered event is skipped and every order is counted
exactly once, even across crashes and rebalances.

Run: ``outbox consume examples.order_projector:OrderProjector --db URL --bootstrap-servers HOSTS``
"""

from __future__ import annotations

import logging
from decimal import Decimal
from typing import Any, ClassVar

from sqlalchemy import BigInteger, Numeric, String, event
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from consumer import Event, IdempotentConsumer

log = logging.getLogger("order_projector")


class Base(DeclarativeBase):
    pass


class OrderTotal(Base):
    __tablename__ = "order_totals"

    customer: Mapped[str] = mapped_column(String(64), primary_key=True)
    order_count: Mapped[int] = mapped_column(BigInteger)
    total: Mapped[Decimal] = mapped_column(Numeric(14, 2))


def header(event_: Event, name: str) -> str | None:
    value = (event_.headers or {}).get(name)
    return value.decode() if isinstance(value, bytes) else value


class OrderProjector(IdempotentConsumer):
    topics = ["orders.v1"]  # noqa: RUF012  (the base class declares the type)
    group_id = "order-projector"

    _schema_ready: ClassVar[bool] = False

    def handle(self, session: Session, event: Event) -> None:
        self._ensure_schema(session)
        if header(event, "event-type") != "OrderPlaced":
            return  # not ours to project; it is still marked processed
        order: Any = event.value
        if not isinstance(order, dict):
            raise TypeError(f"OrderPlaced event {event.id} has a non-object value")
        amount = Decimal(str(order["total"]))
        upsert = insert(OrderTotal).values(customer=order["customer"], order_count=1, total=amount)
        session.execute(
            upsert.on_conflict_do_update(
                index_elements=[OrderTotal.customer],
                set_={
                    "order_count": OrderTotal.order_count + 1,
                    "total": OrderTotal.total + amount,
                },
            )
        )
        log.info("order %s: +%s for %s", order.get("order_id"), amount, order["customer"])

    @classmethod
    def _ensure_schema(cls, session: Session) -> None:
        """Create ``order_totals`` once; remember it only after the transaction commits."""
        if cls._schema_ready:
            return
        Base.metadata.create_all(session.connection())

        def committed(_session: Session) -> None:
            cls._schema_ready = True

        event.listen(session, "after_commit", committed, once=True)
