"""The chaos schedule's relay freeze (I12): once per run, SIGSTOP then SIGCONT after longer
than the relays' takeover time, over before the fault phase ends."""

from __future__ import annotations

import pytest

from tests.chaos.faults import FaultKind, Rates, Step, actions, schedule
from tests.chaos.harness import TAKEOVER_SECONDS


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("seconds", [10.0, 30.0, 120.0])
def test_i12_every_run_freezes_one_relay_longer_than_the_takeover_time(
    seed: int, seconds: float
) -> None:
    faults = schedule(seed, seconds, relays=3, consumers=2)
    (freeze,) = [f for f in faults if f.kind is FaultKind.FREEZE_RELAY]
    assert 0 <= freeze.target < 3
    assert freeze.duration > TAKEOVER_SECONDS
    steps = [a for a in actions(faults) if a.step in (Step.FREEZE_RELAY, Step.THAW_RELAY)]
    assert [a.step for a in steps] == [Step.FREEZE_RELAY, Step.THAW_RELAY]
    assert steps[1].at - steps[0].at == pytest.approx(freeze.duration)
    assert steps[1].at < seconds


def test_i12_the_freeze_length_follows_the_rates() -> None:
    faults = schedule(1, 30, relays=2, consumers=1, rates=Rates(freeze_seconds=8))
    (freeze,) = [f for f in faults if f.kind is FaultKind.FREEZE_RELAY]
    assert freeze.duration == 8
