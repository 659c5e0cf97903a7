"""How long the relay waits before trying again: one rule for every retry loop. Pure.

Doubling from ``first`` up to ``cap``, with jitter so that relays (or slots) that failed
together, say when their database restarted, do not all come back in the same instant.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from tenacity import RetryCallState

SPREAD = 0.2
"""Jitter: each delay is drawn within +-20 % of its step (never above ``cap``)."""


def backoff(
    attempt: int,
    *,
    first: float = 1.0,
    cap: float = 30.0,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry number ``attempt`` (1 = the first retry)."""
    step = min(cap, first * 2.0 ** min(max(attempt, 1) - 1, 64))
    return min(cap, step * (rng or random).uniform(1 - SPREAD, 1 + SPREAD))


def retry_wait(*, first: float, cap: float) -> Callable[[RetryCallState], float]:
    """``backoff`` as tenacity's ``wait=``, for loops written with ``Retrying``."""

    def wait(state: RetryCallState) -> float:
        return backoff(state.attempt_number, first=first, cap=cap)

    return wait
