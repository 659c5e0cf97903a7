"""I1: publish() writes only through the caller's transaction; rollback means no event."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from outbox import EventError, configure, publish
from outbox.codec import EVENT_ID_HEADER
from outbox.partitioner import shard_for
from outbox.testing import published


def _pending(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM outbox_events")).scalar_one())


def _make_business_table(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE orders (id int PRIMARY KEY, total text)"))


def test_i1_rollback_of_business_transaction_leaves_no_event(engine: Engine) -> None:
    _make_business_table(engine)
    with Session(engine) as session:
        session.execute(text("INSERT INTO orders VALUES (1, '12.50')"))
        publish(session, topic="orders.v1", key="1", value={"order_id": 1})
        session.rollback()
    assert _pending(engine) == 0
    with engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM orders")).scalar_one() == 0


def test_i1_commit_stores_event_with_business_row(engine: Engine) -> None:
    _make_business_table(engine)
    with Session(engine) as session, session.begin():
        session.execute(text("INSERT INTO orders VALUES (1, '12.50')"))
        event_id = publish(
            session, topic="orders.v1", key="1", value={"order_id": 1}, headers={"event-type": "X"}
        )
    with engine.connect() as conn:
        row = conn.execute(
            text("SELECT event_id, topic, key, value, header_names FROM outbox_events")
        ).one()
    assert row.event_id == event_id
    assert (row.topic, bytes(row.key), bytes(row.value)) == ("orders.v1", b"1", b'{"order_id":1}')
    assert row.header_names == ["event-type", EVENT_ID_HEADER, "content-type"]


def test_i1_publish_never_commits_nor_opens_a_connection(engine: Engine) -> None:
    """The event is invisible to others until the caller commits, and uses the caller's backend."""
    with engine.connect() as conn:
        before_pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        publish(conn, topic="t", key=None, value="x")
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() == before_pid
        assert _pending(engine) == 0  # another session cannot see it: not committed
        assert conn.in_transaction()
        conn.commit()
    assert _pending(engine) == 1


def test_i1_engine_is_refused(engine: Engine) -> None:
    with pytest.raises(TypeError, match="Session or Connection"):
        publish(engine, topic="t", key=None, value="x")  # type: ignore[arg-type]


def test_i8_bad_value_fails_inside_the_transaction_before_commit(engine: Engine) -> None:
    _make_business_table(engine)
    with Session(engine) as session:
        session.execute(text("INSERT INTO orders VALUES (1, '1')"))
        with pytest.raises(TypeError, match="JSON-serialisable"):
            publish(session, topic="t", key="k", value=object())
        with pytest.raises(TypeError, match="JSON-serialisable"):
            publish(session, topic="t", key="k", value={"x": float("nan")})
        with pytest.raises(EventError, match="not a legal Kafka topic name"):
            publish(session, topic="bad topic!", key="k", value="v")
        # the caller's transaction is still usable: nothing reached the database
        publish(session, topic="t", key="k", value="fine")
        session.commit()
    assert _pending(engine) == 1


def test_i8_unstorable_header_names_and_deep_values_leave_the_callers_transaction_usable(
    engine: Engine,
) -> None:
    """A NUL in a header name reached PostgreSQL (raw DataError with the SQL, the caller's
    transaction aborted); a deeply nested value raised a bare RecursionError."""
    _make_business_table(engine)
    deep: list[object] = []
    for _ in range(5000):
        deep = [deep]
    with Session(engine) as session:
        session.execute(text("INSERT INTO orders VALUES (1, '1')"))
        with pytest.raises(EventError, match="header name 'a\\\\x00b' contains a NUL"):
            publish(session, topic="t", key="k", value="v", headers={"a\x00b": b"x"})
        with pytest.raises(TypeError, match="nested too deeply"):
            publish(session, topic="t", key="k", value=deep)
        publish(session, topic="t", key="k", value="fine")
        session.commit()
    assert _pending(engine) == 1


def test_i8_oversized_value_refused_when_limit_configured(engine: Engine) -> None:
    saved = configure().max_message_bytes
    configure(max_message_bytes=1000)
    try:
        with Session(engine) as session, pytest.raises(EventError, match="max_message_bytes=1000"):
            publish(session, topic="t", key="k", value=b"x" * 2000)
    finally:
        configure(max_message_bytes=saved)


def test_i8_publish_refuses_values_over_1_mb_by_default_naming_the_setting(
    engine: Engine,
) -> None:
    """Bounded memory: without a configured limit, publish() took 100 MB values."""
    with Session(engine) as session, session.begin():
        with pytest.raises(EventError, match=r"outbox\.configure\(max_message_bytes="):
            publish(session, topic="t", key="k", value=b"x" * 1_000_001)
        publish(session, topic="t", key="k", value=b"x" * 900_000)
    assert _pending(engine) == 1


def test_event_id_is_an_idempotency_key_while_pending(engine: Engine) -> None:
    event_id = uuid.uuid4()
    for value in ("first", "second"):
        with Session(engine) as session, session.begin():
            assert publish(session, topic="t", key="k", value=value, event_id=event_id) == event_id
    assert [e.value for e in published(engine)] == ["first"]


def test_one_notify_per_transaction_and_shard_and_none_when_disabled(
    engine: Engine, database_url: str
) -> None:
    dsn = database_url.replace("postgresql+psycopg", "postgresql")
    keys = [f"key-{i}" for i in range(6)] * 2  # each key twice: its shard is notified once
    shards = {shard_for(k.encode(), uuid.uuid4()) for k in keys}
    assert 1 < len(shards) < len(keys)
    with psycopg.connect(dsn, autocommit=True) as listener:
        listener.execute("LISTEN outbox_events")
        with Session(engine) as session, session.begin():
            for key in keys:
                publish(session, topic="t", key=key, value="v")
        got = list(listener.notifies(timeout=2, stop_after=len(keys)))
        assert sorted(int(n.payload) for n in got) == sorted(shards)
        with Session(engine) as session, session.begin():
            publish(session, topic="t", key="k", value="v", notify=False)
        assert list(listener.notifies(timeout=0.5)) == []
        with Session(engine) as session, session.begin():
            publish(session, topic="t", key="k", value="v")
        (note,) = listener.notifies(timeout=2, stop_after=1)
        assert int(note.payload) == shard_for(b"k", uuid.uuid4())


async def _apublish_and_rollback(url: str) -> tuple[int, uuid.UUID]:
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    from outbox import apublish

    aengine = create_async_engine(url)
    try:
        async with AsyncSession(aengine) as session:
            await apublish(session, topic="t", key="k", value={"a": 1})
            await session.rollback()
        async with AsyncSession(aengine) as session, session.begin():
            event_id = await apublish(session, topic="t", key="k", value={"a": 2})
        async with aengine.connect() as conn:
            n = (await conn.execute(text("SELECT count(*) FROM outbox_events"))).scalar_one()
        return int(n), event_id
    finally:
        await aengine.dispose()


def test_i1_apublish_async_session_commits_and_rolls_back_with_caller(database_url: str) -> None:
    import asyncio

    n, event_id = asyncio.run(_apublish_and_rollback(database_url))
    assert n == 1
    engine = create_engine(database_url)
    assert [e.event_id for e in published(engine)] == [event_id]
    engine.dispose()
