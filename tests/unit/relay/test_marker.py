"""The recovery marker (I4: no batch published twice; I9: recovery deletes only its own rows)."""

from __future__ import annotations

import struct
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from outbox.partitioner import SHARD_COUNT
from outbox.relay.marker import (
    EVENT_ID_BYTES,
    MARKER_MAGIC,
    MAX_MARKER_BYTES,
    MAX_MARKER_EVENTS,
    MAX_TID_BYTES,
    Marker,
    MarkerError,
    MarkerReading,
    judge_marker,
    max_marker_batch,
    recoverable,
)

# -- the recovery marker (I4, I9) -----------------------------------------------------------

OURS = uuid.UUID("6f1d2c1e-0000-4000-8000-000000000001")
OTHER = uuid.UUID("6f1d2c1e-0000-4000-8000-000000000002")
TID = "outbox-6f1d2c1e0000-1"
EVENT_A = uuid.UUID("6f1d2c1e-0000-4000-8000-0000000000a1")  # fixed: the ids of
EVENT_B = uuid.UUID("6f1d2c1e-0000-4000-8000-0000000000b2")  # parametrized cases stay stable

batches = st.lists(
    st.tuples(st.integers(1, 2**63 - 1) | st.integers(1, 300), st.uuids()),
    unique_by=lambda pair: pair[0],
    max_size=200,
)


@given(
    batch=batches,
    outbox_id=st.uuids(),
    tid=st.text(st.characters(max_codepoint=127), max_size=MAX_TID_BYTES),
    slots=st.integers(1, SHARD_COUNT),
    data=st.data(),
)
def test_i9_marker_round_trips(
    batch: list[tuple[int, uuid.UUID]],
    outbox_id: uuid.UUID,
    tid: str,
    slots: int,
    data: st.DataObject,
) -> None:
    slot = data.draw(st.integers(0, slots - 1))
    marker = Marker.of_batch(outbox_id, tid, slot, slots, batch)
    decoded = Marker.decode(marker.encode())
    assert decoded == marker
    assert decoded.events() == {i: e.bytes for i, e in batch}


def test_a_contiguous_batch_costs_about_seventeen_bytes_per_event() -> None:
    marker = Marker.of_batch(
        OURS, TID, 1, 4, [(i, uuid.uuid4()) for i in range(10**9, 10**9 + 1000)]
    )
    assert len(marker.encode()) < 60 + 1000 * (1 + EVENT_ID_BYTES)


@pytest.mark.parametrize("message_max_bytes", [10_000, 100_000, 1_000_000, 10_000_000])
def test_the_largest_allowed_batch_always_fits_its_marker_in_one_record(
    message_max_bytes: int,
) -> None:
    """Worst case: ids as far apart as bigint allows (10-byte gaps), the longest tid."""
    n = max_marker_batch(message_max_bytes)
    assert 0 < n <= MAX_MARKER_EVENTS
    step = (2**63 - 1) // (n + 1)
    marker = Marker.of_batch(
        OURS, "t" * MAX_TID_BYTES, 0, 1, [(step * (k + 1), uuid.uuid4()) for k in range(n)]
    )
    assert len(marker.encode()) <= min(message_max_bytes, MAX_MARKER_BYTES)


def _valid() -> bytes:
    return Marker.of_batch(OURS, TID, 1, 4, [(5, EVENT_A), (7, EVENT_B)]).encode()


