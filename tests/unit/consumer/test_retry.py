"""I7: the pure retry / dead-letter decision of the consumer."""

from __future__ import annotations

import random

import psycopg
import pytest
from sqlalchemy import exc as sa_exc

from consumer import RetryPolicy
from consumer.retry import Action, Reason, error_type_name, is_infrastructure_error
from outbox.errors import ConfigError


def _wrapped(orig: Exception) -> sa_exc.OperationalError:
    return sa_exc.OperationalError("SELECT 1", {}, orig)


def test_i7_retries_until_attempts_are_used_then_dead_letters() -> None:
    policy = RetryPolicy(attempts=3, initial_backoff=0.5, jitter=0)
    error = ValueError("bad")
    first = policy.decide(error, failures=0)
    second = policy.decide(error, failures=1)
    third = policy.decide(error, failures=2)
    assert (first.action, first.delay, first.counted) == (Action.RETRY, 0.5, True)
    assert (second.action, second.delay) == (Action.RETRY, 1.0)
    assert (third.action, third.reason) == (Action.DEAD_LETTER, Reason.RETRIES_EXHAUSTED)


def test_i7_one_attempt_means_no_retry() -> None:
    decision = RetryPolicy(attempts=1).decide(RuntimeError("x"), failures=0)
    assert (decision.action, decision.reason) == (Action.DEAD_LETTER, Reason.RETRIES_EXHAUSTED)


def test_i7_non_retryable_types_and_subclasses_skip_retries() -> None:
    policy = RetryPolicy(attempts=5, non_retryable=(LookupError,))
    for error in (LookupError("x"), KeyError("k")):
        decision = policy.decide(error, failures=0)
        assert (decision.action, decision.reason) == (Action.DEAD_LETTER, Reason.NON_RETRYABLE)
    assert policy.decide(ValueError("v"), failures=0).action is Action.RETRY


@pytest.mark.parametrize(
    "error",
    [
        psycopg.OperationalError("connection to server lost"),
        _wrapped(psycopg.OperationalError("server closed the connection unexpectedly")),
        _wrapped(psycopg.errors.SerializationFailure("could not serialize access")),
        _wrapped(psycopg.errors.DeadlockDetected("deadlock detected")),
        _wrapped(psycopg.errors.AdminShutdown("terminating connection")),
        psycopg.errors.ConnectionFailure("08006"),
        sa_exc.TimeoutError("QueuePool limit reached"),
    ],
    ids=lambda e: type(e).__name__ + ":" + str(getattr(e, "orig", e))[:20],
)
def test_i7_database_outages_are_retried_forever_and_never_dead_lettered(error: Exception) -> None:
    policy = RetryPolicy(attempts=2, initial_backoff=0, max_backoff=0)
    assert is_infrastructure_error(error)
    decision = policy.decide(error, failures=10, outages=3)
    assert decision.action is Action.RETRY
    assert not decision.counted
    assert decision.delay >= 0.1  # never a busy loop against a database that is down


@pytest.mark.parametrize(
    "error",
    [
        sa_exc.IntegrityError("INSERT", {}, psycopg.errors.UniqueViolation("duplicate key")),
        ValueError("bad payload"),
    ],
    ids=["unique-violation", "value-error"],
)
def test_i7_message_faults_count_against_attempts(error: Exception) -> None:
    assert not is_infrastructure_error(error)
    assert RetryPolicy(attempts=2).decide(error, failures=1).action is Action.DEAD_LETTER


def test_backoff_grows_exponentially_and_is_capped() -> None:
    policy = RetryPolicy(attempts=10, initial_backoff=0.1, multiplier=3, max_backoff=1.0, jitter=0)
    assert [policy.backoff(n) for n in range(1, 5)] == pytest.approx([0.1, 0.3, 0.9, 1.0])


def test_backoff_jitter_stays_within_its_spread() -> None:
    policy = RetryPolicy(initial_backoff=1.0, max_backoff=10, jitter=0.2)
    rng = random.Random(7)
    delays = [policy.backoff(1, rng) for _ in range(200)]
    assert all(0.8 <= d <= 1.2 for d in delays)
    assert len(set(delays)) > 100


def test_worst_case_sums_every_wait_at_its_jittered_maximum() -> None:
    policy = RetryPolicy(attempts=4, initial_backoff=1, multiplier=2, max_backoff=3, jitter=0.5)
    assert policy.worst_case_seconds() == pytest.approx((1 + 2 + 3) * 1.5)
    assert RetryPolicy(attempts=1).worst_case_seconds() == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"attempts": 0}, "attempts=0"),
        ({"attempts": 101}, "attempts=101"),
        ({"initial_backoff": -1}, "initial_backoff=-1"),
        ({"initial_backoff": 5, "max_backoff": 1}, "max_backoff=1"),
        ({"multiplier": 0.5}, "multiplier=0.5"),
        ({"jitter": 1.0}, "jitter=1.0"),
        ({"non_retryable": (ValueError, "KeyError")}, "exception classes"),
    ],
)
def test_i8_bad_retry_policy_is_refused_naming_the_setting(
    kwargs: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_error_type_name_is_qualified_except_for_builtins() -> None:
    assert error_type_name(ValueError("x")) == "ValueError"
    assert error_type_name(ConfigError("x")) == "outbox.errors.ConfigError"
