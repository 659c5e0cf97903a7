"""One claimed outbox row, and why no Kafka record can be built from some (I6)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, cast

from outbox.codec import record_size

Headers = list[tuple[str, str | bytes | None]]
"""A record's headers as confluent-kafka takes them."""

HEADER_ALLOWANCE = 16 * 1024
"""Rows whose key + value come within this of message.max.bytes get the exact size check."""


class Row(NamedTuple):
    """One claimed outbox row, in CLAIM_BATCH's column order.

    A tuple built by ``Row._make`` (C speed) rather than a dataclass: one is
    made for every relayed row, and a frozen dataclass's ``__init__`` cost
    ~1.5 µs of the relay's ~11 µs of CPU per event.
    """

    id: int
    event_id: Any
    topic: str
    key: bytes | None
    value: bytes | None
    header_names: list[str]
    header_values: list[bytes]
    created_ms: int  # the record's timestamp: when the event was written
    value_bytes: int  # octet_length(value): known even when the claim left a huge value out

    @property
    def headers(self) -> Headers:
        return list(zip(self.header_names, self.header_values, strict=True))

    @property
    def size(self) -> int:
        """What librdkafka compares with message.max.bytes."""
        return (
            record_size(self.key, None, zip(self.header_names, self.header_values, strict=True))
            + self.value_bytes
        )

    @property
    def left_out(self) -> bool:
        """The claim did not load the value: it is above message.max.bytes on its own."""
        return self.value is None and self.value_bytes > 0

    def may_exceed(self, limit: int) -> bool:
        """Cheap pre-check: only rows near the limit pay for the exact size."""
        return self.value_bytes + len(self.key or b"") + HEADER_ALLOWANCE > limit


def from_stored_bytes(values: Sequence[Any]) -> Row:
    """A row claimed with its topic and header names as stored bytes (``sql.claim_batch``'s
    ``stored_bytes``), decoded as the UTF8 session would have; what is not UTF-8 stays bytes,
    for ``record_defect`` to refuse."""
    row = Row._make(values)
    names = row.header_names
    return row._replace(
        topic=_utf8_or_bytes(row.topic),
        header_names=None if names is None else [_utf8_or_bytes(n) for n in names],
    )


def _utf8_or_bytes(raw: Any) -> Any:
    if isinstance(raw, bytes):
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return raw
    return raw


def record_defect(row: Row) -> str | None:
    """Why no Kafka record can be built from ``row``, or None. Such a row is poison (I6):
    ``publish()`` never writes one, but another writer (a SQL backfill, another service, a
    table from before its constraints) can."""
    names, values, topic = row.header_names, row.header_values, cast(object, row.topic)
    if isinstance(topic, bytes):
        return f"topic is not UTF-8 text ({_shown(topic)}; a SQL_ASCII database stores any bytes)"
    if names is None or values is None:
        return "header_names or header_values is NULL"
    if len(names) != len(values):
        return f"header_names has {len(names)} entries but header_values {len(values)}"
    for i, name in enumerate(names, 1):  # positions as SQL counts them
        if name is None:
            return f"header_names[{i}] is NULL"
        if isinstance(name, bytes):
            return f"header_names[{i}] is not UTF-8 text ({_shown(name)})"
        if not isinstance(name, str):
            return f"header_names[{i}] is not text (a multidimensional array?)"
    for i, value in enumerate(values, 1):
        if value is not None and not isinstance(value, bytes):
            return f"header_values[{i}] is not bytea (a multidimensional array?)"
    return None


def _shown(raw: bytes) -> str:
    """Bytes in an error message: ASCII only (the dead table may be SQL_ASCII), cut short."""
    return repr(raw[:200]) + (f" and {len(raw) - 200} bytes more" if len(raw) > 200 else "")
