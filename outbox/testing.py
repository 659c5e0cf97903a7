"""Helpers for testing an application that publishes through the outbox.

No relay and no broker are needed to check what your code published: the
events are rows of ``outbox_events``, visible to your own transaction before it
commits. ``published()`` reads them back decoded, as a consumer would decode
them::

    from outbox.testing import published

    def test_placing_an_order_publishes_order_placed(session):
        place_order(session, customer="alice", total=Decimal("19.99"))
        [event] = published(session, topic="orders.v1")
        assert event.value["total"] == 19.99
        assert event.header("event-type") == "OrderPlaced"

``recorder()`` scopes that to what a block of code published, and ``drain()``
publishes everything pending to a real broker in this process (the relay's
``--once``), for end-to-end tests.

Async code passes its ``AsyncSession``/``AsyncConnection``/``AsyncEngine`` and awaits:
``await published(async_session)``, ``async with arecorder(async_session) as rec:`` ...
``await rec.events()``, ``await adrain(url, servers)``.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, overload

from sqlalchemy import Connection, Engine
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from outbox import sql
from outbox.codec import CONTENT_TYPE_HEADER
from outbox.relay.config import RelayConfig

if TYPE_CHECKING:
    from consumer.event import Record
    from outbox.relay.worker import RelayStats

Bind = Session | Connection | Engine
AsyncBind = AsyncSession | AsyncConnection | AsyncEngine


@dataclass(frozen=True, slots=True)
class PublishedEvent:
    """One outbox row, decoded as the consumer decodes it."""

    row_id: int
    event_id: uuid.UUID
    topic: str
    key: bytes | None
    value: Any
    """Decoded by content type: JSON -> dict/list/..., text -> str, else bytes."""
    raw: bytes | None
    headers: Mapping[str, bytes] = field(default_factory=lambda: MappingProxyType({}))
    header_pairs: tuple[tuple[str, bytes], ...] = ()
    """Every header in order, including the outbox's own (event id, content type)."""

    def header(self, name: str) -> str | None:
        """Header ``name`` (case-insensitive) as text, or None."""
        wanted = name.lower()
        found = [v for k, v in self.header_pairs if k.lower() == wanted]
        return found[-1].decode("utf-8", "replace") if found else None

    @property
    def key_text(self) -> str | None:
        return None if self.key is None else self.key.decode("utf-8", "replace")

    def record(self, *, partition: int = 0, offset: int | None = None) -> Record:
        """The Kafka record a consumer would receive for this event (for consumer tests)."""
        from consumer.event import Record

        return Record(
            topic=self.topic,
            partition=partition,
            offset=self.row_id if offset is None else offset,
            key=self.key,
            value=self.raw,
            headers=self.header_pairs,
        )


def _execute(bind: Bind, statement: str, params: dict[str, Any]) -> list[Any]:
    """``statement`` (psycopg placeholders) in ``bind``'s transaction (an Engine: a new one)."""
    if isinstance(bind, Session) and not bind.in_transaction():
        # A closed or idle Session: reading through it would begin a transaction that nobody
        # ends, and hold a pooled connection until the garbage collector finds the Session.
        bind = bind.get_bind()
    if isinstance(bind, Engine):
        with bind.connect() as conn:
            return list(conn.exec_driver_sql(statement, params))
    conn = bind.connection() if isinstance(bind, Session) else bind
    return list(conn.exec_driver_sql(statement, params))


async def _aexecute(bind: AsyncBind, statement: str, params: dict[str, Any]) -> list[Any]:
    """``_execute`` for async binds: the same statement, awaited."""
    if isinstance(bind, AsyncSession) and not bind.in_transaction() and bind.bind is not None:
        bind = bind.bind  # as in `_execute`: begin nothing in an idle Session
    if isinstance(bind, AsyncEngine):
        async with bind.connect() as conn:
            return list(await conn.exec_driver_sql(statement, params))
    conn = await bind.connection() if isinstance(bind, AsyncSession) else bind
    return list(await conn.exec_driver_sql(statement, params))


