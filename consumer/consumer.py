"""The user's side of a deduplicating consumer: ``IdempotentConsumer`` holds only what the user
writes (topics, group, ``handle``, ``dedup_key``, ``on_committed``, settings); the loop is a
``consumer.runner.ConsumerRunner`` that holds it (I5, I7, I11).

The runner lives in one name-mangled attribute, created at first use; the few public names
below only delegate to it. A user's own attribute or method of any other name (``config``,
``stats``, ``engine``, ``_process``, ...) never reaches the loop, and one of the view names
(``stop``, ``stats``, ``config``, ``engine``, ``assignment``, ``joined``) set on the instance
only hides the view: the runner keeps its own.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from types import EllipsisType
from typing import Any, ClassVar

from sqlalchemy import Engine
from sqlalchemy.ext.asyncio import AsyncEngine

from consumer.config import DEFAULT_DEDUP_WINDOW, ConsumerConfig, parse_topics
from consumer.event import Event, EventTypes, Record
from consumer.handling import handler_is_async
from consumer.outcomes import DeadLetterError
from consumer.retry import RetryPolicy
from consumer.runner import ConsumerRunner
from consumer.stats import ConsumerStats
from outbox.codec import JSON
from outbox.db import sqlalchemy_url
from outbox.errors import ConfigError

__all__ = ["ConsumerStats", "DeadLetterError", "IdempotentConsumer", "consume", "runner_of"]

_STATE = "_IdempotentConsumer__state"
"""Where ``IdempotentConsumer.__init__`` keeps its runner's setup (``self.__state``)."""


@dataclass(slots=True)
class _State:
    config: ConsumerConfig
    db: str | Engine | AsyncEngine
    stop: threading.Event | None
    runner: ConsumerRunner | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)  # run() in a thread, stop here


