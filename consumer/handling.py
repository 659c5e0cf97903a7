"""Running the user's handler inside the runner's transaction, and checking what it left (I11).

Two execution adapters share one interface (``Transactions.open()`` yields a
``Transaction``), so the runner's loop is written once:

- ``SyncTransactions``: a ``Session`` on the runner's engine; the handler is called;
- ``AsyncTransactions``: an ``AsyncSession`` on an ``AsyncEngine`` of the same database,
  driven by a private event loop of the runner (its thread); the handler is awaited. The
  runner's own statements (dedup rows, dead letters) run in the same transaction through
  ``AsyncSession.run_sync``.

After each handler call the transaction is checked (the guard): still the one the runner
opened, still open, and not in PostgreSQL's failed-transaction state. A handler that
swallowed a database error, rolled back or committed fails as ``TransactionMisuse``, the
handler's own fault: COMMIT would otherwise turn into a silent ROLLBACK and count the
record as applied, and the next record in the batch would be charged for it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

from psycopg.pq import TransactionStatus
from sqlalchemy import Engine, event
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine
from sqlalchemy.orm import Session, SessionTransaction

from consumer.event import Event
from outbox.errors import ConfigError

T = TypeVar("T")

log = logging.getLogger("outbox.consumer")

Handler = Callable[[Any, Event], Any]


class HandlerMisdeclared(ConfigError):
    """``handle`` returns an awaitable or a generator without being ``async def``: nothing of
    what it does would ever run; the consumer refuses to start (or stops before committing)."""


class TransactionMisuse(Exception):
    """The handler left the runner's transaction unusable (dead-letter reason text)."""


class RetryLater(Exception):
    """Raise it from ``handle`` when a dependency of yours is down: the record is retried after
    ``delay`` seconds (default: the retry policy's backoff), never charged, never dead-lettered.
    """

    def __init__(self, message: str = "retry later", *, delay: float | None = None) -> None:
        super().__init__(message)
        if delay is not None and not delay >= 0:
            raise ConfigError(f"RetryLater(delay={delay!r}) must be >= 0 seconds")
        self.delay = delay


class HandlerCancelled(Exception):
    """An async handler was cancelled from inside (its own timeout or task): its fault."""


COMMIT_REFUSED = (
    "handle() called session.commit(): the runner commits, once, with the event's dedup record; "
    "remove the commit (use session.flush() to send the statements early)"
)
ROLLED_BACK = (
    "handle() rolled the transaction back (session.rollback() or session.close()): its effects "
    "and the dedup record are gone; raise an exception instead to fail the event"
)
SWALLOWED = (
    "handle() swallowed a database error and left the transaction aborted (PostgreSQL ignores "
    "every statement after it and COMMIT becomes ROLLBACK); wrap statements that may fail in "
    "session.begin_nested() (a savepoint), or let the error propagate"
)
LEFT_TASKS = (
    "handle() left {n} task running (asyncio.create_task without await; cancelled): it would "
    "have run inside a later record's transaction or after this one ended; await it before "
    "returning (asyncio.TaskGroup), or give background work its own session"
)
ENDED = (
    "handle() ended the transaction itself (COMMIT or ROLLBACK sent as SQL): the runner's "
    "transaction is no longer open; never end it from the handler"
)


def handler_is_async(cls: type, handle: Callable[..., Any]) -> bool:
    """Whether ``handle`` is ``async def``; a generator handler is refused (it would never run)."""
    where = f"{cls.__qualname__}.handle"
    if inspect.isasyncgenfunction(handle) or inspect.isgeneratorfunction(handle):
        raise HandlerMisdeclared(
            f"{where} is a generator function (it contains yield): its body would never run; "
            "write it as def handle(self, session, event) or async def handle(...) without yield"
        )
    return inspect.iscoroutinefunction(handle)


def refuse_result(cls: type, result: object) -> None:
    """A plain ``def handle`` returned a coroutine, awaitable or generator: nothing of it ran."""
    if result is None:
        return
    if inspect.isawaitable(result) or inspect.isgenerator(result):
        close = getattr(result, "close", None)
        if callable(close):
            close()  # no "coroutine was never awaited" warning: this error says it
        raise HandlerMisdeclared(
            f"{cls.__qualname__}.handle returned {type(result).__name__} without being declared "
            "async def: nothing of it ran; declare it `async def handle(self, session, event)` "
            "(it then gets an AsyncSession) or make it a plain function"
        )


