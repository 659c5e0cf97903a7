"""The benchmark results of the two brokers land in their own files and side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from benchmarks.run import comparison_table, parse, run_file_name, write_broker_comparison


@pytest.mark.parametrize(
    ("size", "broker", "name"),
    [
        ("default", "tansu", "default"),  # the README's existing files stay where they were
        ("default", "kafka", "default-kafka"),
        ("smoke", "kafka", "smoke-kafka"),
        ("full", "given", "full"),  # --bootstrap-servers: the size alone, as before
    ],
)
def test_each_broker_writes_its_own_result_files(size: str, broker: str, name: str) -> None:
    assert run_file_name(size, broker) == name


def test_broker_defaults_to_tansu_and_takes_kafka() -> None:
    assert parse([]).broker == "tansu"
    assert parse(["--broker", "kafka"]).broker == "kafka"
    with pytest.raises(SystemExit):
        parse(["--broker", "redpanda"])


def _results(broker: str, figures: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {
        "meta": {"command": f"run --broker {broker}", "broker": broker, "runtime_s": 1},
        "figures": figures,
    }


def test_the_comparison_puts_each_figure_of_both_brokers_on_one_row() -> None:
    latency = {"status": "measured", "unit": "ms", "target": "p99 <= 50 ms"}
    table = comparison_table(
        _results("tansu", {"end_to_end_latency": {**latency, "value": 186.3, "met": False}}),
        _results(
            "kafka",
            {
                "end_to_end_latency": {**latency, "value": 41.0, "met": True},
                "relay_memory": {"status": "failed", "summary": "boom"},
            },
        ),
    )
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0] == "| figure | target | Tansu | Apache Kafka |"
    assert rows[1] == (
        "| end-to-end latency | p99 <= 50 ms | **186.3** ms (**not met**) | **41** ms (met) |"
    )
    assert rows[2] == "| memory | — | not run | failed |"


def test_the_comparison_is_written_only_when_both_brokers_ran(tmp_path: Path) -> None:
    (tmp_path / "default.json").write_text(json.dumps(_results("tansu", {})))
    assert write_broker_comparison(tmp_path, "default") is None
    (tmp_path / "default-kafka.json").write_text(json.dumps(_results("kafka", {})))
    written = write_broker_comparison(tmp_path, "default")
    assert written == tmp_path / "default-brokers.md"
    assert "Apache Kafka: `run --broker kafka`" in written.read_text()
