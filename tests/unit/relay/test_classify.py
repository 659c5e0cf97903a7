"""How the relay reacts to librdkafka's errors (``outbox.relay.classify.TABLE``): poison rows
move aside (I6), request-wide refusals are narrowed down first, missing topics are held for a
bounded time, fatal producers are rebuilt, fenced relays give their slot up (I4), and
configuration errors stop the relay naming the fix (I8); everything else is retried."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer

from outbox.relay.classify import TABLE, TopicHolds, Verdict, classify, config_fix, settled

POISON = [
    KafkaError.TOPIC_EXCEPTION,
    KafkaError.INVALID_RECORD,
    KafkaError.INVALID_MSG,
    KafkaError.INVALID_TIMESTAMP,
    KafkaError._INVALID_ARG,
    KafkaError.POLICY_VIOLATION,
    KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT,
]
REQUEST = [KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE]
TOPIC = [
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError._UNKNOWN_TOPIC,
    KafkaError._UNKNOWN_PARTITION,
    KafkaError.UNKNOWN_TOPIC_ID,
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
]
FENCED = [KafkaError._FENCED, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH]
CONFIG = [
    KafkaError._AUTHENTICATION,
    KafkaError.SASL_AUTHENTICATION_FAILED,
    KafkaError._SSL,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    KafkaError.INVALID_TRANSACTION_TIMEOUT,
    KafkaError.UNSUPPORTED_VERSION,
    KafkaError._UNSUPPORTED_FEATURE,
    KafkaError.SECURITY_DISABLED,
    KafkaError.INVALID_REQUIRED_ACKS,
    KafkaError.INVALID_CONFIG,
    KafkaError._NOT_CONFIGURED,
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
    KafkaError._PURGE_QUEUE,
    KafkaError._PURGE_INFLIGHT,
]
CLASSES = {
    Verdict.POISON: POISON,
    Verdict.REQUEST: REQUEST,
    Verdict.TOPIC: TOPIC,
    Verdict.FENCED: FENCED,
    Verdict.CONFIG: CONFIG,
}


def test_the_table_is_exactly_the_classes_tested_here() -> None:
    assert dict(TABLE) == {code: v for v, codes in CLASSES.items() for code in codes}


@pytest.mark.parametrize("code", POISON)
def test_i6_errors_no_retry_can_fix_make_the_row_poison(code: int) -> None:
    assert classify(KafkaError(code)) is Verdict.POISON


@pytest.mark.parametrize("code", REQUEST)
def test_i6_a_request_wide_refusal_blames_no_row_of_a_shared_request(code: int) -> None:
    assert classify(KafkaError(code)) is Verdict.REQUEST


@pytest.mark.parametrize("code", REQUEST)
def test_i6_a_request_wide_refusal_of_a_row_sent_alone_is_its_own(code: int) -> None:
    assert classify(KafkaError(code), alone=True) is Verdict.POISON


@pytest.mark.parametrize("code", TOPIC)
def test_a_missing_or_unwritable_topic_is_held_not_retried_forever(code: int) -> None:
    assert classify(KafkaError(code)) is Verdict.TOPIC


def test_a_delivery_timeout_is_the_topics_fault_only_when_the_topic_is_missing() -> None:
    timed_out = KafkaError(KafkaError._MSG_TIMED_OUT)
    assert classify(timed_out) is Verdict.TRANSIENT
    assert classify(timed_out, topic_missing=True) is Verdict.TOPIC


@pytest.mark.parametrize("code", FENCED)
def test_i4_fencing_errors_give_the_slot_up(code: int) -> None:
    assert classify(KafkaError(code)) is Verdict.FENCED


@pytest.mark.parametrize("code", FENCED)
def test_i4_fencing_wins_over_fatal(code: int) -> None:
    # librdkafka raises a fenced producer's error as fatal.
    assert classify(KafkaError(code, fatal=True)) is Verdict.FENCED


@pytest.mark.parametrize("code", CONFIG)
def test_i8_configuration_errors_stop_the_relay_even_when_fatal(code: int) -> None:
    # A rebuilt producer would fail the same way (CLUSTER_AUTHORIZATION_FAILED is fatal).
    assert classify(KafkaError(code)) is Verdict.CONFIG
    assert classify(KafkaError(code, fatal=True)) is Verdict.CONFIG
    assert "; " in config_fix(KafkaError(code))


@pytest.mark.parametrize("code", TRANSIENT)
def test_transient_errors_are_retried(code: int) -> None:
    assert classify(KafkaError(code)) is Verdict.TRANSIENT
    assert classify(KafkaError(code, retriable=True)) is Verdict.TRANSIENT


@pytest.mark.parametrize("code", [KafkaError._FATAL, KafkaError._GAPLESS_GUARANTEE, *TRANSIENT])
def test_fatal_errors_rebuild_the_producer(code: int) -> None:
    assert classify(KafkaError(code, "boom", fatal=True)) is Verdict.FATAL


@pytest.mark.parametrize("code", POISON + REQUEST + TOPIC)
def test_a_fatal_error_is_not_blamed_on_a_record(code: int) -> None:
    # A fatal producer can send nothing: burying the row would lose it for nothing.
    assert classify(KafkaError(code, fatal=True)) is Verdict.FATAL
    assert classify(KafkaError(code, fatal=True), alone=True) is Verdict.FATAL


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
    # produce() raised it for this record alone.
    assert classify(caught.value.args[0], alone=True) is Verdict.POISON
    producer.flush(0)


@pytest.mark.parametrize(
    ("rows", "acked", "moved", "deleted"),
    [
        # every report in: all go
        ([(1, "a"), (2, "a")], {1, 2}, set(), [1, 2]),
        # no report (flush timed out, broker away): nothing goes (the loss of issue 14)
        ([(1, "a"), (2, "a")], set(), set(), []),
        # a row after an unacknowledged one of the same topic is sent again, in order (I3)
        ([(1, "a"), (2, "a"), (3, "b")], {2, 3}, set(), [3]),
        # a buried row holds nothing back (I6)
        ([(1, "a"), (2, "a")], {2}, {1}, [2]),
        # rows of another topic are not held back by a missing topic
        ([(1, "missing"), (2, "b"), (3, "missing"), (4, "b")], {2, 4}, set(), [2, 4]),
    ],
)
def test_i2_at_least_once_deletes_exactly_the_acknowledged_rows(
    rows: list[tuple[int, str]], acked: set[int], moved: set[int], deleted: list[int]
) -> None:
    assert settled(rows, acked, moved) == deleted


def test_a_held_topic_is_retried_with_backoff_then_buried_at_its_deadline() -> None:
    holds = TopicHolds(timeout=10.0)
    assert not holds.failed("t", now=100.0)
    assert holds.held(100.0) == ["t"]
    assert holds.held(100.0 + 0.6) == []  # tried again after the first backoff step
    assert not holds.failed("t", now=101.0)
    assert holds.held(101.0) == ["t"]
    assert holds.until["t"] - 101.0 > 0.5  # the step grew
    assert not holds.failed("t", now=109.0)
    assert holds.until["t"] <= 110.0  # never held past the deadline
    assert holds.failed("t", now=110.0)  # time is up: bury
    assert holds.held(110.0) == []
    holds.succeeded(["t"])  # the topic appeared: it starts over
    assert not holds.failed("t", now=200.0)


def test_other_topics_are_never_held_back_by_one() -> None:
    holds = TopicHolds(timeout=10.0)
    holds.failed("missing", now=0.0)
    assert holds.held(0.0) == ["missing"]
    holds.succeeded(["other"])
    assert holds.held(0.0) == ["missing"]
