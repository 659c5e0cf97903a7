"""Which broker runs which test: the skip rules of tests/conftest.py, table-driven."""

from __future__ import annotations

import pytest

from tests.conftest import runs_on_kafka, skip_reason, xdist_group_of


@pytest.mark.parametrize(
    ("broker_name", "markers", "external_filters", "runs"),
    [
        ("tansu", set(), False, True),
        ("kafka", set(), False, True),
        ("external", set(), False, True),
        ("tansu", {"needs_abort_filtering"}, False, False),
        ("kafka", {"needs_abort_filtering"}, False, True),
        ("external", {"needs_abort_filtering"}, False, False),
        ("external", {"needs_abort_filtering"}, True, True),
        ("tansu", {"needs_apache_kafka"}, False, False),
        ("external", {"needs_apache_kafka"}, True, False),
        ("kafka", {"needs_apache_kafka", "needs_abort_filtering"}, False, True),
    ],
)
def test_a_test_runs_only_on_brokers_that_have_what_it_needs(
    broker_name: str, markers: set[str], external_filters: bool, runs: bool
) -> None:
    reason = skip_reason(broker_name, markers, external_filters=external_filters)
    assert (reason is None) == runs, reason


@pytest.mark.parametrize(
    ("markers", "every_test", "kept"),
    [
        (set(), False, False),  # nothing broker-specific: Tansu only
        ({"both_brokers"}, False, True),
        ({"needs_abort_filtering"}, False, True),
        ({"needs_apache_kafka"}, False, True),
        (set(), True, True),  # OUTBOX_TEST_BROKER=kafka or OUTBOX_TEST_ALL_BROKERS=1
    ],
)
def test_only_tests_that_check_what_apache_kafka_shows_run_on_it_by_default(
    markers: set[str], every_test: bool, kept: bool
) -> None:
    assert runs_on_kafka(markers, every_test=every_test) is kept


@pytest.mark.parametrize(
    ("nodeid", "group"),
    [
        ("tests/integration/relay/test_relay.py::test_x[kafka]", "kafka"),
        ("tests/integration/relay/test_relay.py::test_x[kafka-exactly-once]", "kafka"),
        ("tests/acceptance/test_chaos.py::test_i2_chaos[kafka]", "kafka"),
        ("tests/acceptance/test_chaos.py::test_i2_chaos[tansu]", "one_at_a_time"),
        ("tests/integration/relay/test_relay.py::test_x[tansu]", None),
        ("tests/unit/benchmarks/test_b.py::test_files[default-kafka-default-kafka]", None),
    ],
)
def test_the_kafka_runs_share_one_xdist_worker_and_so_do_the_chaos_runs(
    nodeid: str, group: str | None
) -> None:
    assert xdist_group_of(nodeid) == group
