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
from dataclasses import dataclass, field
from enum import Enum, StrEnum

import psycopg
from sqlalchemy import exc as sa_exc

from outbox.errors import ConfigError

# SQLSTATEs that say "try again later", not "this message is bad" (I10): they never
# count against a record, never produce a dead letter.
TRANSIENT_SQLSTATES = frozenset(
    {
        "25006",  # read_only_sql_transaction: a failover in progress, or a standby
        "25P03",  # idle_in_transaction_session_timeout
        "40000",  # transaction_rollback
        "40001",  # serialization_failure
        "40003",  # statement_completion_unknown
        "40P01",  # deadlock_detected
        "55P03",  # lock_not_available: lock_timeout, NOWAIT
        "57014",  # query_canceled: statement_timeout, pg_cancel_backend
        "58000",  # system_error
        "58030",  # io_error
        "72000",  # snapshot_too_old
    }
)
TRANSIENT_SQLSTATE_CLASSES = frozenset(
    {
        "08",  # connection exception
        "53",  # insufficient resources: disk full, out of memory, too many connections
        "57",  # operator intervention: admin/crash shutdown, cannot connect now, idle timeout
    }
)


def transient_sqlstate(code: str) -> bool:
    """Whether a PostgreSQL error code is the database's passing state, not the record's fault."""
    return code in TRANSIENT_SQLSTATES or code[:2] in TRANSIENT_SQLSTATE_CLASSES


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
    ) -> Decision:
        """Retry or dead-letter, after the handler raised ``error``.

        ``failures``: earlier failures of this message counted against ``attempts``;
        ``outages``: earlier infrastructure failures in a row (they only lengthen the delay).
        """
        if is_infrastructure_error(error):
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


def is_infrastructure_error(error: BaseException) -> bool:
    """True when the database, not the message, is at fault: retry without dead-lettering."""
    if isinstance(error, sa_exc.DBAPIError) and error.connection_invalidated:
        return True
    if isinstance(error, sa_exc.TimeoutError | sa_exc.InterfaceError | psycopg.InterfaceError):
        return True  # pool exhausted, connection closed under us
    code = sqlstate(error)
    if code is not None:
        return transient_sqlstate(code)
    # An OperationalError without a SQLSTATE comes from the client: connection lost or refused.
    return isinstance(error, sa_exc.OperationalError | psycopg.OperationalError)


def error_type_name(error: BaseException) -> str:
    """``module.QualName`` of an exception, as sent in the ``dlt-error-type`` header."""
    cls = type(error)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"
