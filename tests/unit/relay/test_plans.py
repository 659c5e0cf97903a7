"""What a batch's failures mean: the precedence fenced > configuration > fatal > topic/poison >
request > transient, and each single-error decision, as tables."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError

from outbox.relay.plans import (
    Act,
    BatchPlan,
    Narrow,
    plan_abort_error,
    plan_batch,
    plan_producer_error,
    plan_start_error,
    timed_out_topics,
)

FENCED = KafkaError.PRODUCER_FENCED
CONFIG = KafkaError.TOPIC_AUTHORIZATION_FAILED  # TOPIC, not CONFIG: see below
AUTH = KafkaError.SASL_AUTHENTICATION_FAILED
FATAL = KafkaError._FATAL
TOPIC = KafkaError.UNKNOWN_TOPIC_OR_PART
POISON = KafkaError.INVALID_RECORD
REQUEST = KafkaError.MSG_SIZE_TOO_LARGE
TRANSIENT = KafkaError._TRANSPORT
TIMED_OUT = KafkaError._MSG_TIMED_OUT

ROWS = [(1, "a"), (2, "a"), (3, "b"), (4, "c")]


def err(code: int) -> KafkaError:
    return KafkaError(code, fatal=code == FATAL)


def plan(codes: dict[int, int], **kwargs: Any) -> BatchPlan:
    return plan_batch(ROWS, {i: err(c) for i, c in codes.items()}, tid="t-0", **kwargs)


def act(p: BatchPlan) -> Act | None:
    return p.failure.act if p.failure is not None else None


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        # The first stopper present wins, whatever else failed, and nothing is buried.
        ({1: TRANSIENT, 2: POISON, 3: REQUEST, 4: FENCED}, Act.FENCED),
        ({1: AUTH, 2: FENCED}, Act.FENCED),
        ({1: POISON, 2: AUTH, 3: FATAL}, Act.REFUSE),
        ({1: POISON, 2: TOPIC, 3: FATAL}, Act.REBUILD),
        ({1: TRANSIENT, 2: FATAL}, Act.REBUILD),
        # Then rows are blamed, and a transient failure among them still retries the batch.
        ({1: POISON, 2: TRANSIENT}, Act.RETRY),
        ({1: POISON, 3: TOPIC}, None),
        ({1: REQUEST, 2: REQUEST}, None),
        ({1: TRANSIENT}, Act.RETRY),
        ({}, None),
    ],
)
def test_i6_the_precedence_of_a_batchs_failures_is_fenced_config_fatal_rows_transient(
    codes: dict[int, int], expected: Act | None
) -> None:
    p = plan(codes)
    assert act(p) is expected
    if expected in (Act.FENCED, Act.REFUSE, Act.REBUILD):
        assert (dict(p.bury), p.hold, p.narrow) == ({}, (), None)


def test_i6_poison_rows_are_buried_with_their_error_and_nothing_else_is() -> None:
    p = plan({2: POISON, 3: TRANSIENT})
    assert list(p.bury) == [2]
    assert p.bury[2].startswith("INVALID_RECORD: ")
    assert act(p) is Act.RETRY
    assert p.failure is not None
    assert p.failure.message.startswith("1 records failed: ")


def test_i6_a_missing_topic_is_held_until_its_time_is_up_then_its_rows_are_buried() -> None:
    held = plan({1: TOPIC, 2: TOPIC, 4: POISON})
    assert [h.topic for h in held.hold] == ["a"]
    assert list(held.bury) == [4]
    assert act(held) is None
    buried = plan({1: TOPIC, 2: TOPIC}, expired={"a"}, hold_timeout=10)
    assert buried.hold == ()
    assert buried.released == ("a",)
    assert list(buried.bury) == [1, 2]
    assert "--missing-topic-timeout=10s" in buried.bury[1]


def test_i6_a_delivery_timeout_is_the_topics_fault_only_when_the_cluster_says_it_is_missing() -> (
    None
):
    assert act(plan({3: TIMED_OUT})) is Act.RETRY
    assert [h.topic for h in plan({3: TIMED_OUT}, missing={"b"}).hold] == ["b"]
    assert timed_out_topics(ROWS, {3: err(TIMED_OUT), 1: err(TRANSIENT)}) == {"b"}


def test_i6_a_request_wide_refusal_narrows_up_to_its_last_row_and_blames_none_yet() -> None:
    p = plan({1: REQUEST, 3: REQUEST})
    assert p.narrow == Narrow(until=3, refused=2, error=str(err(REQUEST)))
    assert dict(p.bury) == {}
    alone = plan_batch([(7, "a")], {7: err(REQUEST)})
    assert list(alone.bury) == [7]  # alone in its request: the refusal is its own
    assert alone.narrow is None


@pytest.mark.parametrize(
    ("batch_error", "codes", "expected"),
    [
        (FENCED, {1: POISON}, Act.FENCED),
        (AUTH, {1: POISON}, Act.REFUSE),
        (TRANSIENT, {}, Act.RETRY),
        (TRANSIENT, {1: FATAL}, Act.REBUILD),
        (TRANSIENT, {1: POISON}, Act.RETRY),
    ],
)
def test_i12_a_failed_kafka_transaction_is_judged_before_its_rows(
    batch_error: int, codes: dict[int, int], expected: Act
) -> None:
    p = plan(codes, batch_error=err(batch_error))
    assert act(p) is expected
    if expected is Act.RETRY and not codes:
        assert p.failure is not None
        assert p.failure.message.startswith("Kafka transaction failed: ")


def test_i4_a_fence_names_the_transactional_id() -> None:
    p = plan({1: FENCED})
    assert p.failure is not None
    assert p.failure.message == "fenced: another relay took transactional.id t-0"
    assert plan_producer_error(err(FENCED), tid="t-0").act is Act.FENCED
    assert plan_producer_error(err(FATAL), tid="t-0").act is Act.REBUILD


@pytest.mark.parametrize(
    ("code", "stopping", "expected"),
    [
        (KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED, False, Act.REFUSE),
        (KafkaError._TIMED_OUT, False, Act.RETRY),
        (KafkaError._TIMED_OUT, True, Act.GIVE_UP),
        (KafkaError.PRODUCER_FENCED, False, Act.GIVE_UP),
    ],
)
def test_i8_init_transactions_failures(code: int, stopping: bool, expected: Act) -> None:
    assert plan_start_error(err(code), stopping=stopping).act is expected


def test_i4_an_abort_that_finds_the_producer_fenced_loses_the_slot() -> None:
    assert plan_abort_error(err(FENCED)).act is Act.FENCED
    assert plan_abort_error(err(TRANSIENT)).act is Act.REBUILD


def test_topic_authorization_is_a_topic_hold_not_a_refusal() -> None:
    assert [h.topic for h in plan({3: CONFIG}).hold] == ["b"]
