"""What to do after a handler fails: retry after a delay, or dead-letter (I7). Pure, no I/O.

Two kinds of failure are told apart:

- **the message's fault** (the handler raised): counted against
  ``RetryPolicy.attempts``, then dead-lettered; exception types listed in
  ``non_retryable`` are dead-lettered at once;
- **the infrastructure's fault** (the database connection dropped, a
  serialization failure or deadlock, too many connections): retried without
  limit and never dead-lettered, because the message is fine and a dead letter
  would need that same database anyway.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import TypeVar

import psycopg
from sqlalchemy import exc as sa_exc

from consumer.handling import RetryLater
from outbox.errors import ConfigError

E = TypeVar("E", bound=BaseException)

# SQLSTATEs that say "try again later", not "this message is bad" (I10): they never
# count against a record, never produce a dead letter.
TRANSIENT_SQLSTATES = frozenset(
    {
        "25006",  # read_only_sql_transaction: a failover in progress, or a standby
        "40000",  # transaction_rollback
        "40001",  # serialization_failure
        "40003",  # statement_completion_unknown
        "40P01",  # deadlock_detected
        "58000",  # system_error
        "58030",  # io_error
        "72000",  # snapshot_too_old
    }
)
TRANSIENT_SQLSTATE_CLASSES = frozenset(
    {
        "08",  # connection exception
        "57",  # operator intervention: admin/crash shutdown, cannot connect now, idle timeout
    }
)
# Faults that are the database's OR the record's (a query that always runs past the
# statement timeout, a statement with too many parameters, a handler holding its
# transaction open too long): waited out while the database is unhealthy or for a
# bounded time (``RetryPolicy.stuck_budget``), then the record's fault.
AMBIGUOUS_SQLSTATES = frozenset(
    {
        "25P03",  # idle_in_transaction_session_timeout
        "55P03",  # lock_not_available: lock_timeout, NOWAIT
        "57014",  # query_canceled: statement_timeout, pg_cancel_backend
    }
)
AMBIGUOUS_SQLSTATE_CLASSES = frozenset(
    {
        "53",  # insufficient resources: disk full, out of memory, too many connections
    }
)


def transient_sqlstate(code: str) -> bool:
    """Whether a PostgreSQL error code may be the database's passing state (not surely the
    record's fault): for the runner's own statements, always retried."""
    return (
        code in TRANSIENT_SQLSTATES
        or code[:2] in TRANSIENT_SQLSTATE_CLASSES
        or ambiguous_sqlstate(code)
    )


def ambiguous_sqlstate(code: str) -> bool:
    return code in AMBIGUOUS_SQLSTATES or code[:2] in AMBIGUOUS_SQLSTATE_CLASSES


class Fault(Enum):
    """Who is at fault for a handler's failure, by what caused it."""

    RECORD = "record"  # the handler's own error: counted against the record's attempts
    DATABASE = "database"  # a lost connection, a failover, a deadlock: never counted
    AMBIGUOUS = "ambiguous"  # a timeout or resource error: the database's while it is unhealthy
    RETRY_LATER = "retry-later"  # the handler said so (consumer.RetryLater): never counted


_MIN_OUTAGE_DELAY = 0.1
"""Never hammer a database that is down, even with a zero backoff policy."""


class Action(Enum):
    RETRY = "retry"
    DEAD_LETTER = "dead-letter"


