"""Which broker runs which test: the skip rules of tests/conftest.py, table-driven."""

from __future__ import annotations

import pytest

from tests.conftest import skip_reason


@pytest.mark.parametrize(
    ("broker", "markers", "external_filters", "runs"),
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
    broker: str, markers: set[str], external_filters: bool, runs: bool
) -> None:
    reason = skip_reason(broker, markers, external_filters=external_filters)
    assert (reason is None) == runs, reason
