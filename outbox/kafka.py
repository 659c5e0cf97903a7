"""How the relay reads librdkafka's errors: pure classification, no I/O."""

from __future__ import annotations

from enum import Enum
from typing import Any

from confluent_kafka import KafkaError, KafkaException


class Verdict(Enum):
    POISON = "poison"  # this record can never be delivered: move it aside (I6)
    TRANSIENT = "transient"  # retry the batch with backoff
    FENCED = "fenced"  # another relay owns the transactional.id now: give the slot up
    FATAL = "fatal"  # the producer is unusable: build a new one


# Errors about one record that no retry can fix.
_POISON_CODES = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.TOPIC_EXCEPTION,  # invalid topic name
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,  # e.g. a null key for a compacted topic
        KafkaError.INVALID_MSG,
        KafkaError.INVALID_TIMESTAMP,  # created_at outside the topic's timestamp window
        KafkaError._INVALID_ARG,
        KafkaError.POLICY_VIOLATION,
    }
)
_FENCED_CODES = frozenset(
    {
        KafkaError._FENCED,
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    }
)


def classify(err: Any) -> Verdict:
    """Map a ``KafkaError`` (or a ``KafkaException`` holding one) to the relay's next step.

    Precedence: fenced, then fatal (a fatal producer can send nothing more, so no
    record can be blamed), then poison, then transient.
    """
    if isinstance(err, KafkaException) and err.args:
        err = err.args[0]
    code = err.code()
    if code in _FENCED_CODES:
        return Verdict.FENCED
    if err.fatal():
        return Verdict.FATAL
    if code in _POISON_CODES:
        return Verdict.POISON
    return Verdict.TRANSIENT


def message_headers(msg: Any) -> dict[str, bytes]:
    """A consumed record's headers as ``{name: bytes}`` (the last value wins on repeats)."""
    raw = msg.headers() or []
    pairs: list[tuple[str, Any]] = list(raw.items() if isinstance(raw, dict) else raw)
    return {
        name: value if isinstance(value, bytes) else str(value or "").encode()
        for name, value in pairs
    }
