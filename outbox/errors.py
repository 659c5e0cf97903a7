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


class SlotLost(OutboxError):
    """This relay no longer owns a slot (its lock connection died or it was fenced)."""


class TransientError(OutboxError):
    """A failure worth retrying with backoff: broker down, leader change, DB restart."""


class KafkaUnavailable(TransientError):
    """The Kafka cluster cannot be reached (``relay --once`` reports it instead of waiting)."""
