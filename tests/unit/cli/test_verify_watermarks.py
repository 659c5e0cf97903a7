"""`outbox verify` and `outbox trace` ask a partition's watermarks again while its leader
moves (outbox/cli/delivery.py), instead of failing a check run during a leader election."""

from __future__ import annotations

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
    leader = _Leader(KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE)
    assert delivery.watermarks(cast(Consumer, leader), "t", 0) == (3, 42)
    assert leader.asked == 3


def test_an_error_that_is_not_a_moving_leader_is_raised_at_once() -> None:
    leader = _Leader(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    with pytest.raises(KafkaException):
        delivery.watermarks(cast(Consumer, leader), "t", 0)
    assert leader.asked == 1


def test_a_leader_that_never_settles_is_raised_after_a_bounded_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(delivery, "LEADER_MOVE_SECONDS", 0.3)
    leader = _Leader(*[KafkaError.NOT_LEADER_FOR_PARTITION] * 1000)
    with pytest.raises(KafkaException):
        delivery.watermarks(cast(Consumer, leader), "t", 0)
    assert 1 < leader.asked < 1000
