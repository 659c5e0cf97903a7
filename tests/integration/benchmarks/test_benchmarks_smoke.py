"""The benchmark entry point runs end to end at its smallest size and reports every figure.

Only the smoke size runs in CI: it proves the benchmarks still work against the
current relay and consumer, not how fast they are. It does check that every
figure is a real measurement: finite numbers everywhere (the percentile of an
empty list is NaN), no phase that lost an event, and each headline figure in a
range no working build leaves, however slow the machine. It reuses the test session's
PostgreSQL and broker and needs no matplotlib (plots are checked only when it
is installed).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Broker, Services

ROOT = Path(__file__).resolve().parents[3]

PLAUSIBLE = {
    "write_overhead": (0.5, 5.0),  # x time per request, with / without publish()
    "end_to_end_latency": (0.1, 60_000.0),  # ms p99 commit -> handler
    "latency_stages": (-60_000.0, 60_000.0),  # ms p99 commit -> handler over the floor's
    "consumer_overhead": (0.05, 2.0),  # dedup / plain throughput
    "relay_throughput": (0.02, 3.0),  # relay / raw producer
    "relay_scaling": (0.1, 10.0),  # 4 slots / 1 slot
    "backlog_independence": (0.1, 20.0),  # time per batch, large / small backlog
    "relay_memory": (0.5, 5.0),  # peak RSS, large / small backlog
    "delivery_record": (0.2, 5.0),  # relay throughput, delivery record on / off
}
"""Wide bounds of each headline figure at the smoke size: outside them the benchmark measured
something else than it says (a zero, a unit slip, a phase that did nothing)."""


def _numbers(node: Any, path: str = "") -> Iterator[tuple[str, float]]:
    """Every number in a figure, with its path (``phases/<name>/commit_to_kafka/p99_ms``)."""
    if isinstance(node, bool):
        return
    if isinstance(node, int | float):
        yield path, float(node)
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _numbers(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _numbers(value, f"{path}/{i}")


def _deliveries(node: Any, path: str = "") -> Iterator[tuple[str, int, int]]:
    """Every ``{events, received}`` pair of a figure: what a phase sent and what arrived."""
    if isinstance(node, dict):
        if "events" in node and "received" in node:
            yield path, int(node["events"]), int(node["received"])
        for key, value in node.items():
            yield from _deliveries(value, f"{path}/{key}")


@pytest.mark.timeout(900)
def test_smoke_run_writes_every_figure(services: Services, broker: Broker, tmp_path: Path) -> None:
    if broker.name == "kafka":
        # It passes there too (134 s on 2 cores), but it checks the benchmark code, not the
        # broker; `python -m benchmarks.run --broker kafka` is where Kafka's figures belong.
        pytest.skip("the benchmark smoke run checks the benchmark code: once, on Tansu")
    from benchmarks.plots import write_all
    from benchmarks.run import FIGURES

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.run",
            "--size",
            "smoke",
            "--out",
            str(tmp_path),
            "--no-plots",
            "--db",
            services.admin_url,
            "--bootstrap-servers",
            broker.bootstrap_servers,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((tmp_path / "smoke.json").read_text())
    assert set(results["figures"]) == set(FIGURES) == set(PLAUSIBLE)
    for name, figure in results["figures"].items():
        assert figure["status"] == "measured", (name, figure["summary"])
        assert isinstance(figure["value"], float | int), name
        assert figure["summary"], name
        bad = [path for path, value in _numbers(figure) if not math.isfinite(value)]
        assert not bad, f"{name}: not a number at {bad}"
        low, high = PLAUSIBLE[name]
        assert low <= figure["value"] <= high, (name, figure["value"], figure["summary"])
        lost = [(p, sent, got) for p, sent, got in _deliveries(figure) if got != sent or not sent]
        assert not lost, f"{name}: phases that lost events (path, sent, received): {lost}"
    phases = results["figures"]["end_to_end_latency"]["phases"]
    assert phases
    assert all(list(_deliveries(p)) for p in phases.values()), phases
    table = (tmp_path / "smoke.md").read_text()
    assert table.count("\n| ") == len(FIGURES) + 1  # header + one row per figure

    written = write_all(results, tmp_path)
    if importlib.util.find_spec("matplotlib") is None:
        assert written is None  # the run says "plots skipped"; nothing else depends on it
    else:
        assert written is not None
        assert {p.name for p in written} == {f"smoke-{name}.png" for name in FIGURES}
