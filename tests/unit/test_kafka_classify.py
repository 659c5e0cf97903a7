"""How the relay reacts to librdkafka's errors: poison rows move aside (I6), fenced relays
give their slot up (I4), everything else is retried."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer

from outbox.kafka import Verdict, classify

POISON = [
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.TOPIC_EXCEPTION,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.INVALID_RECORD,
    KafkaError.INVALID_MSG,
    KafkaError.INVALID_TIMESTAMP,
    KafkaError._INVALID_ARG,
    KafkaError.POLICY_VIOLATION,
]
FENCED = [
    KafkaError._FENCED,
    KafkaError.PRODUCER_FENCED,
    KafkaError.INVALID_PRODUCER_EPOCH,
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
]
TRANSIENT = [
    KafkaError._MSG_TIMED_OUT,
    KafkaError._TRANSPORT,
    KafkaError._ALL_BROKERS_DOWN,
    KafkaError._TIMED_OUT,
    KafkaError._QUEUE_FULL,
    KafkaError.NOT_ENOUGH_REPLICAS,
    KafkaError.NOT_ENOUGH_REPLICAS_AFTER_APPEND,
    KafkaError.LEADER_NOT_AVAILABLE,
    KafkaError.NOT_LEADER_FOR_PARTITION,
    KafkaError.REQUEST_TIMED_OUT,
    KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
    KafkaError.CONCURRENT_TRANSACTIONS,
    KafkaError.UNKNOWN_TOPIC_OR_PART,
]


@pytest.mark.parametrize("code", POISON)
def test_i6_errors_no_retry_can_fix_make_the_row_poison(code: int) -> None:
    assert classify(KafkaError(code)) is Verdict.POISON


@pytest.mark.parametrize("code", FENCED)
def test_i4_fencing_errors_give_the_slot_up(code: int) -> None:
    assert classify(KafkaError(code)) is Verdict.FENCED


@pytest.mark.parametrize("code", FENCED)
def test_i4_fencing_wins_over_fatal(code: int) -> None:
    # librdkafka raises a fenced producer's error as fatal.
    assert classify(KafkaError(code, fatal=True)) is Verdict.FENCED


@pytest.mark.parametrize("code", TRANSIENT)
def test_transient_errors_are_retried(code: int) -> None:
    assert classify(KafkaError(code)) is Verdict.TRANSIENT
    assert classify(KafkaError(code, retriable=True)) is Verdict.TRANSIENT


@pytest.mark.parametrize("code", [KafkaError._FATAL, KafkaError._GAPLESS_GUARANTEE, *TRANSIENT])
def test_fatal_errors_rebuild_the_producer(code: int) -> None:
    assert classify(KafkaError(code, "boom", fatal=True)) is Verdict.FATAL


@pytest.mark.parametrize("code", POISON)
def test_a_fatal_error_is_not_blamed_on_a_record(code: int) -> None:
    # A fatal producer can send nothing: burying the row would lose it for nothing.
    assert classify(KafkaError(code, fatal=True)) is Verdict.FATAL


@pytest.mark.parametrize(
    ("code", "verdict"),
    [(POISON[0], Verdict.POISON), (FENCED[0], Verdict.FENCED), (TRANSIENT[0], Verdict.TRANSIENT)],
)
def test_a_kafka_exception_is_classified_by_the_error_it_carries(
    code: int, verdict: Verdict
) -> None:
    assert classify(KafkaException(KafkaError(code))) is verdict


def test_i6_librdkafkas_own_oversize_refusal_is_poison() -> None:
    producer: Any = Producer(
        {"bootstrap.servers": "127.0.0.1:1", "message.max.bytes": 1000, "log_level": 0}
    )
    with pytest.raises(KafkaException) as caught:
        producer.produce("t", value=b"x" * 2000)
    assert classify(caught.value.args[0]) is Verdict.POISON
    producer.flush(0)
