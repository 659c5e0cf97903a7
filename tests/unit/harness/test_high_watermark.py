"""The test reader's watermark lookup across a moving partition leader (tests/support.py)."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from tests.support import high_watermark


class _Leader:
    """A consumer whose partition leader answers ``errors`` first, then the watermarks."""

    def __init__(self, *errors: int) -> None:
        self.errors = list(errors)
        self.asked = 0

    def get_watermark_offsets(
        self, partition: TopicPartition, timeout: float, cached: bool
    ) -> tuple[int, int]:
        self.asked += 1
        if self.errors:
            raise KafkaException(KafkaError(self.errors.pop(0)))
        return 0, 42


def test_a_read_right_after_a_node_came_back_asks_the_moving_leader_again() -> None:
    # A CI run's read failed at once on NOT_LEADER_FOR_PARTITION after a killed node restarted.
    leader = _Leader(KafkaError.NOT_LEADER_FOR_PARTITION, KafkaError.LEADER_NOT_AVAILABLE)
    deadline = time.monotonic() + 10
    assert high_watermark(leader, TopicPartition("t", 0), deadline) == 42
    assert leader.asked == 3


def test_an_error_that_is_not_a_moving_leader_is_raised_at_once() -> None:
    leader = _Leader(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    with pytest.raises(KafkaException):
        high_watermark(leader, TopicPartition("t", 0), time.monotonic() + 10)
    assert leader.asked == 1


def test_a_leader_that_never_settles_is_raised_after_the_deadline() -> None:
    leader = _Leader(*[KafkaError.NOT_LEADER_FOR_PARTITION] * 1000)
    with pytest.raises(KafkaException):
        high_watermark(leader, TopicPartition("t", 0), time.monotonic() - 1)
    assert leader.asked == 1
