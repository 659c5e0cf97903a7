"""Pure decisions of the relay: slot shares, claim-ahead, poll backoff. No I/O here.

The recovery marker is in ``outbox.relay.marker``."""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence


def fair_share(slots: int, members: int) -> int:
    """How many slots one of ``members`` live relays should own (ceil, so none stays orphaned)."""
    return math.ceil(slots / max(members, 1))


def slots_to_release(owned: Sequence[int], slots: int, members: int) -> list[int]:
    """Slots to hand back so a newcomer can take its share; the highest go first."""
    extra = len(owned) - fair_share(slots, members)
    return sorted(owned)[-extra:] if extra > 0 else []


def target_share(slots: int, members: int, cap: int | None) -> int:
    """How many slots this relay should end up owning: its fair share, at most ``cap``."""
    share = fair_share(slots, members)
    return share if cap is None else min(cap, share)


def slots_to_try(
    owned: Iterable[int], slots: int, members: int, start: int, cap: int | None
) -> list[int]:
    """Slots to try to lock, rotated by ``start`` so relays don't all race for slot 0.

    Empty once this relay owns its ``target_share``; otherwise every slot it does
    not own, because any of them may turn out to be free. The caller stops taking
    slots once it owns ``target_share``.
    """
    owned_set = set(owned)
    if len(owned_set) >= target_share(slots, members, cap):
        return []
    order = [(start + i) % slots for i in range(slots)]
    return [s for s in order if s not in owned_set]


def claim_ahead(batch_rows: int, batch_size: int, stopping: bool) -> bool:
    """Claim the next batch while this one is in flight? Only in a backlog.

    A full batch says more rows are waiting, so the claim overlaps the broker's
    acknowledgements instead of following them; a partial batch (a steady low
    rate) claims after the commit as before, so an idle relay does no extra work.
    """
    return batch_rows >= batch_size and not stopping


ACTIVE_POLL = 0.01
"""The first poll after a claim that found rows, when no NOTIFY can wake the relay."""
POLL_BACKOFF = 1.5
"""Growth of the poll per empty claim: doubling let gaps of a moderate rate grow to 0.4 s."""


def poll_delay(empty_polls: int, interval: float, *, listening: bool) -> float:
    """How long a slot sleeps before claiming again (a NOTIFY cuts the sleep short).

    Listening, the poll is only a safety net: ``interval``. Without wake-ups
    (``--no-listen`` because writers skip the NOTIFY, or the LISTEN session is
    down), the poll adapts: right after rows were found it comes back in 10 ms
    and grows by half with every empty claim up to ``interval``, so a busy
    outbox is relayed within milliseconds and an idle one costs a claim per
    interval (after about a dozen claims over 3 s, with the default 1 s).
    """
    if listening:
        return interval
    return min(interval, ACTIVE_POLL * POLL_BACKOFF ** min(empty_polls, 64))


def jittered(interval: float, spread: float = 0.2) -> float:
    """A poll interval with +-spread jitter so relays don't poll in lockstep."""
    return interval * random.uniform(1 - spread, 1 + spread)
