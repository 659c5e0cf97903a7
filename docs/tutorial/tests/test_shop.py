"""The shop's behaviour, on a real PostgreSQL and a real broker from the outbox plugin."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from decimal import Decimal

from fastapi.testclient import TestClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from consumer import runner_of
from outbox.testing import drain, published
from shop.app import create_app
from shop.models import CustomerTotal, Order
from shop.projector import CustomerTotals


def test_an_order_and_its_event_commit_together(db_url: str, outbox_engine: Engine) -> None:
    with TestClient(create_app(db_url)) as client:
        response = client.post("/orders", json={"customer": "alice", "total": "19.99"})
    assert response.status_code == 201
    [event] = published(outbox_engine, topic="orders.v1")
    assert str(event.event_id) == response.json()["event_id"]
    assert event.value == {
        "order_id": response.json()["order_id"],
        "customer": "alice",
        "total": "19.99",
    }
    with Session(outbox_engine) as session:
        assert session.scalars(select(Order.customer)).all() == ["alice"]


def test_a_refused_order_publishes_nothing(db_url: str, outbox_engine: Engine) -> None:
    with TestClient(create_app(db_url)) as client:
        response = client.post("/orders", json={"customer": "bob", "total": "much"})
    assert response.status_code == 422
    assert published(outbox_engine) == []


def test_each_order_is_counted_once(
    db_url: str,
    outbox_engine: Engine,
    outbox_bootstrap_servers: str,
    outbox_consumer_settings: dict[str, str],
) -> None:
    topic = f"orders.{uuid.uuid4().hex[:8]}"  # the broker lives for the whole test session
    with TestClient(create_app(db_url, topic=topic)) as client:
        for total in ("10.00", "2.50"):
            client.post("/orders", json={"customer": "carol", "total": total})
    assert drain(db_url, outbox_bootstrap_servers).published == 2

    totals = CustomerTotals(
        db_url, outbox_bootstrap_servers, topics=[topic], settings=outbox_consumer_settings
    )

    async def consume_until_both_applied() -> None:
        task = asyncio.create_task(totals.run_async())
        async with asyncio.timeout(60):
            while runner_of(totals).stats.applied < 2:
                await asyncio.sleep(0.05)
        task.cancel()  # stops the consumer: the record in hand finishes first
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(consume_until_both_applied())
    with Session(outbox_engine) as session:
        row = session.get(CustomerTotal, "carol")
        assert row is not None
        assert (row.orders, row.total) == (2, Decimal("12.50"))
