"""Aims of the chaos run: a fault that missed its moment is aimed again, and only a kind that
never struck fails the run, with a message that says so. Pure decisions of tests.chaos.faults."""

from __future__ import annotations

import random

import pytest

from tests.chaos.faults import (
    Aim,
    Aims,
    FaultKind,
    Rates,
    aim_failures,
    aims_of,
    reaim,
    unstruck,
)
from tests.chaos.harness import AIMS, AT_LEAST_ONCE_AIMS

EVERY_KIND = list(FaultKind)


def _struck_all(aims: Aims) -> dict[str, int]:
    return {a.counter: 1 for of in aims.values() for a in of}


def test_a_kind_without_a_special_aim_must_be_injected_once() -> None:
    aims = aims_of(EVERY_KIND, {})
    assert set(aims) == set(FaultKind)
    assert all(of == (Aim(k.value, of[0].meaning),) for k, of in aims.items())
    assert unstruck(aims, {}) == EVERY_KIND
    assert unstruck(aims, {k.value: 1 for k in FaultKind}) == []


def test_only_the_kinds_a_run_scheduled_are_aimed() -> None:
    aims = aims_of([FaultKind.KILL_RELAY, FaultKind.CUT_BROKER], AIMS)
    assert set(aims) == {FaultKind.KILL_RELAY, FaultKind.CUT_BROKER}
    assert aims[FaultKind.KILL_RELAY] == AIMS[FaultKind.KILL_RELAY]


@pytest.mark.parametrize("special", [AIMS, AT_LEAST_ONCE_AIMS])
def test_a_kind_is_unstruck_until_every_one_of_its_aims_struck(special: Aims) -> None:
    aims = aims_of(EVERY_KIND, special)
    counts = _struck_all(aims)
    assert unstruck(aims, counts) == []
    assert aim_failures(aims, counts, {}, 30) == []
    for kind, of in aims.items():
        for aim in of:
            missed = {**counts, aim.counter: 0}
            assert unstruck(aims, missed) == [kind]
            (failure,) = aim_failures(aims, missed, {kind.value: 3}, 30)
            assert failure.startswith(f"fault kind {kind.value} never struck ({aim.counter}=0)")
            assert "after 3 extra faults in an extension of up to 30s" in failure
            assert aim.meaning in failure


def test_a_relay_kill_must_hit_a_batch_in_flight_and_lead_to_a_recovery() -> None:
    counters = {a.counter for a in AIMS[FaultKind.KILL_RELAY]}
    assert counters == {"relay_kills_mid_batch", "relay_recoveries"}
    assert {a.counter for a in AIMS[FaultKind.KILL_CONSUMER]} == {"consumer_duplicates_skipped"}
    assert {a.counter for a in AT_LEAST_ONCE_AIMS[FaultKind.CUT_BROKER]} == {
        "relay_deliveries_expired"
    }


@pytest.mark.parametrize("kind", EVERY_KIND)
def test_a_fault_aimed_again_follows_the_schedules_rules(kind: FaultKind) -> None:
    rates = Rates()
    for seed in range(20):
        fault = reaim(kind, 31.5, random.Random(seed), relays=4, consumers=3, rates=rates)
        assert (fault.kind, fault.at) == (kind, 31.5)
        if kind in (FaultKind.KILL_RELAY, FaultKind.FREEZE_RELAY):
            assert 0 <= fault.target < 4
        elif kind is FaultKind.KILL_CONSUMER:
            assert 0 <= fault.target < 3
        else:
            assert fault.target == 0
        if kind is FaultKind.CUT_BROKER:
            assert rates.cut_seconds[0] <= fault.duration <= rates.cut_seconds[1]
        elif kind is FaultKind.RESTART_POSTGRES:
            assert fault.duration == 0
        elif kind is FaultKind.FREEZE_RELAY:
            # twice the scheduled freeze, so a slow takeover still happens while it lasts
            assert fault.duration == 2 * rates.freeze_seconds
        else:
            assert rates.dead_seconds[0] <= fault.duration <= rates.dead_seconds[1]
    outage = reaim(
        FaultKind.CUT_BROKER,
        1,
        random.Random(1),
        relays=1,
        consumers=1,
        rates=Rates(outage_seconds=12),
    )
    assert outage.duration == 12
