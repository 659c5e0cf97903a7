"""The chaos schedule starts once every relay slot has started (tests/chaos/harness.py)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.chaos import harness


@pytest.fixture
def live_process() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    yield proc
    proc.kill()
    proc.wait(10)


def _warm_up_seconds(log: Path, proc: subprocess.Popen[bytes], *, at_least_once: bool) -> float:
    member = harness.Member("relay", 0, 1, proc, log)
    service = SimpleNamespace(
        spec=SimpleNamespace(name="a"), relays=SimpleNamespace(members=[member])
    )
    run = SimpleNamespace(
        services=[service],
        phases={},
        config=SimpleNamespace(at_least_once=at_least_once),
        _supervise=lambda: None,
    )
    harness.Run._warm_up(run)  # type: ignore[arg-type]
    return float(run.phases["warm_up"])


def test_an_exactly_once_relay_is_warm_once_each_slot_read_its_marker(
    tmp_path: Path, live_process: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(harness, "WARM_UP_SECONDS", 1.0)
    log = tmp_path / "relay-0-1.log"
    log.write_text(
        "".join(f"slot {s}: no recovery marker under outbox-x-{s}\n" for s in range(harness.SLOTS))
    )
    assert _warm_up_seconds(log, live_process, at_least_once=False) < 0.5


def test_a_slot_that_has_not_started_keeps_the_schedule_waiting_until_the_bound(
    tmp_path: Path, live_process: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(harness, "WARM_UP_SECONDS", 0.5)
    log = tmp_path / "relay-0-1.log"
    log.write_text("slot 0: no recovery marker under outbox-x-0\n")  # slots 1-3 still starting
    assert _warm_up_seconds(log, live_process, at_least_once=False) >= 0.5


def test_an_at_least_once_relay_which_reads_no_marker_is_warm_once_it_holds_its_slots(
    tmp_path: Path, live_process: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # From the review: only an exactly-once relay reads a marker, so every at-least-once run
    # waited out the whole bound (60 s).
    monkeypatch.setattr(harness, "WARM_UP_SECONDS", 1.0)
    log = tmp_path / "relay-0-1.log"
    log.write_text(
        "".join(
            f"slot {s}: publishing shards [{s}] as outbox-x-{s}\n" for s in range(harness.SLOTS)
        )
    )
    assert _warm_up_seconds(log, live_process, at_least_once=True) < 0.5
