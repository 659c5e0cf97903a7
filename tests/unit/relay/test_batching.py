"""Slot sharing between relays (I3: one owner per shard) and the recovery marker (I4)."""

from __future__ import annotations

import random
import struct
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from outbox.partitioner import SHARD_COUNT
from outbox.relay.batching import (
    ACTIVE_POLL,
    EVENT_ID_BYTES,
    MARKER_MAGIC,
    MAX_MARKER_BYTES,
    MAX_MARKER_EVENTS,
    MAX_TID_BYTES,
    Marker,
    MarkerError,
    MarkerReading,
    claim_ahead,
    fair_share,
    jittered,
    judge_marker,
    max_marker_batch,
    poll_delay,
    recoverable,
    slots_to_release,
    slots_to_try,
    target_share,
)

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


@settings(max_examples=200)
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


# -- the recovery marker (I4, I9) -----------------------------------------------------------

OURS = uuid.UUID("6f1d2c1e-0000-4000-8000-000000000001")
OTHER = uuid.UUID("6f1d2c1e-0000-4000-8000-000000000002")
TID = "outbox-6f1d2c1e0000-1"

batches = st.lists(
    st.tuples(st.integers(1, 2**63 - 1) | st.integers(1, 300), st.uuids()),
    unique_by=lambda pair: pair[0],
    max_size=200,
)


@given(
    batch=batches,
    outbox_id=st.uuids(),
    tid=st.text(st.characters(max_codepoint=127), max_size=MAX_TID_BYTES),
    slots=st.integers(1, SHARD_COUNT),
    data=st.data(),
)
def test_i9_marker_round_trips(
    batch: list[tuple[int, uuid.UUID]],
    outbox_id: uuid.UUID,
    tid: str,
    slots: int,
    data: st.DataObject,
) -> None:
    slot = data.draw(st.integers(0, slots - 1))
    marker = Marker.of_batch(outbox_id, tid, slot, slots, batch)
    decoded = Marker.decode(marker.encode())
    assert decoded == marker
    assert decoded.events() == {i: e.bytes for i, e in batch}


def test_a_contiguous_batch_costs_about_seventeen_bytes_per_event() -> None:
    marker = Marker.of_batch(
        OURS, TID, 1, 4, [(i, uuid.uuid4()) for i in range(10**9, 10**9 + 1000)]
    )
    assert len(marker.encode()) < 60 + 1000 * (1 + EVENT_ID_BYTES)


@pytest.mark.parametrize("message_max_bytes", [10_000, 100_000, 1_000_000, 10_000_000])
def test_the_largest_allowed_batch_always_fits_its_marker_in_one_record(
    message_max_bytes: int,
) -> None:
    """Worst case: ids as far apart as bigint allows (10-byte gaps), the longest tid."""
    n = max_marker_batch(message_max_bytes)
    assert 0 < n <= MAX_MARKER_EVENTS
    step = (2**63 - 1) // (n + 1)
    marker = Marker.of_batch(
        OURS, "t" * MAX_TID_BYTES, 0, 1, [(step * (k + 1), uuid.uuid4()) for k in range(n)]
    )
    assert len(marker.encode()) <= min(message_max_bytes, MAX_MARKER_BYTES)


def _valid() -> bytes:
    return Marker.of_batch(OURS, TID, 1, 4, [(5, uuid.uuid4()), (7, uuid.uuid4())]).encode()