def _header(count: int, slot: int = 1, slots: int = 4) -> bytes:
    tid = TID.encode()
    return (
        struct.pack(">4s16sHHB", MARKER_MAGIC, OURS.bytes, slot, slots, len(tid))
        + tid
        + struct.pack(">I", count)
    )


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "not a recovery marker"),
        (b"garbage", "not a recovery marker"),
        (MARKER_MAGIC, "bad header"),
        (_valid()[:-1], "event id bytes"),
        (_valid() + b"x", "event id bytes"),
        (_header(2) + b"\x05\x00" + b"d" * 32, "not strictly ascending"),
        (_header(1) + b"\xff" * 11 + b"d" * 16, "overlong"),
        (_header(2) + b"\x05", "truncated"),
        (_header(2) + b"\xff" * 9 + b"\x7f" + b"\xff" * 9 + b"\x01" + b"d" * 32, "beyond bigint"),
        (_header(MAX_MARKER_EVENTS + 1), "more than a batch can hold"),
        (_header(0, slot=4, slots=4), "is no slot"),
        (_header(0, slot=0, slots=0), "is no slot"),
        (_header(0, slot=0, slots=33), "is no slot"),
        (MARKER_MAGIC + b"\x00" * (MAX_MARKER_BYTES), "more than any marker"),
        (b'{"tid": "t", "slot": 0, "ranges": [[1, 200]]}', "version-1 marker"),
        (b'{"tid": "t", "slot": 0, "ranges": [[1, 1000000000000000]]}', "version-1 marker"),
        (b"[" * 5000 + b"]" * 5000, "malformed JSON"),
        (b'{"a": ' * 5000 + b"1" + b"}" * 5000, "malformed JSON"),
        (b"[1, 2]", "JSON that is no marker"),
        (b"{" + b" " * (MAX_MARKER_BYTES + 1) + b"}", "more than any marker"),
    ],
)
def test_i9_malformed_or_forged_marker_is_a_marker_error_naming_why(
    raw: bytes, reason: str
) -> None:
    with pytest.raises(MarkerError, match=reason):
        Marker.decode(raw)


def _judge(raw: bytes, **kw: object) -> MarkerReading:
    args: dict[str, object] = {
        "outbox_id": OURS,
        "tid": TID,
        "slot": 1,
        "slots": 4,
        "explicit_prefix": False,
    }
    args.update(kw)
    return judge_marker(raw, **args)  # type: ignore[arg-type]


def _marker(outbox_id: uuid.UUID = OURS, tid: str = TID, slot: int = 1, slots: int = 4) -> bytes:
    return Marker.of_batch(outbox_id, tid, slot, slots, [(1, EVENT_A)]).encode()


@pytest.mark.parametrize(
    ("raw", "kw", "applied", "ignored", "conflict"),
    [
        (_marker(), {}, True, None, None),
        (_marker(OTHER), {}, False, "names another outbox", None),
        (_marker(OTHER), {"explicit_prefix": True}, False, None, OTHER),
        (_marker(OTHER), {"explicit_prefix": True, "replaces": OTHER}, False, "replaced", None),
        (_marker(slot=2), {}, False, "slot 2", None),
        (_marker(tid="x-1"), {}, False, "'x-1'", None),
        (_marker(slots=2), {}, False, "2-slot layout", None),
        (_marker(slot=1, slots=2), {"slots": 2}, True, None, None),
        (b'{"tid": "t", "slot": 1, "ranges": [[1, 9]]}', {}, False, "version-1", None),
        (b"[" * 5000, {}, False, "malformed", None),
    ],
)
def test_i9_only_this_outboxs_marker_of_this_slot_and_layout_is_applied(
    raw: bytes,
    kw: dict[str, object],
    applied: bool,
    ignored: str | None,
    conflict: uuid.UUID | None,
) -> None:
    reading = _judge(raw, **kw)
    assert (reading.marker is not None) is applied
    assert reading.conflict == conflict
    if ignored is None:
        assert reading.ignored is None
    else:
        assert reading.ignored is not None
        assert ignored in reading.ignored


def test_i9_recovery_matches_a_row_only_by_its_id_and_its_very_event() -> None:
    e1, e2, e3 = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    marker = Marker.of_batch(OURS, TID, 1, 4, [(1, e1), (2, e2), (3, e3)])
    rows = [
        (1, e1),  # the very event: published, its delete was lost
        (2, uuid.uuid4()),  # the id came back (restore, re-creation) for another event
        (4, e3),  # the event under another id: not what the batch held
    ]
    assert recoverable(marker, rows) == [(1, e1)]
    foreign = Marker.of_batch(OTHER, TID, 1, 4, [(1, e1)])
    assert recoverable(Marker.decode(foreign.encode()), [(1, e1)]) == [(1, e1)]
    # ... a marker is bound to its outbox: the relay applies only its own (judge_marker)
    assert _judge(foreign.encode()).marker is None
