"""The relay's one retry delay rule: doubling, capped, jittered (I12: bounded waits)."""

from __future__ import annotations

import random

import pytest
from tenacity import RetryCallState, Retrying

from outbox.relay.backoff import SPREAD, backoff, retry_wait


@pytest.mark.parametrize(
    ("attempt", "step"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (5, 16.0), (6, 30.0), (7, 30.0), (10_000, 30.0)],
)
def test_i12_a_retry_waits_twice_as_long_as_the_last_up_to_the_cap(
    attempt: int, step: float
) -> None:
    delays = [backoff(attempt, first=1.0, cap=30.0, rng=random.Random(s)) for s in range(200)]
    assert all(step * (1 - SPREAD) <= d <= min(30.0, step * (1 + SPREAD)) for d in delays)
    assert max(delays) <= 30.0, "a delay beyond the cap"


def test_i12_the_first_retry_waits_the_first_step_even_for_a_zero_attempt() -> None:
    for attempt in (-3, 0, 1):
        assert 0.8 <= backoff(attempt, first=1.0, cap=30.0, rng=random.Random(1)) <= 1.2


def test_i12_relays_that_failed_together_do_not_retry_in_the_same_instant() -> None:
    delays = {backoff(3, rng=random.Random(seed)) for seed in range(20)}
    assert len(delays) == 20
    assert min(delays) < 4.0 < max(delays)


def test_i12_the_tenacity_wait_follows_the_attempt_number() -> None:
    wait = retry_wait(first=0.5, cap=10.0)
    for attempt, step in [(1, 0.5), (3, 2.0), (9, 10.0)]:
        state = RetryCallState(Retrying(), None, (), {})
        state.attempt_number = attempt
        assert step * (1 - SPREAD) <= wait(state) <= min(10.0, step * (1 + SPREAD))