class Reason(StrEnum):
    """Why a message was dead-lettered; sent as the ``dlt-reason`` header."""

    RETRIES_EXHAUSTED = "retries-exhausted"
    NON_RETRYABLE = "non-retryable"
    UNDECODABLE = "undecodable"
    CONSUMER_DIED = "consumer-died"
    """Its attempts were used up by runs that never finished: the process died in them."""
    STUCK = "stuck"
    """It kept hitting a timeout or resource error for ``RetryPolicy.stuck_budget`` seconds
    while a fresh connection to the database worked: the record's fault."""


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    delay: float = 0.0
    reason: Reason | None = None
    counted: bool = True
    """False for infrastructure failures: they do not use up the message's attempts."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how patiently a failing handler is retried before its message is dead-lettered.

    ``attempts`` counts every call of the handler, the first one included, so
    ``attempts=1`` means "no retries". Delays grow as ``initial_backoff *
    multiplier ** (n - 1)``, capped at ``max_backoff``, with +-``jitter`` spread
    so that many consumers do not retry in lockstep. The consumer does not poll
    Kafka while it waits, so the sum of the delays must stay below
    ``max.poll.interval.ms`` (checked by ``ConsumerConfig``).
    """

    attempts: int = 3
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.1
    non_retryable: tuple[type[BaseException], ...] = field(default=())
    stuck_budget: float = 60.0
    """Seconds a record may keep failing with a timeout or resource error (statement or lock
    timeout, SQLSTATE class 53, a client-side OperationalError) while the database answers a
    fresh connection, before it is dead-lettered as ``stuck``; well below
    ``max.poll.interval.ms`` (the consumer keeps polling, paused, while it waits)."""

    def __post_init__(self) -> None:
        if not isinstance(self.attempts, int) or not 1 <= self.attempts <= 100:
            raise ConfigError(
                f"RetryPolicy(attempts={self.attempts!r}) must be an int from 1 (no retries) to 100"
            )
        if self.initial_backoff < 0 or self.max_backoff < 0:
            raise ConfigError(
                "RetryPolicy backoff must be >= 0 seconds "
                f"(initial_backoff={self.initial_backoff}, max_backoff={self.max_backoff})"
            )
        if self.max_backoff < self.initial_backoff:
            raise ConfigError(
                f"RetryPolicy(max_backoff={self.max_backoff}) is below initial_backoff="
                f"{self.initial_backoff}: raise max_backoff"
            )
        if not self.stuck_budget >= 0:
            raise ConfigError(f"RetryPolicy(stuck_budget={self.stuck_budget!r}) must be >= 0")
        if self.multiplier < 1:
            raise ConfigError(f"RetryPolicy(multiplier={self.multiplier}) must be >= 1")
        if not 0 <= self.jitter < 1:
            raise ConfigError(f"RetryPolicy(jitter={self.jitter}) must be in [0, 1)")
        bad = [
            t
            for t in self.non_retryable
            if not (isinstance(t, type) and issubclass(t, BaseException))
        ]
        if bad:
            raise ConfigError(
                f"RetryPolicy(non_retryable=...) must hold exception classes, got {bad!r}"
            )

    def backoff(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after the ``failures``-th failure (1-based)."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** max(failures - 1, 0))
        if not self.jitter or not base:
            return base
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        return min(self.max_backoff, base * (1 + spread))

    def worst_case_seconds(self) -> float:
        """Longest time one message can spend in retries (every delay at its jittered maximum)."""
        return sum(
            min(self.max_backoff, self.initial_backoff * self.multiplier ** (n - 1))
            * (1 + self.jitter)
            for n in range(1, self.attempts)
        )

    def decide(
        self,
        error: BaseException,
        failures: int,
        outages: int = 0,
        rng: random.Random | None = None,
        *,
        stuck_for: float = 0.0,
        database_healthy: Callable[[], bool] = lambda: True,
    ) -> Decision:
        """Retry or dead-letter, after the handler raised ``error``.

        ``failures``: earlier failures of this message counted against ``attempts``;
        ``outages``: earlier infrastructure failures in a row (they only lengthen the delay);
        ``stuck_for``: seconds since the record's first timeout/resource error in a row;
        ``database_healthy``: probes the database (asked only once ``stuck_budget`` is spent).
        """
        fault = classify(error)
        if fault is Fault.RETRY_LATER:
            later = _find(error, RetryLater)
            delay = later.delay if later is not None and later.delay is not None else None
            if delay is None:
                delay = max(_MIN_OUTAGE_DELAY, self.backoff(outages + 1, rng))
            return Decision(Action.RETRY, delay, counted=False)
        if fault is Fault.AMBIGUOUS and stuck_for >= self.stuck_budget and database_healthy():
            return Decision(Action.DEAD_LETTER, reason=Reason.STUCK)
        if fault is not Fault.RECORD:
            delay = max(_MIN_OUTAGE_DELAY, self.backoff(outages + 1, rng))
            return Decision(Action.RETRY, delay, counted=False)
        if isinstance(error, self.non_retryable):
            return Decision(Action.DEAD_LETTER, reason=Reason.NON_RETRYABLE)
        if failures + 1 >= self.attempts:
            return Decision(Action.DEAD_LETTER, reason=Reason.RETRIES_EXHAUSTED)
        return Decision(Action.RETRY, self.backoff(failures + 1, rng))


def sqlstate(error: BaseException) -> str | None:
    """The PostgreSQL error code behind a psycopg or SQLAlchemy exception, if any."""
    orig = getattr(error, "orig", error)
    code = getattr(orig, "sqlstate", None)
    return code if isinstance(code, str) else None


def _own_fault(error: BaseException) -> Fault:
    """The fault of one exception, without looking at what caused it."""
    if isinstance(error, RetryLater):
        return Fault.RETRY_LATER
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return Fault.DATABASE
    if isinstance(error, sa_exc.TimeoutError | sa_exc.InterfaceError | psycopg.InterfaceError):
        return Fault.DATABASE  # pool exhausted, connection closed under us
    code = sqlstate(error)
    if code is not None:
        if ambiguous_sqlstate(code):
            return Fault.AMBIGUOUS
        return Fault.DATABASE if transient_sqlstate(code) else Fault.RECORD
    if isinstance(error, sa_exc.OperationalError | psycopg.OperationalError):
        # No SQLSTATE: from the client. A lost or refused connection, or a statement the
        # client refuses (more than 65,535 parameters): the record's if the database is fine.
        return Fault.AMBIGUOUS
    return Fault.RECORD


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and what caused it (``__cause__``, else ``__context__``), each once."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen and len(seen) < 32:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _find(error: BaseException, kind: type[E]) -> E | None:
    for link in _chain(error):
        if isinstance(link, kind):
            return link
    return None


def classify(error: BaseException) -> Fault:
    """Who is at fault, following what caused ``error``: a handler that wraps a dropped
    connection in its own exception (``raise SaveFailed(...) from exc``) is not charged."""
    faults = {_own_fault(link) for link in _chain(error)}
    for fault in (Fault.RETRY_LATER, Fault.DATABASE, Fault.AMBIGUOUS):
        if fault in faults:
            return fault
    return Fault.RECORD


def is_infrastructure_error(error: BaseException) -> bool:
    """True when the database may be at fault (the runner's own statements: always retried)."""
    return classify(error) in {Fault.DATABASE, Fault.AMBIGUOUS}


def error_type_name(error: BaseException) -> str:
    """``module.QualName`` of an exception, as sent in the ``dlt-error-type`` header."""
    cls = type(error)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"
