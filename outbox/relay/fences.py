"""Who fenced a slot: a relay of this database, or something outside it (I9).

Two relays of one database never hold a slot at once: its worker holds the slot's advisory
lock on its own connection. So a worker fenced while that connection STILL holds the lock
was fenced from outside this database: another database relays with this outbox's identity
(a copy: ``CREATE DATABASE ... TEMPLATE``, a dump restored as a second service), or two
outboxes were given the same explicit ``--transactional-id-prefix``. The two relays then
fence each other on every slot, and a plain "slot lost" warning would read like a rebalance.
Only a slot-count change settles (fences) slots it does not hold; that is told apart too.
"""

from __future__ import annotations

import enum
import threading
import uuid
from dataclasses import dataclass, field

from outbox.errors import SlotLost


class Fence(enum.Enum):
    """Why a slot's producer was fenced, as far as this database can tell."""

    TAKEOVER = "takeover"  # the lock is gone (or unknown): a normal takeover, as before
    LAYOUT = "layout"  # a relay of this database settles a slot-count change
    FOREIGN = "foreign"  # the lock is still held here: the fencer is outside this database


@dataclass(frozen=True)
class SlotLockState:
    """What the fenced worker's own connection says (``sql.SLOT_LOCK_STATE``)."""

    holds_slot: bool  # this session still holds the slot's advisory lock
    layout_changing: bool  # a slot-count change is being settled, or was since this relay started


def explain_fence(state: SlotLockState | None) -> Fence:
    """The explanation of a fence; ``None``: the lock could not be checked (connection gone)."""
    if state is None or not state.holds_slot:
        return Fence.TAKEOVER
    if state.layout_changing:
        return Fence.LAYOUT
    return Fence.FOREIGN


RENEW_IDENTITY_SQL = "UPDATE outbox_identity SET outbox_id = gen_random_uuid(), slot_count = NULL"
"""Gives a copied database its own outbox identity (the README's fix for copies)."""


def foreign_fence_message(
    *, slot: int, tid: str, outbox_id: uuid.UUID, explicit_prefix: str | None
) -> str:
    """The ERROR a foreign fence logs: what happened and the fix. It names ids only, never a
    DSN or a credential."""
    happened = (
        f"slot {slot}: fenced on transactional.id {tid} while this relay still holds the "
        f"slot's lock in its database: the fencer is outside this database. "
    )
    if explicit_prefix is None:
        return happened + (
            f"Another database is relaying with this outbox's identity {outbox_id} (a copy made "
            "with CREATE DATABASE ... TEMPLATE, or a restored dump running beside the original?); "
            "the two relays fence each other on every slot and publish slowly. Nothing is lost. "
            "Fix: stop the COPY's relays, run `outbox identity renew` on the copy's database "
            f"(or `{RENEW_IDENTITY_SQL}`), then start them again (the copy then uses "
            "transactional ids of its own)"
        )
    return happened + (
        f"Another outbox (another database) uses --transactional-id-prefix={explicit_prefix} "
        f"too (this is outbox {outbox_id}), or a copy of this database relays under it; the "
        "two relays fence each other on every slot. Nothing is lost. Fix: give each outbox its "
        "own --transactional-id-prefix (or drop the option to use the default derived from the "
        "identity), and give a copied database its own identity with `outbox identity renew`"
    )


FOREIGN_FENCE_REPEAT = 300.0
"""A slot's foreign-fence ERROR is logged at most once per this many seconds (the two relays
fence each other again on every takeover: one line per spin would flood the log)."""


@dataclass
class OncePerSlot:
    """``admit(slot, now)``: None to hold a slot's line back, else how many were held back
    since its last one. Pure (the caller passes the clock) and thread-safe."""

    period: float = FOREIGN_FENCE_REPEAT
    _last: dict[int, tuple[float, int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def admit(self, slot: int, now: float) -> int | None:
        with self._lock:
            last = self._last.get(slot)
            if last is not None and now - last[0] < self.period:
                self._last[slot] = (last[0], last[1] + 1)
                return None
            self._last[slot] = (now, 0)
            return last[1] if last is not None else 0


class ForeignFence(SlotLost):
    """The slot was fenced from outside this database: its message says why and the fix."""
