"""Which claimed rows no Kafka record can be built from (poison, I6): a pure decision."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from outbox.relay.rows import from_stored_bytes
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


def _stored(topic: bytes, names: list[bytes | None] | None) -> Row:
    """A row as a SQL_ASCII database's claim returns it (``sql.claim_batch``'s stored_bytes)."""
    return from_stored_bytes((1, uuid.uuid4(), topic, b"k", b"v", names, [b"1"] * 2, 0, 1))


def test_i6_stored_bytes_that_are_utf8_read_as_the_utf8_session_would_have() -> None:
    row = _stored("ördern".encode(), [b"a", "é".encode()])
    assert (row.topic, row.header_names) == ("ördern", ["a", "é"])
    assert record_defect(row) is None
    assert _stored(b"t", None).header_names is None  # NULL stays NULL: its own defect


@pytest.mark.parametrize(
    ("topic", "names", "reason"),
    [
        (b"orders\xff", [b"a", b"b"], "topic is not UTF-8 text (b'orders\\xff'"),
        (b"orders", [b"a", b"h\xc3("], "header_names[2] is not UTF-8 text (b'h\\xc3('"),
        (b"orders", [b"a", None], "header_names[2] is NULL"),
        (b"\xff" * 300, [b"a", b"b"], "and 100 bytes more"),
    ],
)
def test_i6_stored_bytes_that_are_not_utf8_make_a_defect_naming_the_column(
    topic: bytes, names: list[bytes | None], reason: str
) -> None:
    defect = record_defect(_stored(topic, names))
    assert defect is not None
    assert reason in defect
    assert defect.isascii()  # the dead table may be SQL_ASCII: its error must be plain ASCII
