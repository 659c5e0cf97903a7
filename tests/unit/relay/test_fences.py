"""I9: who fenced a slot. A fence while this database still holds the slot's lock comes from
outside it (a copied identity, a shared prefix) and is reported with the fix; every other
fence is a takeover or a slot-count change of this database, reported as before."""

from __future__ import annotations

import uuid

import pytest

from outbox.errors import SlotLost
from outbox.relay.fences import (
    RENEW_IDENTITY_SQL,
    Fence,
    ForeignFence,
    OncePerSlot,
    SlotLockState,
    explain_fence,
    foreign_fence_message,
)

OUTBOX = uuid.UUID("8021b763-4cfd-422a-ac20-0419d034f13a")


@pytest.mark.parametrize(
    ("state", "fence"),
    [
        (None, Fence.TAKEOVER),  # the connection is gone: no check, today's warning
        (SlotLockState(holds_slot=False, layout_changing=False), Fence.TAKEOVER),
        (SlotLockState(holds_slot=False, layout_changing=True), Fence.TAKEOVER),
        (SlotLockState(holds_slot=True, layout_changing=True), Fence.LAYOUT),
        (SlotLockState(holds_slot=True, layout_changing=False), Fence.FOREIGN),
    ],
)
def test_i9_only_a_fence_while_the_slot_is_still_held_here_is_foreign(
    state: SlotLockState | None, fence: Fence
) -> None:
    assert explain_fence(state) is fence


def test_i9_the_foreign_fence_message_names_the_ids_the_cause_and_the_fix() -> None:
    message = foreign_fence_message(
        slot=3, tid="outbox-8021b7634cfd-3", outbox_id=OUTBOX, explicit_prefix=None
    )
    assert "slot 3" in message
    assert "outbox-8021b7634cfd-3" in message
    assert str(OUTBOX) in message
    assert "CREATE DATABASE ... TEMPLATE" in message
    assert "restored dump" in message
    assert "outbox identity renew" in message
    assert RENEW_IDENTITY_SQL in message
    assert "Nothing is lost" in message


def test_i9_the_foreign_fence_message_under_an_explicit_prefix_says_to_change_it() -> None:
    message = foreign_fence_message(
        slot=0, tid="orders-0", outbox_id=OUTBOX, explicit_prefix="orders"
    )
    assert "--transactional-id-prefix=orders" in message
    assert str(OUTBOX) in message
    assert "outbox identity renew" in message


def test_a_foreign_fence_is_a_lost_slot_so_the_slot_behaves_as_before() -> None:
    assert issubclass(ForeignFence, SlotLost)


@pytest.mark.parametrize(
    ("events", "admitted"),
    [
        # (slot, seconds) -> what admit() returns: 0 / held-back count / None (held back)
        ([(0, 0.0)], [0]),
        ([(0, 0.0), (0, 1.0), (0, 299.0)], [0, None, None]),
        ([(0, 0.0), (0, 1.0), (0, 2.0), (0, 300.0)], [0, None, None, 2]),
        ([(0, 0.0), (1, 1.0), (0, 2.0), (1, 3.0)], [0, 0, None, None]),  # per slot
        ([(0, 0.0), (0, 301.0), (0, 302.0)], [0, 0, None]),
    ],
)
def test_a_foreign_fence_is_logged_once_per_slot_per_period(
    events: list[tuple[int, float]], admitted: list[int | None]
) -> None:
    alarm = OncePerSlot(period=300.0)
    assert [alarm.admit(slot, now) for slot, now in events] == admitted