class _GuardedSession(Session):
    """A Session whose commit is refused while the handler runs (the flag is per session)."""

    handler_running = False
    commit_refused = False


@event.listens_for(_GuardedSession, "before_commit")
def _refuse_commit(session: Session) -> None:
    if isinstance(session, _GuardedSession) and session.handler_running:
        session.commit_refused = True
        raise TransactionMisuse(COMMIT_REFUSED)


def transaction_fault(
    session: _GuardedSession, opened: SessionTransaction, status: TransactionStatus
) -> str | None:
    """What the handler did to the runner's transaction, or None when it is still usable."""
    if session.commit_refused:
        return COMMIT_REFUSED
    if not opened.is_active or session.get_transaction() is not opened:
        return ROLLED_BACK
    if status == TransactionStatus.INERROR:
        return SWALLOWED
    if status != TransactionStatus.INTRANS:
        return ENDED
    return None


class Transaction(Protocol):
    """One database transaction of the runner: its statements, and the handler inside it."""

    def run(self, work: Callable[[Session], T]) -> T:
        """Run the runner's own statements (``work(session)``) in this transaction."""

    def handle(self, event: Event) -> None:
        """Call the handler on ``event`` in this transaction, then check what it left."""


class Transactions(Protocol):
    def open(self) -> Any:
        """A context manager yielding a ``Transaction``: commits on exit, rolls back on error."""

    def autocommit(self) -> bool:
        """Whether the handler's connections run without transactions (AUTOCOMMIT)."""

    def close(self) -> None:
        """Release what the adapter holds (its engine, its event loop)."""


# The server's id of the open transaction: a COMMIT sent as SQL followed by more statements
# leaves the connection in a transaction again (the driver opens one), but another one. The
# transaction also marks itself with a SET LOCAL application_name, which the server reverts
# and reports to the client when the transaction ends: while the client sees the mark, it is
# the same transaction, known without a round trip; otherwise the id decides.
XACT_MARK = (
    "SELECT txid_current(), set_config('application_name', "
    "left(current_setting('application_name'), 40) || ' [outbox handling]', true)"
)
XACT_ID_NOW = "SELECT txid_current_if_assigned()"


def _check(cls: type, session: _GuardedSession, opened: SessionTransaction, raw: Any) -> None:
    fault = transaction_fault(session, opened, raw.info.transaction_status)
    if fault is not None:
        raise TransactionMisuse(fault)


def _marked(raw: Any, mark: tuple[object, object]) -> bool:
    """Whether the client still sees this transaction's mark (no round trip)."""
    return bool(raw.info.parameter_status("application_name") == mark[1])


def _check_same(mark: tuple[object, object], now: object) -> None:
    if now != mark[0]:
        raise TransactionMisuse(ENDED)


class _SyncTransaction:
    def __init__(self, session: _GuardedSession, handler: Handler, cls: type) -> None:
        self.session = session
        self.handler = handler
        self.cls = cls
        self.opened = session.get_transaction()
        self.mark: tuple[object, object] | None = None  # this transaction's id and mark

    def run(self, work: Callable[[Session], T]) -> T:
        return work(self.session)

    def handle(self, event: Event) -> None:
        session, opened = self.session, self.opened
        assert opened is not None
        connection = session.connection()
        raw = connection.connection.dbapi_connection
        if self.mark is None:
            self.mark = tuple(connection.exec_driver_sql(XACT_MARK).one())
        session.handler_running = True
        try:
            result = self.handler(session, event)
        finally:
            session.handler_running = False
        refuse_result(self.cls, result)
        _check(self.cls, session, opened, raw)
        if not _marked(raw, self.mark):
            _check_same(self.mark, session.connection().exec_driver_sql(XACT_ID_NOW).scalar())


class SyncTransactions:
    """Plain ``def handle(self, session, event)``: a Session on the runner's engine."""

    def __init__(self, engine: Engine, handler: Handler, cls: type) -> None:
        self.engine = engine
        self.handler = handler
        self.cls = cls

    @contextmanager
    def open(self) -> Iterator[_SyncTransaction]:
        with _GuardedSession(self.engine) as session, session.begin():
            yield _SyncTransaction(session, self.handler, self.cls)

    def autocommit(self) -> bool:
        with self.engine.connect() as conn:
            level = conn.get_execution_options().get("isolation_level")
            raw = conn.connection.dbapi_connection
            return level == "AUTOCOMMIT" or bool(getattr(raw, "autocommit", False))

    def close(self) -> None:
        """Nothing of its own: the runner disposes of the engine."""


