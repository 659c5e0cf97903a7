"""Sums each customer's orders, once per event, whatever Kafka redelivers."""

from __future__ import annotations

from decimal import Decimal

from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from consumer import Event, IdempotentConsumer
from shop.models import CustomerTotal


class CustomerTotals(IdempotentConsumer):
    topics = ["orders.v1"]  # noqa: RUF012
    group_id = "customer-totals"

    async def handle(self, session: AsyncSession, event: Event) -> None:
        # Runs in the transaction that also records event.id as processed.
        placed = event.value
        total = Decimal(str(placed["total"]))
        row = insert(CustomerTotal).values(customer=placed["customer"], orders=1, total=total)
        await session.execute(
            row.on_conflict_do_update(
                index_elements=[CustomerTotal.customer],
                set_={
                    "orders": CustomerTotal.orders + 1,
                    "total": CustomerTotal.total + total,
                },
            )
        )