def _header(count: int, slot: int = 1, slots: int = 4) -> bytes:
    tid = TID.encode()
    return (
        struct.pack(">4s16sHHB", MARKER_MAGIC, OURS.bytes, slot, slots, len(tid))
        + tid
        + struct.pack(">I", count)
    )


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "not a recovery marker"),
        (b"garbage", "not a recovery marker"),
        (MARKER_MAGIC, "bad header"),
        (_valid()[:-1], "event id bytes"),
        (_valid() + b"x", "event id bytes"),
        (_header(2) + b"\x05\x00" + b"d" * 32, "not strictly ascending"),
        (_header(1) + b"\xff" * 11 + b"d" * 16, "overlong"),
        (_header(2) + b"\x05", "truncated"),
        (_header(2) + b"\xff" * 9 + b"\x7f" + b"\xff" * 9 + b"\x01" + b"d" * 32, "beyond bigint"),
        (_header(MAX_MARKER_EVENTS + 1), "more than a batch can hold"),
        (_header(0, slot=4, slots=4), "is no slot"),
        (_header(0, slot=0, slots=0), "is no slot"),
        (_header(0, slot=0, slots=33), "is no slot"),
        (MARKER_MAGIC + b"\x00" * (MAX_MARKER_BYTES), "more than any marker"),
        (b'{"tid": "t", "slot": 0, "ranges": [[1, 200]]}', "version-1 marker"),
        (b'{"tid": "t", "slot": 0, "ranges": [[1, 1000000000000000]]}', "version-1 marker"),
        (b"[" * 5000 + b"]" * 5000, "malformed JSON"),
        (b'{"a": ' * 5000 + b"1" + b"}" * 5000, "malformed JSON"),
        (b"[1, 2]", "JSON that is no marker"),
        (b"{" + b" " * (MAX_MARKER_BYTES + 1) + b"}", "more than any marker"),
    ],
)
def test_i9_malformed_or_forged_marker_is_a_marker_error_naming_why(
    raw: bytes, reason: str
) -> None:
    with pytest.raises(MarkerError, match=reason):
        Marker.decode(raw)


def _judge(raw: bytes, **kw: object) -> MarkerReading:
    args: dict[str, object] = {
        "outbox_id": OURS,
        "tid": TID,
        "slot": 1,
        "slots": 4,
        "explicit_prefix": False,
    }
    args.update(kw)
    return judge_marker(raw, **args)  # type: ignore[arg-type]


def _marker(outbox_id: uuid.UUID = OURS, tid: str = TID, slot: int = 1, slots: int = 4) -> bytes:
    return Marker.of_batch(outbox_id, tid, slot, slots, [(1, uuid.uuid4())]).encode()


@pytest.mark.parametrize(
    ("raw", "kw", "applied", "ignored", "conflict"),
    [
        (_marker(), {}, True, None, None),
        (_marker(OTHER), {}, False, "names another outbox", None),
        (_marker(OTHER), {"explicit_prefix": True}, False, None, OTHER),
        (_marker(OTHER), {"explicit_prefix": True, "replaces": OTHER}, False, "replaced", None),
        (_marker(slot=2), {}, False, "slot 2", None),
        (_marker(tid="x-1"), {}, False, "'x-1'", None),
        (_marker(slots=2), {}, False, "2-slot layout", None),
        (_marker(slot=1, slots=2), {"slots": 2}, True, None, None),
        (b'{"tid": "t", "slot": 1, "ranges": [[1, 9]]}', {}, False, "version-1", None),
        (b"[" * 5000, {}, False, "malformed", None),
    ],
)
def test_i9_only_this_outboxs_marker_of_this_slot_and_layout_is_applied(
    raw: bytes,
    kw: dict[str, object],
    applied: bool,
    ignored: str | None,
    conflict: uuid.UUID | None,
) -> None:
    reading = _judge(raw, **kw)
    assert (reading.marker is not None) is applied
    assert reading.conflict == conflict
    if ignored is None:
        assert reading.ignored is None
    else:
        assert reading.ignored is not None
        assert ignored in reading.ignored


def test_i9_recovery_matches_a_row_only_by_its_id_and_its_very_event() -> None:
    e1, e2, e3 = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    marker = Marker.of_batch(OURS, TID, 1, 4, [(1, e1), (2, e2), (3, e3)])
    rows = [
        (1, e1),  # the very event: published, its delete was lost
        (2, uuid.uuid4()),  # the id came back (restore, re-creation) for another event
        (4, e3),  # the event under another id: not what the batch held
    ]
    assert recoverable(marker, rows) == [(1, e1)]
    foreign = Marker.of_batch(OTHER, TID, 1, 4, [(1, e1)])
    assert recoverable(Marker.decode(foreign.encode()), [(1, e1)]) == [(1, e1)]
    # ... a marker is bound to its outbox: the relay applies only its own (judge_marker)
    assert _judge(foreign.encode()).marker is None


@given(st.floats(0.01, 100))
def test_jittered_stays_within_the_spread(interval: float) -> None:
    assert interval * 0.8 <= jittered(interval) <= interval * 1.2
