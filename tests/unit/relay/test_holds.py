"""Held topics' clocks (I6): a topic is buried only after --missing-topic-timeout of failing,
and --once waits for every live hold."""

from __future__ import annotations

from outbox.relay.classify import TopicHolds, reached


def test_i6_once_waits_for_a_live_hold_even_behind_an_expired_one() -> None:
    holds = TopicHolds(timeout=300)
    holds.failed("gone", now=0.0)  # held until 0.5; its rows were claimed again, none left
    holds.failed("missing", now=10.0)  # held until 10.5
    assert holds.next_try(now=1.0) == 10.5
    assert holds.next_try(now=11.0) is None


def test_i6_a_topic_acknowledged_in_a_batch_that_failed_for_other_rows_counts_as_reached() -> None:
    rows = [(1, "t"), (2, "other"), (3, "t")]
    assert reached(rows, acked={1, 3}, failures={2}) == {"t"}
    assert reached(rows, acked={1}, failures={2, 3}) == set()  # t failed too: not reached


def test_i6_a_reached_topic_starts_its_hold_clock_again() -> None:
    holds = TopicHolds(timeout=10)
    holds.failed("t", now=0.0)
    holds.succeeded(reached([(1, "t"), (2, "u")], acked={1}, failures={2}))
    assert not holds.failed("t", now=9.5)  # timed from 9.5 now, not from 0
    assert holds.failed("t", now=19.5)
