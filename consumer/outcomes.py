"""How a record's handling ended, and the errors the runner raises or records (I7, I11)."""

from __future__ import annotations

from enum import Enum

from consumer.deadletter import describe
from outbox.errors import OutboxError


class DeadLetterError(OutboxError):
    """A record could not even be dead-lettered (e.g. an illegal DLT topic): the consumer stops."""


class ConsumerDied(Exception):
    """The error of a record whose attempts were used up by runs that never finished."""


class HandlerFailed(Exception):
    """The handler of ``items[index]`` failed inside a batch (never calls ``str(error)``,
    which may raise)."""

    def __init__(self, index: int, error: Exception, fresh: frozenset[str]) -> None:
        super().__init__(f"handler failed: {type(error).__name__}")
        self.index = index
        self.error = error
        self.fresh = fresh  # the keys this batch's transaction recorded as processed


_ENDS_RUN = (KeyboardInterrupt, SystemExit)
"""What a handler raises that ends run(); anything else it raises is the record's failure."""


def as_exception(exc: BaseException) -> Exception:
    """A handler's failure as an Exception (a BaseException subclass of the user's, an
    ``asyncio.CancelledError`` of its own, wrapped)."""
    if isinstance(exc, _ENDS_RUN):
        raise exc
    if isinstance(exc, Exception):
        return exc
    wrapped = RuntimeError(f"handle() raised {type(exc).__name__}: {describe(exc)}")
    wrapped.__cause__ = exc
    return wrapped


class Outcome(Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    DEAD_LETTERED = "dead-lettered"
    NOT_DEAD_LETTERED = "not-dead-lettered"  # a record of a dead-letter topic failed