class _AsyncTransaction:
    def __init__(self, owner: AsyncTransactions, session: AsyncSession) -> None:
        self.owner = owner
        self.session = session
        self.opened: SessionTransaction | None = None
        self.raw: Any = None  # the driver's connection of this transaction, once known
        self.mark: tuple[object, object] | None = None  # this transaction's id and mark

    def run(self, work: Callable[[Session], T]) -> T:
        result = self.owner.wait(self.session.run_sync(work))
        if self.opened is None:
            self.opened = self.session.sync_session.get_transaction()
        return result

    def handle(self, event: Event) -> None:
        self.owner.wait(self._handle(event))

    async def _handle(self, event: Event) -> None:
        session = self.session
        sync = session.sync_session
        assert isinstance(sync, _GuardedSession)
        if self.raw is None:
            connection = await session.connection()
            self.raw = (await connection.get_raw_connection()).driver_connection
            self.mark = tuple((await connection.exec_driver_sql(XACT_MARK)).one())
        raw = self.raw
        opened = self.opened or sync.get_transaction()
        assert opened is not None
        before = asyncio.all_tasks()
        left = 0
        sync.handler_running = True
        try:
            try:
                await self.owner.handler(session, event)
            finally:
                left = await _cancel_tasks_left(before)
                sync.handler_running = False
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # cancelled from outside: not the handler's doing
            raise HandlerCancelled("handle() was cancelled from inside (a timeout?)") from exc
        if left:
            raise TransactionMisuse(LEFT_TASKS.format(n=left))
        _check(self.owner.cls, sync, opened, raw)
        assert self.mark is not None
        if not _marked(raw, self.mark):
            now = await (await session.connection()).exec_driver_sql(XACT_ID_NOW)
            _check_same(self.mark, now.scalar())


CANCEL_GRACE = 5.0
"""Seconds the tasks a handler left running get to end once cancelled."""


async def _cancel_tasks_left(before: set[asyncio.Task[Any]]) -> int:
    """Cancel the tasks a handler started and did not await: the session they hold is the
    runner's, valid only while handle() runs. Returns how many were still running."""
    left = [t for t in asyncio.all_tasks() - before if not t.done()]
    for task in left:
        task.cancel()
    if left:  # a task that ignores its cancellation is left behind, not waited for forever
        _, stuck = await asyncio.wait(left, timeout=CANCEL_GRACE)
        for task in stuck:
            log.warning("a task handle() left running ignored its cancellation: %r", task)
    return len(left)


class AsyncTransactions:
    """``async def handle(self, session, event)``: an AsyncSession, awaited on the runner's
    private event loop (one per runner, in the runner's thread)."""

    def __init__(self, engine: AsyncEngine, handler: Handler, cls: type, *, owns: bool) -> None:
        self.engine = engine
        self.handler: Callable[[Any, Event], Awaitable[None]] = handler
        self.cls = cls
        self.owns = owns
        self._loop: asyncio.AbstractEventLoop | None = None

    def wait(self, awaitable: Awaitable[T]) -> T:
        if self._loop is None or self._loop.is_closed():
            self._loop = asyncio.new_event_loop()
        return self._loop.run_until_complete(awaitable)

    @contextmanager
    def open(self) -> Iterator[_AsyncTransaction]:
        session = AsyncSession(self.engine, sync_session_class=_GuardedSession)
        try:
            tx = _AsyncTransaction(self, session)
            try:
                yield tx
            except BaseException:
                self.wait(session.rollback())
                raise
            self.wait(session.commit())
        finally:
            self.wait(session.close())

    def autocommit(self) -> bool:
        return self.wait(self._autocommit())

    async def _autocommit(self) -> bool:
        level = self.engine.sync_engine.get_execution_options().get("isolation_level")
        async with self.engine.connect() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            return level == "AUTOCOMMIT" or bool(getattr(raw, "autocommit", False))

    def close(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            if self.owns:
                loop.run_until_complete(self.engine.dispose())
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()


def async_engine_for(db: URL | str, **options: Any) -> AsyncEngine:
    """An AsyncEngine on the same database as the runner's (psycopg's async driver)."""
    return create_async_engine(db, **options)
