"""POST /orders: the order row and its OrderPlaced event commit in one transaction."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal

from fastapi import FastAPI
from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from outbox import apublish
from shop.models import Order

TOPIC = "orders.v1"


class OrderIn(BaseModel):
    customer: str
    total: Decimal


class OrderPlaced(BaseModel):
    order_id: uuid.UUID
    customer: str
    total: Decimal


def create_app(db_url: str | None = None, topic: str = TOPIC) -> FastAPI:
    engine = create_async_engine(db_url or os.environ["OUTBOX_DB"])
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await engine.dispose()

    app = FastAPI(lifespan=lifespan)

    @app.post("/orders", status_code=201)
    async def place_order(order_in: OrderIn) -> dict[str, str]:
        async with sessions() as session, session.begin():
            order = Order(id=uuid.uuid4(), customer=order_in.customer, total=order_in.total)
            session.add(order)
            event_id = await publish_placed(session, order, topic)
        return {"order_id": str(order.id), "event_id": str(event_id)}

    return app


async def publish_placed(session: AsyncSession, order: Order, topic: str) -> uuid.UUID:
    """One INSERT into the outbox, in the caller's transaction: no Kafka call here."""
    return await apublish(
        session,
        topic=topic,
        key=order.customer,  # one customer's events stay in order
        value=OrderPlaced(order_id=order.id, customer=order.customer, total=order.total),
        headers={"event-type": "OrderPlaced"},
    )
