"""``outbox.testing`` and ``consumer.testing`` on the real database (and broker for ``drain``),
plus what publish() does with types and a schema nobody migrated."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import ClassVar

import pytest
from sqlalchemy import Column, Engine, MetaData, String, Table, create_engine, select
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.orm import Session
from sqlalchemy.pool import QueuePool

from consumer import Event, IdempotentConsumer, Record, UndecodableEvent
from consumer.testing import consumer_for_tests, deliver, record
from outbox import NotMigrated, apublish, configure, publish
from outbox.testing import drain, published, recorder
from tests.support import KafkaReader

effects_metadata = MetaData()
effects = Table(
    "test_helper_effects",
    effects_metadata,
    Column("event_id", String, primary_key=True),
    Column("customer", String, nullable=False),
)


class Projector(IdempotentConsumer):
    topics: ClassVar[list[str]] = ["orders"]
    group_id = "helpers-test"

    def handle(self, session: Session, event: Event) -> None:
        if event.value.get("fail"):
            raise RuntimeError("handler refused the event")
        session.execute(effects.insert().values(event_id=event.id, customer=event.value["c"]))


@pytest.fixture
def projector(engine: Engine) -> Projector:
    effects_metadata.create_all(engine)
    return consumer_for_tests(Projector, engine)


def _effects(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(effects.c.customer)).scalars())


def test_published_shows_a_transactions_events_before_commit_and_nothing_after_rollback(
    engine: Engine, topic: str
) -> None:
    with Session(engine) as session, session.begin():
        event_id = publish(
            session,
            topic=topic,
            key="order-1",
            value={"total": Decimal("9.90"), "at": datetime(2026, 1, 2, tzinfo=UTC)},
            headers={"event-type": "OrderPlaced"},
        )
        publish(session, topic="other", key=None, value="text")
        [event] = published(session, topic=topic)
        assert published(engine) == []  # not committed yet
        session.rollback()
    assert published(engine) == []
    assert event.event_id == event_id
    assert event.key_text == "order-1"
    assert event.value == {"total": 9.9, "at": "2026-01-02T00:00:00+00:00"}
    assert event.header("event-type") == "OrderPlaced"


def test_recorder_sees_only_what_the_block_published(engine: Engine, topic: str) -> None:
    with Session(engine) as session, session.begin():
        publish(session, topic=topic, key="before", value={})
    with Session(engine) as session, session.begin(), recorder(session) as rec:
        publish(session, topic=topic, key="inside", value={})
    assert [e.key_text for e in rec.events()] == ["inside"]
    assert [e.key_text for e in published(engine, topic=topic)] == ["before", "inside"]


def _checked_out(engine: Engine) -> int:
    assert isinstance(engine.pool, QueuePool)
    return engine.pool.checkedout()


def test_a_recorder_read_after_its_session_closed_begins_nothing_and_holds_no_connection(
    engine: Engine, topic: str
) -> None:
    with Session(engine) as session, session.begin(), recorder(session) as rec:
        publish(session, topic=topic, key="inside", value={})
    assert [e.key_text for e in rec.events()] == ["inside"]
    assert [e.key_text for e in published(session, topic=topic)] == ["inside"]
    assert not session.in_transaction(), "the read began a transaction in the closed Session"
    assert _checked_out(engine) == 0, "the read left a pooled connection checked out"


def test_i1_published_through_a_session_joined_to_an_outer_transaction_sees_its_events(
    engine: Engine, topic: str
) -> None:
    """The "test in a transaction rolled back at the end" pattern: the Session committed its
    savepoint and is idle, the events are still uncommitted in the Connection it is bound to;
    reading through the Session must see them, and the Engine must not."""
    with engine.connect() as conn, conn.begin() as outer:
        session = Session(bind=conn, join_transaction_mode="create_savepoint")
        with session.begin(), recorder(session) as rec:
            publish(session, topic=topic, key="joined", value={})
        assert not session.in_transaction()
        assert [e.key_text for e in published(session, topic=topic)] == ["joined"]
        assert [e.key_text for e in rec.events(topic)] == ["joined"]
        assert published(engine, topic=topic) == []
        session.close()
        outer.rollback()
    assert published(engine, topic=topic) == []


def test_deliver_applies_once_with_dedup_and_rolls_back_a_failing_handler(
    engine: Engine, projector: Projector, topic: str
) -> None:
    with Session(engine) as session, session.begin():
        publish(session, topic=topic, key="k", value={"c": "alice"})
    [event] = published(engine, topic=topic)
    assert deliver(projector, event) is True
    assert deliver(projector, event) is False  # the same event id: skipped
    failing = record(topic, {"c": "bob", "fail": True})
    with pytest.raises(RuntimeError, match="handler refused"):
        deliver(projector, failing)
    assert _effects(engine) == ["alice"]
    assert deliver(projector, record(topic, {"c": "bob"}, event_id=uuid.uuid4())) is True
    garbled = Record(topic, 0, 7, None, b"{not json", (("content-type", b"application/json"),))
    with pytest.raises(UndecodableEvent):
        deliver(projector, garbled)
    assert sorted(_effects(engine)) == ["alice", "bob"]


def test_drain_publishes_pending_events_to_the_real_broker(
    engine: Engine, database_url: str, bootstrap_servers: str, topic: str, kafka: KafkaReader
) -> None:
    with Session(engine) as session, session.begin():
        ids = [str(publish(session, topic=topic, key=f"k{i}", value={"i": i})) for i in range(3)]
    stats = drain(engine, bootstrap_servers, transactional_id_prefix=f"drain-{uuid.uuid4()}")
    assert stats.published == 3
    assert published(engine) == []
    assert sorted(r.event_id for r in kafka.read(topic, 3)) == sorted(ids)


class Cents:
    def __init__(self, n: int) -> None:
        self.n = n


def test_custom_encoder_per_call_and_through_configure(engine: Engine, topic: str) -> None:
    def per_call(obj: object) -> object:
        if isinstance(obj, Cents):
            return f"{obj.n} cents"
        raise TypeError

    def configured(obj: object) -> object:
        if isinstance(obj, Cents):
            return obj.n
        raise TypeError

    with Session(engine) as session, session.begin():
        with pytest.raises(TypeError, match="json_default"):
            publish(session, topic=topic, key=None, value={"p": Cents(5)})
        publish(session, topic=topic, key="call", value={"p": Cents(5)}, json_default=per_call)
        previous = configure().json_default  # configure() returns the settings after it
        configure(json_default=configured)
        try:
            publish(session, topic=topic, key="configured", value={"p": Cents(5)})
            publish(session, topic=topic, key="call wins", value=[Cents(5)], json_default=per_call)
        finally:
            configure(json_default=previous)
    values = {e.key_text: e.value for e in published(engine, topic=topic)}
    assert values == {"call": {"p": "5 cents"}, "configured": {"p": 5}, "call wins": ["5 cents"]}


def test_publish_on_an_unmigrated_database_raises_the_librarys_error(
    unmigrated_database_url: str,
) -> None:
    engine = create_engine(unmigrated_database_url)
    try:
        with Session(engine) as session, session.begin():
            with pytest.raises(NotMigrated, match="run `outbox migrate"):
                publish(session, topic="t", key=None, value={"a": 1})
            session.rollback()
    finally:
        engine.dispose()


def test_apublish_on_an_unmigrated_database_raises_the_librarys_error(
    unmigrated_database_url: str,
) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession

    async def attempt() -> None:
        engine = create_async_engine(unmigrated_database_url)
        try:
            async with AsyncSession(engine) as session, session.begin():
                with pytest.raises(NotMigrated, match="run `outbox migrate"):
                    await apublish(session, topic="t", key=None, value={"a": 1})
                await session.rollback()
        finally:
            await engine.dispose()

    asyncio.run(attempt())


def test_i1_published_and_arecorder_see_an_async_sessions_uncommitted_events(
    database_url: str, topic: str
) -> None:
    """Async apps test with the same helpers: awaited, inside their own transaction."""
    from sqlalchemy.ext.asyncio import AsyncSession

    from outbox.testing import arecorder

    async def scenario() -> tuple[list[str], list[str], int, int]:
        engine = create_async_engine(database_url)
        try:
            async with AsyncSession(engine) as session, session.begin():
                await apublish(session, topic=topic, key="before", value={"n": 0})
            async with AsyncSession(engine) as session, session.begin():
                async with arecorder(session) as rec:
                    await apublish(session, topic=topic, key="inside", value={"n": 1})
                inside = [e.key_text or "" for e in await rec.events()]
                seen = [e.key_text or "" for e in await published(session, topic=topic)]
                committed_meanwhile = len(await published(engine))
                await session.rollback()
                assert len(await published(session, topic=topic)) == 1
                assert not session.in_transaction(), "the read began a transaction nobody ends"
            async with engine.connect() as conn:
                after_rollback = len(await published(conn, topic=topic))
            assert _checked_out(engine.sync_engine) == 0
        finally:
            await engine.dispose()
        return inside, seen, committed_meanwhile, after_rollback

    inside, seen, committed_meanwhile, after_rollback = asyncio.run(scenario())
    assert inside == ["inside"]
    assert seen == ["before", "inside"]
    assert committed_meanwhile == 1  # the engine sees only what committed
    assert after_rollback == 1  # the rolled-back event is gone


def test_adrain_publishes_pending_events_from_async_code(
    database_url: str, bootstrap_servers: str, topic: str, kafka: KafkaReader
) -> None:
    from outbox.testing import adrain

    async def scenario() -> int:
        engine = create_async_engine(database_url)
        try:
            from sqlalchemy.ext.asyncio import AsyncSession

            async with AsyncSession(engine) as session, session.begin():
                await apublish(session, topic=topic, key="k", value={"n": 1})
            stats = await adrain(
                engine, bootstrap_servers, transactional_id_prefix=f"ad-{uuid.uuid4()}"
            )
            assert await published(engine) == []
            return stats.published
        finally:
            await engine.dispose()

    assert asyncio.run(scenario()) == 1
    assert len(kafka.read(topic, 1)) == 1


def test_i1_published_reads_an_async_sessions_uncommitted_event(
    database_url: str, topic: str
) -> None:
    from sqlalchemy.ext.asyncio import AsyncSession

    async def scenario() -> list[str]:
        engine = create_async_engine(database_url)
        try:
            async with AsyncSession(engine) as session, session.begin():
                await apublish(session, topic=topic, key="mine", value={})
                return [e.key_text or "" for e in await published(session, topic=topic)]
        finally:
            await engine.dispose()

    assert asyncio.run(scenario()) == ["mine"]
