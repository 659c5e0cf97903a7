"""Event ids that sort by creation time: UUIDv7 (RFC 9562, section 5.7).

``publish()`` gives each event such an id unless the caller brings its own (any UUID works).
Ids made one after the other compare in that order, so the indexes on them (the delivery
record's, the consumers' dedup records) append at their right edge instead of writing a
random page per event, which is most of what a random (v4) id costs an index.

Layout: 48 bits of Unix time in milliseconds, the version (7), 74 bits that are random at the
first id of a millisecond and count up by one for each further id of that millisecond, the
variant (0b10). That is RFC 9562's "monotonic random" (section 6.2, method 2): the random start
has its top bit clear, which leaves room for 2**73 more ids in the millisecond, and if the
clock goes back the ids keep counting from the last one. So the ids of one process strictly
increase whatever its threads do, and ids of different processes (forked children included,
which draw a fresh start, also when C code forked them without Python's at-fork handlers)
collide only if 73 random bits do.

No library: Python 3.11 has no ``uuid.uuid7`` and these forty lines are all it takes.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
import weakref
from collections.abc import Callable

TAIL_BITS = 74
"""rand_a (12 bits) and rand_b (62 bits): the random start, then the count."""
_TAIL_END = 1 << TAIL_BITS
_RAND_B_MASK = (1 << 62) - 1
_VERSION_AND_VARIANT = (0x7 << 76) | (0b10 << 62)


def compose(ms: int, tail: int) -> uuid.UUID:
    """The UUIDv7 of a Unix millisecond and a 74-bit tail."""
    if not 0 <= ms < 1 << 48 or not 0 <= tail < _TAIL_END:
        raise ValueError(f"ms={ms} or tail={tail} is out of range for a UUIDv7")
    return uuid.UUID(int=ms << 80 | (tail >> 62) << 64 | tail & _RAND_B_MASK | _VERSION_AND_VARIANT)


def random_start() -> int:
    """A millisecond's first tail: 73 random bits (the top one of 74 clear)."""
    return int.from_bytes(os.urandom(10)) >> (80 - TAIL_BITS + 1)


class EventIds:
    """A source of increasing UUIDv7s; thread-safe. The clock and the random start are
    parameters so that tests can script them."""

    def __init__(
        self,
        now_ns: Callable[[], int] = time.time_ns,
        start: Callable[[], int] = random_start,
    ) -> None:
        self._now_ns, self._start = now_ns, start
        self.reset()
        _LIVE.add(self)

    def reset(self) -> None:
        """Forget the last id (a forked child must not count on from its parent's)."""
        self._lock = threading.Lock()  # a fresh one: a forked child's copy may be held
        self._ms, self._tail = -1, 0
        self._pid = os.getpid()

    def __call__(self) -> uuid.UUID:
        if self._pid != os.getpid():
            # Forked by C code (an embedding server, an extension): no at-fork handler ran,
            # and counting on from the parent's last id would make the parent's next ids.
            self.reset()
        ms = self._now_ns() // 1_000_000
        with self._lock:
            if ms > self._ms:
                self._ms, self._tail = ms, self._start()
            else:  # the same millisecond, or the clock went back: count on
                self._tail += 1
                if self._tail == _TAIL_END:  # 2**73 ids in a millisecond: borrow the next
                    self._ms, self._tail = self._ms + 1, self._start()
            ms, tail = self._ms, self._tail
        return compose(ms, tail)


_LIVE: weakref.WeakSet[EventIds] = weakref.WeakSet()


def _reset_after_fork() -> None:
    for ids in list(_LIVE):
        ids.reset()


os.register_at_fork(after_in_child=_reset_after_fork)

new_event_id = EventIds()
"""``publish()``'s ids: greater than every id this process made before."""
