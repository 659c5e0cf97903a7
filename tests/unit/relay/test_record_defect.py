"""Which claimed rows no Kafka record can be built from (poison, I6): a pure decision."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from outbox.relay.worker import Row, record_defect


def _row(names: Any, values: Any) -> Row:
    return Row(1, uuid.uuid4(), "t", b"k", b"v", names, values, 0, 1)


@pytest.mark.parametrize(
    ("names", "values", "reason"),
    [
        (["a", "b"], [b"1"], "header_names has 2 entries but header_values 1"),
        ([], [b"1"], "header_names has 0 entries but header_values 1"),
        (["a", None], [b"1", b"2"], "header_names[2] is NULL"),
        ([["a"], ["b"]], [[b"1"], [b"2"]], "header_names[1] is not text"),
        (None, [], "header_names or header_values is NULL"),
    ],
)
def test_i6_a_row_no_record_can_be_built_from_is_named_with_its_reason(
    names: Any, values: Any, reason: str
) -> None:
    defect = record_defect(_row(names, values))
    assert defect is not None
    assert reason in defect


@pytest.mark.parametrize(
    ("names", "values"), [([], []), (["a"], [b"1"]), (["a", "a"], [None, b""])]
)
def test_i6_rows_publish_can_write_have_no_defect(names: Any, values: Any) -> None:
    assert record_defect(_row(names, values)) is None
