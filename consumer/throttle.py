"""One log line per backoff step for a message that keeps repeating (a broker outage). Pure.

librdkafka reports every failed connection attempt of every broker connection,
through ``error_cb`` and its log callback: thousands of lines during an outage.
A message seen again is let through after 1, 2, 4 ... up to 60 seconds, with
the count of the copies held back in between; digits are ignored when telling
messages apart ("after 3ms" and "after 5ms" are the same line).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

_DIGITS = re.compile(r"\d+")


@dataclass(slots=True)
class _Seen:
    next_at: float
    interval: float
    last: float
    held: int = 0


@dataclass(slots=True)
class Throttle:
    """``admit(message, now)``: None to hold the line back, else how many were held back."""

    first_interval: float = 1.0
    max_interval: float = 60.0
    _seen: dict[str, _Seen] = field(default_factory=dict)

    def admit(self, message: str, now: float) -> int | None:
        key = _DIGITS.sub("#", message)
        seen = self._seen.get(key)
        if seen is None or now - seen.last > 2 * self.max_interval:
            if len(self._seen) > 1000:  # many distinct messages: start over, stay small
                self._seen.clear()
            self._seen[key] = _Seen(now + self.first_interval, self.first_interval, now)
            return 0
        seen.last = now
        if now < seen.next_at:
            seen.held += 1
            return None
        held, seen.held = seen.held, 0
        seen.interval = min(seen.interval * 2, self.max_interval)
        seen.next_at = now + seen.interval
        return held


class ThrottledLog:
    """What librdkafka's ``logger`` setting calls (``log(level, fmt, *args)``), throttled."""

    def __init__(self, logger: logging.Logger, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.throttle = Throttle()
        self.clock = clock

    def log(self, level: int, msg: str, *args: object) -> None:
        if not self.logger.isEnabledFor(level):
            return
        text = msg % args if args else msg
        held = self.throttle.admit(text, self.clock())
        if held is None:
            return
        if held:
            text += f" ({held} more like it since the last one)"
        self.logger.log(level, "%s", text)
