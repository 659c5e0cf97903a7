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
    FenceAlarm,
    ForeignFence,
    Say,
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


HELD = SlotLockState(holds_slot=True, layout_changing=False)


@pytest.mark.parametrize(
    ("age", "fence"),
    [
        (None, Fence.FOREIGN),  # no transaction yet (a fence at init_transactions)
        (0.2, Fence.FOREIGN),
        (47.9, Fence.FOREIGN),
        (48.0, Fence.TIMEOUT),  # 80 % of the 60 s transaction.timeout.ms: the broker's clock
        (75.0, Fence.TIMEOUT),  # a commit retried past the timeout
    ],
)
def test_a_fence_at_the_end_of_a_transaction_older_than_its_timeout_is_the_brokers_abort(
    age: float | None, fence: Fence
) -> None:
    """Apache Kafka aborts a transaction that outlives transaction.timeout.ms and bumps the
    epoch: a lone owner is fenced, and that is no copied database."""
    assert explain_fence(HELD, transaction_age=age, transaction_timeout=60.0) is fence
    lost = SlotLockState(holds_slot=False, layout_changing=False)
    assert explain_fence(lost, transaction_age=age, transaction_timeout=60.0) is Fence.TAKEOVER


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


W, E, Q = Say.WARNING, Say.ERROR, Say.QUIET


@pytest.mark.parametrize(
    ("events", "said"),
    [
        # (slot, seconds) -> (how it is logged, lines held back since the last ERROR)
        ([(0, 0.0)], [(W, 0)]),  # one fence alone: a warning (a one-off cause is possible)
        ([(0, 0.0), (0, 1.0)], [(W, 0), (E, 0)]),  # repeated: confirmed
        ([(0, 0.0), (0, 601.0)], [(W, 0), (W, 0)]),  # too far apart to confirm
        (
            [(0, 0.0), (0, 1.0), (0, 2.0), (0, 3.0), (0, 301.0)],
            [(W, 0), (E, 0), (Q, 0), (Q, 0), (E, 2)],
        ),
        ([(0, 0.0), (1, 1.0), (0, 2.0), (1, 3.0)], [(W, 0), (W, 0), (E, 0), (E, 0)]),  # per slot
    ],
)
def test_a_foreign_fence_is_an_error_once_it_repeats_and_then_once_per_period(
    events: list[tuple[int, float]], said: list[tuple[Say, int]]
) -> None:
    alarm = FenceAlarm(period=300.0, window=600.0)
    assert [alarm.admit(slot, now) for slot, now in events] == said


def test_readiness_reports_only_recently_confirmed_foreign_fences() -> None:
    alarm = FenceAlarm(period=300.0, window=600.0)
    alarm.admit(0, 0.0)
    assert alarm.confirmed_since(0.0) == 0  # a single fence is not confirmed
    alarm.admit(0, 1.0)
    alarm.admit(1, 2.0)
    alarm.admit(1, 3.0)
    assert alarm.confirmed_since(0.0) == 2
    assert alarm.confirmed_since(2.5) == 1
    assert alarm.confirmed_since(700.0) == 0
