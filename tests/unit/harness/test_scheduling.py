"""The order xdist hands the tests out (tests/scheduling.py): the longest unit first."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import xdist_group_of
from tests.scheduling import (
    KEPT_SECONDS,
    UNIT_TEST_SECONDS,
    UNKNOWN_SECONDS,
    expected_seconds,
    kept,
    longest_first,
    merged,
    read_committed,
)


def _unit(nodeid: str) -> str:
    return xdist_group_of(nodeid) or nodeid


def _ordered(nodeids: list[str], measured: dict[str, float]) -> list[str]:
    return [nodeids[i] for i in longest_first(nodeids, _unit, measured)]


def test_a_long_test_collected_last_is_handed_out_first() -> None:
    nodeids = [
        "tests/unit/test_a.py::test_quick",
        "tests/integration/test_b.py::test_medium[tansu]",
        "tests/integration/benchmarks/test_c.py::test_smoke[tansu]",
    ]
    measured = {nodeids[1]: 5.0, nodeids[2]: 120.0}
    assert _ordered(nodeids, measured) == [nodeids[2], nodeids[1], nodeids[0]]


def test_a_group_is_ranked_by_the_sum_of_its_tests_and_stays_together_in_its_own_order() -> None:
    kafka = [f"tests/integration/test_k.py::test_{i}[kafka]" for i in range(3)]
    single = "tests/integration/test_s.py::test_long[tansu]"
    nodeids = [kafka[0], single, kafka[1], kafka[2]]
    # 3 x 40 s of [kafka] tests outweigh one 100 s test; the group is not split or reordered.
    measured = {**dict.fromkeys(kafka, 40.0), single: 100.0}
    assert _ordered(nodeids, measured) == [*kafka, single]
    measured[single] = 130.0
    assert _ordered(nodeids, measured) == [single, *kafka]


def test_tests_never_measured_come_after_the_measured_long_ones_and_before_unit_tests() -> None:
    assert expected_seconds("tests/integration/x.py::test_new", {}) == UNKNOWN_SECONDS
    assert expected_seconds("tests/unit/x.py::test_new", {}) == UNIT_TEST_SECONDS
    nodeids = ["tests/unit/x.py::test_u", "tests/integration/x.py::test_new", "tests/a.py::test_l"]
    assert _ordered(nodeids, {"tests/a.py::test_l": 30.0}) == [
        "tests/a.py::test_l",
        "tests/integration/x.py::test_new",
        "tests/unit/x.py::test_u",
    ]


def test_ties_keep_the_collection_order() -> None:
    nodeids = [f"tests/unit/t.py::test_{i}" for i in range(5)]
    assert _ordered(nodeids, {}) == nodeids


def test_the_last_run_overrides_the_committed_durations_and_only_long_tests_are_kept() -> None:
    both = merged({"a": 10.0, "b": 50.0}, {"b": 20.0, "c": 0.1})
    assert both == {"a": 10.0, "b": 20.0, "c": 0.1}
    assert kept(both) == {"a": 10.0, "b": 20.0}
    assert all(seconds >= KEPT_SECONDS for seconds in kept(both).values())


def test_a_missing_or_broken_durations_file_orders_nothing_but_stops_nothing(
    tmp_path: Path,
) -> None:
    assert read_committed(tmp_path / "absent.json") == {}
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    assert read_committed(broken) == {}
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    assert read_committed(listed) == {}
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"t": 3, "u": "x"}))
    assert read_committed(good) == {"t": 3.0}


def test_the_committed_durations_file_is_readable_and_names_the_long_tests() -> None:
    committed = read_committed()
    assert committed, "tests/durations.json is empty: run `python -m tests.scheduling`"
    assert all(nodeid.startswith("tests/") for nodeid in committed)
