"""The latency breakdown's pure parts: the consumer's fetch is a stage of its own, and a
wake-up that found its slot still in its previous Kafka transaction is told apart."""

from __future__ import annotations

from benchmarks.latency_stages import breakdown, event_stages, wake_waits

BATCHES = [
    {"slot": 0, "ids": ["a"], "claimed": 10.000, "kafka_commit": 10.050},
    {"slot": 0, "ids": ["b"], "claimed": 10.060, "kafka_commit": 10.080},
    {"slot": 0, "ids": ["c"], "claimed": 10.200, "kafka_commit": 10.220},
]
COMMITTED = {"a": 9.999, "b": 10.010, "c": 10.195}
WAKES = [(9.9995, 0), (10.0105, 0), (10.1955, 0)]


def test_latency_breakdown_splits_readable_to_handler_at_the_consumer_fetch() -> None:
    by_event = event_stages(
        COMMITTED,
        BATCHES,
        WAKES,
        readable={"a": 10.060},
        handled={"a": 10.070},
        fetched={"a": 10.061},
    )
    steps = breakdown(by_event)["steps"]
    assert steps["readable -> fetched"]["p50_ms"] == 1.0
    assert steps["fetched -> handler"]["p50_ms"] == 9.0
    assert "readable -> handler" not in steps


def test_latency_wake_waits_tell_a_busy_slot_from_a_free_one() -> None:
    by_event = event_stages(COMMITTED, BATCHES, WAKES, readable={}, handled={})
    waits = wake_waits(by_event, BATCHES)
    # b's NOTIFY came while a's Kafka transaction was open: it waited for the batch cycle.
    assert waits["busy"]["n"] == 1
    assert waits["busy"]["p50_ms"] == 49.5
    assert waits["free"]["n"] == 2
    assert waits["busy"]["share"] == round(1 / 3, 3)
