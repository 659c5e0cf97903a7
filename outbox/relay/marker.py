"""The recovery marker: which events a slot's last Kafka transaction published (I4, I9).

Written in the same Kafka transaction as the batch; read back by the next owner of the slot
to delete what was published before a crash, and only rows of this outbox (I9). No I/O here.
"""

from __future__ import annotations

import itertools
import json
import struct
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from outbox.partitioner import SHARD_COUNT

MARKER_MAGIC = b"OXM\x02"
"""Version-2 markers are binary and start with this; version 1 was JSON (``{...``)."""
MAX_MARKER_EVENTS = 100_000
"""The largest --batch-size: a marker naming more events is not one the relay wrote."""
MAX_MARKER_BYTES = 1_000_000
"""Kafka's default message.max.bytes: a larger record is never parsed."""
EVENT_ID_BYTES = 16
MAX_TID_BYTES = 249
"""A transactional.id fits a one-byte length (Kafka topic/id names are shorter anyway)."""
MARKER_HEADER_BYTES = len(MARKER_MAGIC) + 16 + 2 + 2 + 1 + MAX_TID_BYTES + 4
MARKER_BYTES_PER_EVENT = 10 + EVENT_ID_BYTES
"""Worst case per event: a 10-byte varint id delta (ids far apart) and its event id."""
_HEADER = struct.Struct(">4s16sHHB")
_COUNT = struct.Struct(">I")
_MAX_ID = 2**63 - 1


