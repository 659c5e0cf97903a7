"""The library's own exception classes, so callers never need to catch driver errors."""

from __future__ import annotations


class OutboxError(Exception):
    """Base class of every error this library raises on purpose."""


class ConfigError(OutboxError, ValueError):
    """Bad configuration, found before anything runs (I8).

    The message names the setting, the value and the fix.
    """


class EventError(OutboxError, ValueError):
    """An event that can never be published (bad topic, oversized record, ...)."""


class EventTooLarge(EventError):
    """An event above ``max_message_bytes``: a smaller one (a reference) may still go."""


class SlotLost(OutboxError):
    """This relay no longer owns a slot (its lock connection died or it was fenced)."""


class TransientError(OutboxError):
    """A failure worth retrying with backoff: broker down, leader change, DB restart."""


class DatabaseRefused(TransientError):
    """The database refused a statement on a live session (read-only, a revoked privilege, a
    trigger that raises): the relay retries with backoff and keeps its slot (I12)."""


class BatchRollback(OutboxError):
    """Raised inside a relay batch's database transaction to end it without a commit: its
    rows stay in the outbox (I2). The slot's session ends the transaction quietly."""


class KafkaUnavailable(TransientError):
    """The Kafka cluster cannot be reached (``relay --once`` reports it instead of waiting)."""


class NotMigrated(ConfigError):
    """The outbox tables are missing, or older than this version of the library (I8)."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            f"the outbox tables are missing or out of date in this database ({detail}): "
            "run `outbox migrate --db URL` (or apply the DDL of `outbox sql` by hand)"
        )


class NotFound(OutboxError, LookupError):
    """An operator named a row that does not exist (e.g. a dead row id)."""
