"""A fetched record as the runner's work item: its dedup key and decoded event (I10).

Never raises: whatever a record's bytes (or the user's ``dedup_key``) make the decoders do,
the item carries it as its error and is dead-lettered.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from consumer.deadletter import describe
from consumer.dedup import normalise_key
from consumer.event import (
    Event,
    EventTypes,
    Record,
    UndecodableEvent,
    decode_event,
    outbox_event_id,
)


@dataclass(slots=True)
class Item:
    record: Record
    key: str
    event: Event | None
    error: UndecodableEvent | None


def prepare(
    record: Record,
    dedup_key: Callable[[Record], str | None],
    types: EventTypes | None,
    default_content_type: str,
) -> Item:
    """Dedup key and decoded event of ``record``, or the error that stops it being handled."""
    try:
        return _decode(record, dedup_key, types, default_content_type)
    except Exception as exc:
        error = UndecodableEvent(f"cannot decode the record: {describe(exc)}")
        return Item(record, normalise_key(record.position), None, error)


def _decode(
    record: Record,
    dedup_key: Callable[[Record], str | None],
    types: EventTypes | None,
    default_content_type: str,
) -> Item:
    key = outbox_event_id(record)
    key_error: UndecodableEvent | None = None
    if record.defect is not None:
        key_error = UndecodableEvent(record.defect)
    elif key is None:
        try:
            key = dedup_key(record)
        except Exception as exc:
            key_error = UndecodableEvent(f"dedup_key() failed: {describe(exc)}")
        if key is not None and not isinstance(key, str):
            key_error = UndecodableEvent(
                f"dedup_key() returned {type(key).__name__}, not str or None"
            )
            key = None
    key = normalise_key(key or record.position)
    if key_error is not None:
        return Item(record, key, None, key_error)
    try:
        event = decode_event(record, key, types=types, default_content_type=default_content_type)
    except UndecodableEvent as exc:
        return Item(record, key, None, exc)
    return Item(record, key, event, None)


def ranges(items: Sequence[Item]) -> list[tuple[str, int, int, int]]:
    """``(topic, partition, first, last)`` offsets of the items, per partition."""
    spans: dict[tuple[str, int], tuple[int, int]] = {}
    for item in items:
        tp, offset = (item.record.topic, item.record.partition), item.record.offset
        first, last = spans.get(tp, (offset, offset))
        spans[tp] = (min(first, offset), max(last, offset))
    return [(t, p, first, last) for (t, p), (first, last) in spans.items()]
