"""Who fenced a slot: a relay of this database, or something outside it (I9).

Two relays of one database never hold a slot at once: its worker holds the slot's advisory
lock on its own connection. So a worker fenced while that connection STILL holds the lock
was fenced from outside this database: another database relays with this outbox's identity
(a copy: ``CREATE DATABASE ... TEMPLATE``, a dump restored as a second service), or two
outboxes were given the same explicit ``--transactional-id-prefix``. The two relays then
fence each other on every slot, and a plain "slot lost" warning would read like a rebalance.
Only a slot-count change settles (fences) slots it does not hold; that is told apart too.

One broker-side cause fences a lone owner: Apache Kafka's coordinator aborts a transaction that
outlives ``transaction.timeout.ms`` and bumps the epoch. A fence at the end of such a long
transaction is told apart, and a foreign fence becomes an ERROR only when it repeats: a copy
fences every takeover, a one-off cause fences once.
"""

from __future__ import annotations

import enum
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field

from outbox import sql
from outbox.errors import SlotLost


class Fence(enum.Enum):
    """Why a slot's producer was fenced, as far as this database can tell."""

    TAKEOVER = "takeover"  # the lock is gone (or unknown): a normal takeover, as before
    LAYOUT = "layout"  # a relay of this database settles a slot-count change
    TIMEOUT = "timeout"  # the transaction outlived transaction.timeout.ms: the broker aborted it
    FOREIGN = "foreign"  # the lock is still held here: the fencer is outside this database


@dataclass(frozen=True)
class SlotLockState:
    """What the fenced worker's own connection says (``sql.SLOT_LOCK_STATE``)."""

    holds_slot: bool  # this session still holds the slot's advisory lock
    layout_changing: bool  # a slot-count change is being settled, or was since this relay started


TIMED_OUT_SHARE = 0.8
"""A transaction open this share of ``transaction.timeout.ms`` may have been aborted by the
broker's coordinator (its clock is not ours)."""


def explain_fence(
    state: SlotLockState | None,
    *,
    transaction_age: float | None = None,
    transaction_timeout: float = float("inf"),
) -> Fence:
    """The explanation of a fence. ``state`` None: the lock could not be checked (connection
    gone); ``transaction_age``: seconds the fenced (or last) Kafka transaction was open."""
    if state is None or not state.holds_slot:
        return Fence.TAKEOVER
    if state.layout_changing:
        return Fence.LAYOUT
    if transaction_age is not None and transaction_age >= TIMED_OUT_SHARE * transaction_timeout:
        return Fence.TIMEOUT
    return Fence.FOREIGN


RENEW_IDENTITY_SQL = sql.RENEW_IDENTITY_UPDATE
"""Gives a copied database its own outbox identity (what `outbox identity renew` runs)."""


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

FOREIGN_FENCE_WINDOW = 600.0
"""A foreign-looking fence is confirmed by a second one of the same slot within this window."""


class Say(enum.Enum):
    """How a foreign-looking fence is logged."""

    WARNING = "warning"  # the first in the window: one-off causes exist
    ERROR = "error"  # confirmed by a repeat: another database relays with this identity
    QUIET = "quiet"  # confirmed, but already said within the period: debug


@dataclass
class FenceAlarm:
    """``admit(slot, now)``: how to log a slot's foreign-looking fence, and how many lines were
    held back since its last ERROR. Pure (the caller passes the clock) and thread-safe."""

    period: float = FOREIGN_FENCE_REPEAT
    window: float = FOREIGN_FENCE_WINDOW
    _seen: dict[int, deque[float]] = field(default_factory=dict)
    _said: dict[int, float] = field(default_factory=dict)
    _held: dict[int, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def admit(self, slot: int, now: float) -> tuple[Say, int]:
        with self._lock:
            seen = self._seen.setdefault(slot, deque())
            while seen and now - seen[0] > self.window:
                seen.popleft()
            seen.append(now)
            if len(seen) < 2:
                return Say.WARNING, 0
            said = self._said.get(slot)
            if said is not None and now - said < self.period:
                self._held[slot] = self._held.get(slot, 0) + 1
                return Say.QUIET, 0
            self._said[slot] = now
            return Say.ERROR, self._held.pop(slot, 0)

    def confirmed_since(self, since: float) -> int:
        """Slots whose foreign fences were confirmed (an ERROR) at or after ``since``."""
        with self._lock:
            return sum(1 for said in self._said.values() if said >= since)


class ForeignFence(SlotLost):
    """The slot was fenced from outside this database: its message says why and the fix."""