def _decode(row: Any) -> PublishedEvent:
    from consumer.event import decode_value

    pairs = tuple(
        (str(n), bytes(v)) for n, v in zip(row.header_names, row.header_values, strict=True)
    )
    content_type = next(
        (v.decode() for n, v in reversed(pairs) if n.lower() == CONTENT_TYPE_HEADER), None
    )
    raw = None if row.value is None else bytes(row.value)
    return PublishedEvent(
        row_id=int(row.id),
        event_id=row.event_id,
        topic=row.topic,
        key=None if row.key is None else bytes(row.key),
        value=decode_value(raw, content_type),
        raw=raw,
        headers=MappingProxyType(dict(pairs)),
        header_pairs=pairs,
    )


@overload
def published(bind: Bind, *, topic: str | None = None, after: int = 0) -> list[PublishedEvent]: ...


@overload
def published(
    bind: AsyncBind, *, topic: str | None = None, after: int = 0
) -> Coroutine[Any, Any, list[PublishedEvent]]: ...


def published(
    bind: Bind | AsyncBind, *, topic: str | None = None, after: int = 0
) -> list[PublishedEvent] | Coroutine[Any, Any, list[PublishedEvent]]:
    """Events waiting in the outbox, oldest first, as ``bind``'s transaction sees them.

    Pass the Session or Connection your code published through to see its
    uncommitted events too; an Engine sees what committed. ``after`` skips
    rows up to that row id (see ``recorder()``). An async bind returns an
    awaitable: ``await published(async_session)``.
    """
    if isinstance(bind, AsyncSession | AsyncConnection | AsyncEngine):
        return apublished(bind, topic=topic, after=after)
    rows = _execute(bind, sql.PUBLISHED_AFTER, {"after": after, "topic": topic})
    return [_decode(row) for row in rows]


async def apublished(
    bind: AsyncBind, *, topic: str | None = None, after: int = 0
) -> list[PublishedEvent]:
    """``published()`` through an ``AsyncSession``, ``AsyncConnection`` or ``AsyncEngine``."""
    rows = await _aexecute(bind, sql.PUBLISHED_AFTER, {"after": after, "topic": topic})
    return [_decode(row) for row in rows]


class Recorder:
    """What was published after it started (see ``recorder()``)."""

    def __init__(self, bind: Bind) -> None:
        self.bind = bind
        self.after = int(_execute(bind, sql.LAST_EVENT_ID, {})[0][0])

    def events(self, topic: str | None = None) -> list[PublishedEvent]:
        return published(self.bind, topic=topic, after=self.after)


@contextmanager
def recorder(bind: Bind) -> Iterator[Recorder]:
    """Record the events published inside the block::

        with recorder(session) as rec:
            place_order(session, ...)
        assert [e.topic for e in rec.events()] == ["orders.v1"]

    Rows committed meanwhile by another transaction that started earlier can show up too.
    """
    yield Recorder(bind)


class AsyncRecorder:
    """What was published after it started, through an async bind (see ``arecorder()``)."""

    def __init__(self, bind: AsyncBind, after: int) -> None:
        self.bind = bind
        self.after = after

    async def events(self, topic: str | None = None) -> list[PublishedEvent]:
        return await apublished(self.bind, topic=topic, after=self.after)


@asynccontextmanager
async def arecorder(bind: AsyncBind) -> AsyncIterator[AsyncRecorder]:
    """``recorder()`` for async code::

    async with arecorder(session) as rec:
        await place_order(session, ...)
    assert [e.topic for e in await rec.events()] == ["orders.v1"]
    """
    after = int((await _aexecute(bind, sql.LAST_EVENT_ID, {}))[0][0])
    yield AsyncRecorder(bind, after)


def drain(db: str | Engine, bootstrap_servers: str, **options: Any) -> RelayStats:
    """Publish every pending event to a real broker in this process, then return.

    The relay's ``--once`` with ``RelayConfig`` ``options`` (``slots``,
    ``transactional_id_prefix``, ``producer_overrides``...); returns its stats.
    """
    from outbox.relay.coordinator import Relay

    dsn = db.url.render_as_string(hide_password=False) if isinstance(db, Engine) else db
    config = RelayConfig(dsn=dsn, bootstrap_servers=bootstrap_servers, once=True, **options)
    return Relay(config).run()


async def adrain(
    db: str | Engine | AsyncEngine, bootstrap_servers: str, **options: Any
) -> RelayStats:
    """``drain()`` from async code: the relay runs in a worker thread, the event loop goes on."""
    target = db.sync_engine if isinstance(db, AsyncEngine) else db
    return await asyncio.to_thread(drain, target, bootstrap_servers, **options)
