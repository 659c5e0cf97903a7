"""librdkafka's lines go through the logger with repeats held back: one line per backoff step."""

from __future__ import annotations

import logging

from outbox.logs import RepeatFilter, librdkafka_logger


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _record(msg: str) -> logging.LogRecord:
    return logging.LogRecord("outbox.librdkafka", logging.WARNING, "", 0, msg, None, None)


def test_an_outage_writes_one_line_per_backoff_step_not_one_per_attempt() -> None:
    clock = Clock()
    keep = RepeatFilter(longest=60.0, clock=clock)
    passed: list[str] = []
    for tick in range(600):  # ten reconnect attempts a second for a minute
        clock.now = tick / 10
        record = _record(f"FAIL: 127.0.0.1:{9092 + tick % 3}: Connect failed ({tick} suppressed)")
        if keep.filter(record):
            passed.append(record.getMessage())
    # 0, 1, 3, 7, 15, 31 s: steps of 1, 2, 4, 8, 16, 32 s
    assert len(passed) == 6
    assert "more like it held back" in passed[-1]


def test_different_lines_are_not_held_back_by_each_other() -> None:
    keep = RepeatFilter(clock=Clock())
    assert keep.filter(_record("broker down"))
    assert keep.filter(_record("authentication failed"))
    assert not keep.filter(_record("broker down"))


def test_a_line_unseen_for_the_longest_step_starts_over() -> None:
    clock = Clock()
    keep = RepeatFilter(longest=10.0, clock=clock)
    assert keep.filter(_record("x"))
    clock.now = 100.0
    assert keep.filter(_record("x"))
    clock.now = 100.5
    assert not keep.filter(_record("x"))


def test_every_kafka_client_of_the_relay_logs_through_the_filtered_logger() -> None:
    assert any(isinstance(f, RepeatFilter) for f in librdkafka_logger().filters)
