"""The shipped examples, run against the real database and broker, tested with the testing helpers
and the fixtures of the pytest plugin (``outbox_database_url``, ...), as a user's app would be.

``outbox.testing`` checks what the application published without a relay;
``consumer.testing`` runs the projector's handler without a broker; ``drain``
then proves the same event reaches Kafka.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from decimal import Decimal

from fastapi.testclient import TestClient
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from consumer.testing import consumer_for_tests, deliver
from examples.fastapi_app import create_app
from examples.order_app import TOPIC, Order, place_order
from examples.order_projector import OrderProjector, OrderTotal
from outbox.testing import drain, published, recorder
from tests.support import KafkaReader


def test_fastapi_order_and_its_event_commit_together_and_reach_the_projector_once(
    outbox_engine: Engine,
    outbox_database_url: str,
    outbox_bootstrap_servers: str,
    kafka: KafkaReader,
    make_topic: Callable[..., str],
) -> None:
    engine = outbox_engine
    make_topic(TOPIC)  # Apache Kafka here creates no topic on first use
    with TestClient(create_app(outbox_database_url)) as client:
        created = client.post("/orders", json={"customer": "alice", "total": "19.99"})
        refused = client.post("/orders", json={"customer": "bob", "total": "-1"})
    assert created.status_code == 201, created.text
    assert refused.status_code == 422
    body = created.json()

    [event] = published(engine, topic=TOPIC)  # bob's invalid order published nothing
    assert str(event.event_id) == body["event_id"]
    assert event.key_text == body["order_id"]
    assert event.header("event-type") == "OrderPlaced"
    assert event.value["total"] == "19.99"  # pydantic's JSON keeps a Decimal exact
    assert event.value["order_id"] == body["order_id"]
    with Session(engine) as session:
        order = session.get(Order, uuid.UUID(body["order_id"]))
    assert order is not None
    assert order.total == Decimal("19.99")

    OrderProjector._schema_ready = False  # a class-wide cache; this is a new database
    projector = consumer_for_tests(OrderProjector, engine)
    assert deliver(projector, event) is True
    assert deliver(projector, event) is False  # redelivered: skipped by its dedup record
    with Session(engine) as session:
        totals = session.execute(select(OrderTotal)).scalars().all()
    assert [(t.customer, t.order_count, t.total) for t in totals] == [
        ("alice", 1, Decimal("19.99"))
    ]

    stats = drain(
        outbox_database_url, outbox_bootstrap_servers, transactional_id_prefix=f"ex-{uuid.uuid4()}"
    )
    assert stats.published == 1
    assert published(engine) == []
    assert body["event_id"] in {r.event_id for r in kafka.read(TOPIC, 1)}


def test_order_app_publishes_only_what_its_transaction_commits(outbox_engine: Engine) -> None:
    engine = outbox_engine
    with Session(engine) as session:
        Order.metadata.create_all(session.connection())
        session.commit()
    with Session(engine) as session, session.begin(), recorder(session) as rec:
        event_id = place_order(session, "carol", Decimal("5.50"))
        [event] = rec.events()  # visible inside the transaction, before the commit
        assert event.event_id == event_id
        assert event.value["total"] == "5.50"
        session.rollback()
    assert published(engine) == []  # rolled back with the order
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM orders")).scalar_one() == 0
