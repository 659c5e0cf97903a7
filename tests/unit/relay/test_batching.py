"""Slot sharing between relays (I3: one owner per shard), claim-ahead and poll backoff."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outbox.partitioner import SHARD_COUNT
from outbox.relay.batching import (
    ACTIVE_POLL,
    claim_ahead,
    fair_share,
    jittered,
    poll_delay,
    slots_to_release,
    slots_to_try,
    target_share,
)
from tests.hypothesis_profiles import examples

# -- pipelining ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "batch_size", "stopping", "ahead"),
    [
        (1000, 1000, False, True),  # a full batch: a backlog, claim the next one now
        (999, 1000, False, False),  # a partial batch: nothing more waits, claim after commit
        (1, 1, False, True),
        (0, 1000, False, False),
        (1000, 1000, True, False),  # stopping or handing over: take nothing new
    ],
)
def test_the_next_batch_is_claimed_in_flight_only_in_a_backlog(
    rows: int, batch_size: int, stopping: bool, ahead: bool
) -> None:
    assert claim_ahead(rows, batch_size, stopping) is ahead


@pytest.mark.parametrize(
    ("empty_polls", "interval", "listening", "delay"),
    [
        (0, 1.0, True, 1.0),  # NOTIFY wakes the slot: the poll is only a safety net
        (7, 1.0, True, 1.0),
        (0, 1.0, False, ACTIVE_POLL),  # rows were just found: look again in 10 ms
        (1, 1.0, False, 1.5 * ACTIVE_POLL),
        (3, 1.0, False, 1.5**3 * ACTIVE_POLL),
        (12, 1.0, False, 1.0),  # idle: back off to the interval
        (10_000, 30.0, False, 30.0),
        (0, 0.005, False, 0.005),  # never above the interval
    ],
)
def test_without_wake_ups_the_poll_comes_back_fast_after_rows_and_backs_off_when_idle(
    empty_polls: int, interval: float, listening: bool, delay: float
) -> None:
    assert poll_delay(empty_polls, interval, listening=listening) == pytest.approx(delay)


# -- shares --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("slots", "members", "share"),
    [(4, 1, 4), (4, 2, 2), (4, 3, 2), (4, 4, 1), (4, 9, 1), (32, 3, 11), (1, 5, 1), (4, 0, 4)],
)
def test_fair_share_rounds_up_so_no_slot_is_orphaned(slots: int, members: int, share: int) -> None:
    assert fair_share(slots, members) == share


@given(st.integers(1, 64), st.integers(0, 64))
def test_fair_shares_of_all_members_cover_every_slot(slots: int, members: int) -> None:
    assert fair_share(slots, members) * max(members, 1) >= slots


def test_target_share_is_the_fair_share_capped_by_max_slots() -> None:
    assert target_share(8, 2, None) == 4
    assert target_share(8, 2, 3) == 3
    assert target_share(8, 2, 9) == 4


def test_slots_to_release_hands_back_the_highest_above_the_share() -> None:
    assert slots_to_release([3, 0, 2, 1], 4, 2) == [2, 3]
    assert slots_to_release([0, 1], 4, 2) == []
    assert slots_to_release([0], 4, 2) == []
    assert slots_to_release([], 4, 1) == []


def test_slots_to_try_rotates_from_start_and_skips_owned() -> None:
    assert slots_to_try([], 4, 1, 2, None) == [2, 3, 0, 1]
    assert slots_to_try([3], 4, 2, 2, None) == [2, 0, 1]


def test_slots_to_try_stops_at_the_share_or_the_cap() -> None:
    assert slots_to_try([0, 1], 4, 2, 0, None) == []
    assert slots_to_try([0], 4, 1, 0, 1) == []
    assert slots_to_try([0], 4, 1, 0, 2) == [1, 2, 3]


# -- relays sharing slots through locks (simulated) ----------------------------------------


class Locks:
    """Advisory locks: a slot has at most one owner, by construction."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.owner: dict[int, int] = {}
        self.handovers = 0

    def owned_by(self, relay: int) -> list[int]:
        return sorted(s for s, o in self.owner.items() if o == relay)

    def step(self, relay: int, members: int, cap: int | None, *, greedy: bool) -> None:
        """One coordination pass of ``relay``; ``greedy`` takes every free slot it sees."""
        owned = self.owned_by(relay)
        for slot in slots_to_release(owned, self.slots, members):
            del self.owner[slot]
            self.handovers += 1
        want = target_share(self.slots, members, cap)
        mine = len(owned)
        for slot in slots_to_try(owned, self.slots, members, relay % self.slots, cap):
            if slot not in self.owner:
                self.owner[slot] = relay
                mine += 1
                if mine >= (want if not greedy else cap or SHARD_COUNT):
                    break


def _settle(
    locks: Locks, relays: list[int], rng: random.Random, cap: int | None, *, greedy: bool
) -> int:
    """Run passes in random orders until nothing changes; returns the rounds it took."""
    for rounds in range(1, 4 * len(relays) + 8):
        before = dict(locks.owner)
        order = relays[:]
        rng.shuffle(order)
        for relay in order:
            locks.step(relay, len(relays), cap, greedy=greedy)
        if locks.owner == before:
            return rounds
    raise AssertionError(f"ownership never settled: {locks.owner}")


def _assert_one_owner_each(locks: Locks, relays: list[int]) -> None:
    assert sorted(locks.owner) == list(range(locks.slots)), "every slot has an owner"
    assert set(locks.owner.values()) <= set(relays), "only live relays own slots"
    share = fair_share(locks.slots, len(relays))
    for relay in relays:
        assert len(locks.owned_by(relay)) <= share, f"relay {relay} above its fair share"


@settings(max_examples=examples(200))
@given(
    slots=st.integers(1, SHARD_COUNT),
    joins=st.integers(1, 8),
    leaves=st.integers(0, 7),
    seed=st.integers(0, 2**32),
    greedy=st.booleans(),
)
def test_i3_relays_taking_their_fair_share_own_every_slot_exactly_once(
    slots: int, joins: int, leaves: int, seed: int, greedy: bool
) -> None:
    rng = random.Random(seed)
    locks = Locks(slots)
    relays: list[int] = []
    for relay in range(joins):  # relays join one at a time
        relays.append(relay)
        _settle(locks, relays, rng, None, greedy=greedy)
        _assert_one_owner_each(locks, relays)
    for _ in range(min(leaves, joins - 1)):  # and die one at a time: their locks go
        dead = relays.pop(rng.randrange(len(relays)))
        locks.owner = {s: o for s, o in locks.owner.items() if o != dead}
        _settle(locks, relays, rng, None, greedy=greedy)
        _assert_one_owner_each(locks, relays)


@given(slots=st.integers(1, SHARD_COUNT), relays=st.integers(1, 6), cap=st.integers(1, 8))
def test_max_slots_caps_what_each_relay_takes(slots: int, relays: int, cap: int) -> None:
    locks = Locks(slots)
    members = list(range(relays))
    _settle(locks, members, random.Random(0), cap, greedy=False)
    for relay in members:
        assert len(locks.owned_by(relay)) <= cap
    assert len(locks.owner) == min(slots, relays * min(cap, fair_share(slots, relays)))


@given(st.floats(0.01, 100))
def test_jittered_stays_within_the_spread(interval: float) -> None:
    assert interval * 0.8 <= jittered(interval) <= interval * 1.2