class _RunnerView:
    """A read-only view of the runner's attribute of the same name. A non-data descriptor: a
    user's own instance attribute of that name hides it, and the runner never reads it (typed
    ``Any`` so that a user's own attribute of any type type-checks; ``runner_of()`` is typed)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: IdempotentConsumer | None, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(runner_of(obj), self.name)


class IdempotentConsumer:
    """Subclass it, set ``topics`` and ``group_id``, implement ``handle``, call ``run()``.

    ``handle(session, event)`` runs inside the database transaction that also
    records ``event.id`` as processed for ``group_id``; write through
    ``session`` (and ``outbox.publish(session, ...)`` for downstream events) and
    never commit it yourself. Class attributes give the defaults; the
    constructor's keyword arguments override them per instance. ``stop`` is a
    ``threading.Event``: set it (the CLI does on SIGTERM/SIGINT) and ``run()``
    returns after the record in hand. The loop is a ``ConsumerRunner``
    (``consumer.runner_of(self)``): name your own attributes as you like.
    """

    topics: ClassVar[Sequence[str]] = ()
    group_id: ClassVar[str] = ""
    batch_size: ClassVar[int] = 100
    retry: ClassVar[RetryPolicy] = RetryPolicy()
    event_types: ClassVar[EventTypes | None] = None
    dedup_window: ClassVar[timedelta | None] = DEFAULT_DEDUP_WINDOW
    purge_interval: ClassVar[float] = 600.0
    consumer_settings: ClassVar[Mapping[str, str]] = {}
    default_content_type: ClassVar[str] = JSON

    # Views of the runner's state (read-only; see the module docstring).
    stop = _RunnerView()
    stats = _RunnerView()
    config = _RunnerView()
    engine = _RunnerView()
    assignment = _RunnerView()
    joined = _RunnerView()

    def __init__(
        self,
        db: str | Engine | AsyncEngine,
        bootstrap_servers: str,
        *,
        topics: Sequence[str] | None = None,
        group_id: str | None = None,
        batch_size: int | None = None,
        retry: RetryPolicy | None = None,
        settings: Mapping[str, str] | None = None,
        dedup_window: timedelta | EllipsisType | None = ...,
        purge_interval: float | None = None,
        poll_timeout: float = 1.0,
        stop: threading.Event | None = None,
    ) -> None:
        cls = type(self)
        if cls.handle is IdempotentConsumer.handle:
            raise ConfigError(
                f"{cls.__qualname__} does not implement handle(self, session, event): "
                "override it with the code that applies one event"
            )
        config = ConsumerConfig(
            bootstrap_servers=bootstrap_servers,
            topics=parse_topics(topics if topics is not None else cls.topics),
            group_id=group_id if group_id is not None else cls.group_id,
            batch_size=batch_size if batch_size is not None else cls.batch_size,
            poll_timeout=poll_timeout,
            retry=retry if retry is not None else cls.retry,
            settings={**cls.consumer_settings, **(settings or {})},
            dedup_window=(
                cls.dedup_window if isinstance(dedup_window, EllipsisType) else dedup_window
            ),
            purge_interval=purge_interval if purge_interval is not None else cls.purge_interval,
            default_content_type=cls.default_content_type,
        )
        if cls.event_types is not None and not isinstance(cls.event_types, EventTypes):
            raise ConfigError(f"{cls.__qualname__}.event_types must be an EventTypes registry")
        handler_is_async(cls, cls.handle)  # a generator handler is refused here, with the fix
        if isinstance(db, str):
            sqlalchemy_url(db)  # a malformed URL is refused here, with the fix
        self.__state = _State(config, db, stop)

    # -- the user's part ---------------------------------------------------------

    def handle(self, session: Any, event: Event) -> Awaitable[None] | None:
        """Apply one event through ``session`` (inside the dedup transaction). Override this.

        ``def handle(self, session: Session, event)`` gets a ``Session``;
        ``async def handle(self, session: AsyncSession, event)`` gets an ``AsyncSession`` on
        the same database, and is awaited. Never commit, roll back or swallow a database
        error without a savepoint (``session.begin_nested()``): the event then fails.
        """
        raise NotImplementedError

    def dedup_key(self, record: Record) -> str | None:
        """The dedup key of a record that did not come through the outbox (no ``outbox-event-id``).

        Override for other producers' records (e.g. return a message-id header);
        None falls back to ``topic/partition/offset``, which only catches re-reads
        of the same record, not the same event produced twice.
        """
        return None

    def on_committed(self, events: Sequence[Event]) -> None:
        """Called after the DB transaction that applied ``events`` committed, before the
        Kafka offsets are committed (metrics, cache invalidation). Must not raise."""

    # -- delegates to the runner -------------------------------------------------------

    def run(self) -> ConsumerStats:
        """Consume until ``stop`` is set; returns the counters."""
        return runner_of(self).run()

    async def run_async(self) -> ConsumerStats:
        """``run()`` for an application's own event loop (e.g. a FastAPI lifespan task): the
        loop runs in a worker thread; cancelling the task stops it after the record in hand."""
        return await runner_of(self).run_async()

    def close(self) -> None:
        """Release the engines and the event loop a consumer that never ran holds (one built
        by ``consumer.testing.consumer_for_tests``); ``run()`` does this itself."""
        runner_of(self).close()

    def liveness(self) -> tuple[bool, str]:
        return runner_of(self).liveness()

    def readiness(self) -> tuple[bool, str]:
        return runner_of(self).readiness()

    def lag(self) -> dict[tuple[str, int], int]:
        return runner_of(self).lag()


def runner_of(consumer: IdempotentConsumer) -> ConsumerRunner:
    """The runner of ``consumer`` (created at first use, one per consumer object)."""
    state = vars(consumer).get(_STATE)
    if not isinstance(state, _State):
        raise ConfigError(
            f"{type(consumer).__qualname__}.__init__ did not call super().__init__(db, "
            "bootstrap_servers, ...): add that call"
        )
    with state.lock:
        if state.runner is None:
            state.runner = ConsumerRunner(
                consumer,
                state.config,
                state.db,
                stop=state.stop,
                event_types=type(consumer).event_types,
            )
        return state.runner


def consume(
    handle: Callable[[Any, Event], Any],
    db: str | Engine | AsyncEngine,
    bootstrap_servers: str,
    *,
    topics: Sequence[str],
    group_id: str,
    **options: Any,
) -> IdempotentConsumer:
    """A consumer whose handler is a plain function ``handle(session, event)`` (``def`` or
    ``async def``), with every guarantee of a subclass's; ``options`` are the constructor's.
    ``consume(project, DB, KAFKA, topics=["orders.v1"], group_id="projector").run()``."""
    name = getattr(handle, "__name__", "handle")
    method: Callable[..., Any]
    if inspect.iscoroutinefunction(handle):

        async def method(self: IdempotentConsumer, session: Any, event: Event) -> None:
            await handle(session, event)

    elif inspect.isgeneratorfunction(handle) or inspect.isasyncgenfunction(handle):
        method = handle  # refused by the constructor, naming the fix
    else:

        def method(self: IdempotentConsumer, session: Any, event: Event) -> Any:
            return handle(session, event)  # an awaitable returned is refused (I11)

    cls = type(
        name,
        (IdempotentConsumer,),
        {
            "handle": method,
            "topics": tuple(topics),
            "group_id": group_id,
            "__module__": getattr(handle, "__module__", __name__),
            "__qualname__": getattr(handle, "__qualname__", name),
        },
    )
    consumer: IdempotentConsumer = cls(db, bootstrap_servers, **options)
    return consumer