def max_marker_batch(message_max_bytes: int) -> int:
    """The largest batch whose marker always fits one record (and MAX_MARKER_BYTES)."""
    budget = min(message_max_bytes, MAX_MARKER_BYTES) - MARKER_HEADER_BYTES
    return max(0, min(MAX_MARKER_EVENTS, budget // MARKER_BYTES_PER_EVENT))


def _varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class MarkerError(ValueError):
    """A state-topic record that is not a usable version-2 marker (the reason says why)."""


@dataclass(frozen=True, slots=True)
class Marker:
    """The recovery marker: which events the slot's last committed Kafka transaction held.

    It names its outbox, its slot in a slot layout, and each event twice: by outbox id
    (what recovery can look up) and by event id (what no re-created or restored outbox
    repeats for another event). The raw 16 bytes, not a digest: exact, and hashing cost
    1.5 µs per event, an eighth of the relay's whole CPU per event.
    """

    outbox_id: uuid.UUID
    transactional_id: str
    slot: int
    slots: int
    ids: tuple[int, ...]
    event_ids: bytes  # EVENT_ID_BYTES per id, in the order of ``ids``

    @classmethod
    def of_batch(
        cls,
        outbox_id: uuid.UUID,
        transactional_id: str,
        slot: int,
        slots: int,
        events: Iterable[tuple[int, uuid.UUID]],
    ) -> Marker:
        """The marker of a batch of ``(outbox id, event id)`` rows."""
        pairs = sorted(events)
        return cls(
            outbox_id,
            transactional_id,
            slot,
            slots,
            tuple(i for i, _ in pairs),
            b"".join(e.bytes for _, e in pairs),
        )

    def encode(self) -> bytes:
        tid = self.transactional_id.encode()
        out = [
            _HEADER.pack(MARKER_MAGIC, self.outbox_id.bytes, self.slot, self.slots, len(tid)),
            tid,
            _COUNT.pack(len(self.ids)),
        ]
        ids = self.ids
        if ids:  # the first id, then the gaps: one byte each in a batch of one slot's rows
            gaps = [b - a for a, b in itertools.pairwise(ids)]
            out.append(_varint(ids[0]))
            out.append(bytes(gaps) if max(gaps, default=0) < 0x80 else b"".join(map(_varint, gaps)))
        out.append(self.event_ids)
        return b"".join(out)

    @classmethod
    def decode(cls, raw: bytes) -> Marker:
        """Parse a version-2 marker; MarkerError naming the problem for anything else.

        Bounded before parsing: size, event count, id range, and nothing recursive.
        """
        if len(raw) > MAX_MARKER_BYTES:
            raise MarkerError(f"{len(raw)} bytes, more than any marker ({MAX_MARKER_BYTES})")
        if not raw.startswith(MARKER_MAGIC):
            if raw[:1] in {b"{", b"["}:
                raise MarkerError(_legacy(raw))
            raise MarkerError(f"not a recovery marker (starts with {raw[:8]!r})")
        try:
            _magic, outbox, slot, slots, tid_len = _HEADER.unpack_from(raw)
            pos = _HEADER.size
            tid = raw[pos : pos + tid_len].decode("ascii")
            if len(tid) != tid_len:
                raise MarkerError("truncated transactional id")
            pos += tid_len
            (count,) = _COUNT.unpack_from(raw, pos)
            pos += _COUNT.size
        except (struct.error, UnicodeDecodeError) as exc:
            raise MarkerError(f"bad header: {exc}") from None
        if not 1 <= slots <= SHARD_COUNT or not 0 <= slot < slots:
            raise MarkerError(f"slot {slot} of {slots} is no slot")
        if count > MAX_MARKER_EVENTS:
            raise MarkerError(f"{count} events, more than a batch can hold ({MAX_MARKER_EVENTS})")
        ids, pos = _read_ids(raw, pos, count)
        event_ids = raw[pos:]
        if len(event_ids) != count * EVENT_ID_BYTES:
            raise MarkerError(f"{len(event_ids)} event id bytes for {count} events")
        return cls(uuid.UUID(bytes=outbox), tid, slot, slots, ids, event_ids)

    def events(self) -> dict[int, bytes]:
        """Outbox id -> the event id (16 bytes) the batch held under that id."""
        e, size = self.event_ids, EVENT_ID_BYTES
        return {i: e[n * size : (n + 1) * size] for n, i in enumerate(self.ids)}


def _read_ids(raw: bytes, pos: int, count: int) -> tuple[tuple[int, ...], int]:
    """``count`` ascending ids stored as varint gaps; MarkerError if they are not."""
    ids: list[int] = []
    previous = 0
    for _ in range(count):
        value = shift = 0
        while True:
            if pos >= len(raw) or shift > 63:
                raise MarkerError("truncated or overlong id list")
            byte = raw[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if ids and value == 0:
            raise MarkerError("ids are not strictly ascending")
        previous += value
        if previous > _MAX_ID:
            raise MarkerError("an id beyond bigint")
        ids.append(previous)
    return tuple(ids), pos


def _legacy(raw: bytes) -> str:
    """Why a JSON record is ignored: a version-1 marker names ids only, so it can never be
    trusted to delete (I9). Parsed only to say so; any depth or size is survived."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return "malformed JSON"
    if isinstance(doc, dict) and {"tid", "slot", "ranges"} <= doc.keys():
        return "a version-1 marker (outbox ids only, no outbox identity)"
    return "JSON that is no marker"


def recoverable(
    marker: Marker, rows: Iterable[tuple[int, uuid.UUID]]
) -> list[tuple[int, uuid.UUID]]:
    """Of the outbox rows found under the marker's ids, those that are the very events the
    marker names: same id AND same event id. (Whose marker it is, judge_marker checked.)"""
    named = marker.events()
    return [(i, e) for i, e in rows if named.get(i) == e.bytes]


@dataclass(frozen=True, slots=True)
class MarkerReading:
    """What recovery does with the slot's last marker: apply it, or ignore it and say why."""

    marker: Marker | None = None
    ignored: str | None = None
    conflict: uuid.UUID | None = None  # another outbox writes under this transactional.id
    expected: bool = False  # ignored for a known reason (an old layout, a replaced outbox)


def judge_marker(
    raw: bytes,
    *,
    outbox_id: uuid.UUID,
    tid: str,
    slot: int,
    slots: int,
    explicit_prefix: bool,
    replaces: uuid.UUID | None = None,
) -> MarkerReading:
    """Apply a marker only if it is this outbox's, this slot's, of this slot layout (I9).

    A marker of another outbox under an explicitly given prefix means two outboxes were
    given the same ``--transactional-id-prefix``: a conflict the relay refuses. Under the
    default prefix (derived from the identity) only a forgery or a clone can carry one:
    ignored. Everything else that is not applied is ignored with its reason.
    """
    try:
        marker = Marker.decode(raw)
    except MarkerError as exc:
        return MarkerReading(ignored=f"malformed: {exc}")
    if marker.outbox_id != outbox_id:
        if marker.outbox_id == replaces:
            return MarkerReading(ignored=f"from the replaced outbox {replaces}", expected=True)
        if explicit_prefix:
            return MarkerReading(conflict=marker.outbox_id)
        return MarkerReading(ignored=f"names another outbox ({marker.outbox_id})")
    if marker.transactional_id != tid or marker.slot != slot:
        return MarkerReading(
            ignored=f"names {marker.transactional_id!r} slot {marker.slot}, read for "
            f"{tid!r} slot {slot}"
        )
    if marker.slots != slots:
        return MarkerReading(
            ignored=f"from the {marker.slots}-slot layout (recovered when the layout changed)",
            expected=True,
        )
    return MarkerReading(marker=marker)
