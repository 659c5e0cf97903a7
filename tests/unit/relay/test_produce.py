"""What ``produce`` keeps of each delivery report (pure: the producer is a stand-in)."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any

from outbox.relay.publishers import produce
from outbox.relay.rows import Row


class Reporting:
    """Reports each record delivered at once, at the offsets given (None: no offset)."""

    def __init__(self, offsets: list[int | None]) -> None:
        self.offsets = offsets

    def produce(self, topic: str, *, on_delivery: Any, **_: Any) -> None:
        offset = self.offsets.pop(0)
        on_delivery(None, SimpleNamespace(partition=lambda: 2, offset=lambda: offset))

    def poll(self, timeout: float = -1) -> int:
        return 0


def test_i2_a_report_without_an_offset_is_acknowledged_and_leaves_the_event_unplaced() -> None:
    rows = [Row(i, uuid.uuid4(), "t", b"k", b"v", [], [], 0, 1) for i in (1, 2, 3)]
    failures: dict[int, Any] = {}
    acked: set[int] = set()
    placed: dict[int, tuple[int, int]] = {}

    reporting = Reporting([5, None, -1])
    produce(reporting, rows, failures, acked, placed, room_timeout=1.0)  # type: ignore[arg-type]

    assert (failures, acked) == ({}, {1, 2, 3})
    assert placed == {1: (2, 5)}
