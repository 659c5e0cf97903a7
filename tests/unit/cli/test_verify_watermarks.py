"""`outbox verify` and `outbox trace` ask a partition's watermarks again while its leader
moves (outbox/cli/delivery.py), instead of failing a check run during a leader election."""

from __future__ import annotations

import time
from typing import cast

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from outbox.cli import delivery


class _Leader:
    """A consumer whose partition leader answers ``errors`` first, then the watermarks."""

    def __init__(self, *errors: int) -> None:
        self.errors = list(errors)
        self.asked = 0

    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float = 15, cached: bool = False
    ) -> tuple[int, int]:
        self.asked += 1
        if self.errors:
            raise KafkaException(KafkaError(self.errors.pop(0)))
        return 3, 42


def test_a_check_during_a_leader_election_asks_the_moving_leader_again() -> None:
    # OFFSET_NOT_AVAILABLE: a new leader whose high watermark lags (from the review).
    leader = _Leader(
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.OFFSET_NOT_AVAILABLE,
    )
    assert delivery.watermarks(cast(Consumer, leader), "t", 0) == (3, 42)
    assert leader.asked == 4


def test_an_error_that_is_not_a_moving_leader_is_raised_at_once() -> None:
    leader = _Leader(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    with pytest.raises(KafkaException):
        delivery.watermarks(cast(Consumer, leader), "t", 0)
    assert leader.asked == 1


class _SlowLeader:
    """Answers NOT_LEADER_FOR_PARTITION after waiting out each ask's timeout (up to 0.25 s),
    as librdkafka does while no leader is known."""

    def __init__(self) -> None:
        self.timeouts: list[float] = []

    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float = 15, cached: bool = False
    ) -> tuple[int, int]:
        self.timeouts.append(timeout)
        time.sleep(min(timeout, 0.25))  # stands in for librdkafka's wait for a leader
        raise KafkaException(KafkaError(KafkaError.NOT_LEADER_FOR_PARTITION))


def test_a_leader_that_never_settles_is_raised_within_the_bound_with_each_ask_shortened(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # From the review: each ask had its own 15 s on top of the 30 s bound.
    monkeypatch.setattr(delivery, "LEADER_MOVE_SECONDS", 0.3)
    leader = _SlowLeader()
    began = time.monotonic()
    with pytest.raises(KafkaException):
        delivery.watermarks(cast(Consumer, leader), "t", 0)
    took = time.monotonic() - began
    assert len(leader.timeouts) > 1
    assert max(leader.timeouts) == 1.0  # what is left of the bound, at least 1 s, never 15
    assert took < 0.3 + 1.0 + 0.5
    assert "t [0]: the partition's leader is moving" in caplog.text
