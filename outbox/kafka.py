"""How the relay reads librdkafka's errors: pure classification, no I/O."""

from __future__ import annotations

from enum import Enum
from typing import Any

from confluent_kafka import KafkaError


class Verdict(Enum):
    POISON = "poison"  # this record can never be delivered: move it aside (I6)
    TRANSIENT = "transient"  # retry the batch with backoff
    FENCED = "fenced"  # another relay owns the transactional.id now: give the slot up
    FATAL = "fatal"  # the producer is unusable: build a new one


_POISON_CODES = frozenset(
    {
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.TOPIC_EXCEPTION,  # invalid topic name
        KafkaError.TOPIC_AUTHORIZATION_FAILED,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.INVALID_RECORD,
        KafkaError.INVALID_MSG,
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
    """Map a ``KafkaError`` to what the relay should do about it."""
    code = err.code()
    if code in _FENCED_CODES:
        return Verdict.FENCED
    if code in _POISON_CODES:
        return Verdict.POISON
    if err.fatal():
        return Verdict.FATAL
    return Verdict.TRANSIENT
