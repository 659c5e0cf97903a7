"""Log setup for the CLI: plain or JSON lines, and never a secret (I8)."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from outbox.db import redact

# Attributes every LogRecord has; anything else was passed with ``extra=`` and is context.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class RedactingFormatter(logging.Formatter):
    """Plain text, with passwords in DSNs replaced by ***."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra=`` fields (slot, event_id, batch_id...) become keys."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "thread": record.threadName,
            "msg": redact(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                doc[key] = (
                    value if isinstance(value, int | float | bool | None) else redact(str(value))
                )
        if record.exc_info:
            doc["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(doc, ensure_ascii=False)


_NUMBERS = re.compile(r"\d+")


class RepeatFilter(logging.Filter):
    """Lets a repeated line through once per backoff step, not each time.

    librdkafka says the same thing for every reconnect attempt of every client
    (hundreds of lines in an outage); lines equal but for their numbers count as
    one. A line passes, then its repeats are held back for 1 s, 2 s, 4 s... up to
    ``longest``; the next one that passes says how many were held back. A line
    unseen for ``longest`` starts over.
    """

    def __init__(self, longest: float = 60.0, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.longest = longest
        self.clock = clock
        self._seen: dict[str, tuple[float, float, int]] = {}  # key -> (next, step, held)
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = f"{record.levelno}:{_NUMBERS.sub('#', record.getMessage())}"
        now = self.clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is not None and now < entry[0]:
                self._seen[key] = (entry[0], entry[1], entry[2] + 1)
                return False
            if entry is None or now - entry[0] >= self.longest:
                step, held = 1.0, 0
            else:
                step, held = min(self.longest, entry[1] * 2), entry[2]
            self._seen[key] = (now + step, step, 0)
            if len(self._seen) > 1000:  # many distinct lines: forget the oldest
                self._seen.pop(next(iter(self._seen)))
        if held:
            record.msg = f"{record.getMessage()} ({held} more like it held back)"
            record.args = None
        return True


_LIBRDKAFKA = logging.getLogger("outbox.librdkafka")
_LIBRDKAFKA.addFilter(RepeatFilter())


def librdkafka_logger() -> logging.Logger:
    """The logger every Kafka client of the relay hands librdkafka (its ``logger``
    setting), so its lines go through the handlers and formatters of the process,
    with repeats held back (one line per backoff step in an outage)."""
    return _LIBRDKAFKA


def setup_logging(level: str, *, json_lines: bool = False) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        JsonFormatter()
        if json_lines
        else RedactingFormatter("%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s")
    )
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
