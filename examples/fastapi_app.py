"""Example FastAPI application: ``POST /orders`` writes the order and its event together.

The order row and the outbox row commit in ONE asynchronous database
transaction (``apublish`` on the request's ``AsyncSession``): an order never
exists without its ``OrderPlaced`` event, nor an event without its order. The
event is a pydantic model with a ``Decimal``, a ``UUID`` and a ``datetime``;
``apublish`` encodes it as FastAPI would. Nothing here talks to Kafka: the relay
publishes the event after the commit, and ``examples.order_projector`` consumes it.

Run (after ``outbox migrate``)::

    OUTBOX_DB=postgresql+psycopg://outbox:outbox@localhost:5432/outbox \\
        uvicorn --factory examples.fastapi_app:create_app
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated

from fastapi import FastAPI, status
from pydantic import BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from examples.order_app import TOPIC, Base, Order
from outbox import apublish


class OrderIn(BaseModel):
    customer: Annotated[str, Field(min_length=1, max_length=64)]
    total: Annotated[Decimal, Field(gt=0, max_digits=12, decimal_places=2)]


class OrderPlaced(BaseModel):
    """The event's value: publish() encodes the model (Decimal as text in pydantic's JSON)."""

    order_id: uuid.UUID
    customer: str
    total: Decimal
    placed_at: datetime


class OrderOut(BaseModel):
    order_id: uuid.UUID
    event_id: uuid.UUID


async def place_order(session: AsyncSession, order_in: OrderIn) -> OrderOut:
    """Add an order and its event to ``session``'s transaction; the caller commits."""
    order = Order(
        id=uuid.uuid4(),
        customer=order_in.customer,
        total=order_in.total,
        placed_at=datetime.now(UTC),
    )
    session.add(order)
    event_id = await apublish(
        session,
        topic=TOPIC,
        key=str(order.id),
        value=OrderPlaced(
            order_id=order.id,
            customer=order.customer,
            total=order.total,
            placed_at=order.placed_at,
        ),
        headers={"event-type": "OrderPlaced"},
    )
    return OrderOut(order_id=order.id, event_id=event_id)


def create_app(db_url: str | None = None) -> FastAPI:
    """The application, on ``db_url`` (default: the OUTBOX_DB environment variable)."""
    url = db_url or os.environ.get("OUTBOX_DB")
    if not url:
        raise SystemExit(
            "OUTBOX_DB is not set: give it a SQLAlchemy URL such as "
            "postgresql+psycopg://outbox:outbox@localhost:5432/outbox"
        )
    engine = create_async_engine(url, pool_pre_ping=True)
    sessions = async_sessionmaker(engine, expire_on_commit=False)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with engine.begin() as conn:  # the app's own tables; the outbox's: outbox migrate
            await conn.run_sync(Base.metadata.create_all)
        yield
        await engine.dispose()

    app = FastAPI(title="orders", lifespan=lifespan)

    @app.post("/orders", status_code=status.HTTP_201_CREATED)
    async def create_order(order_in: OrderIn) -> OrderOut:
        async with sessions() as session, session.begin():  # commits both rows, or neither
            return await place_order(session, order_in)

    return app
