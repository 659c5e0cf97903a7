"""``outbox verify``'s comparison: the delivery record against what the topic holds and what
each consumer group applied. Pure: the CLI reads the three sides and hands them here.

What it can see: events recorded as published (within the record's retention) and the records
on the topic now. What it cannot: events deleted from the outbox by hand before publishing
(never recorded), events published with the record off or before its window.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import NamedTuple


class Recorded(NamedTuple):
    """One row of the delivery record (a plain tuple: verify holds hundreds of thousands)."""

    event_id: str
    id: int  # the outbox row's id: the outbox order
    partition: int | None  # None: recovered from a marker, place unknown
    offset: int | None
    key_hash: int | None


class Seen(NamedTuple):
    """One record read from the topic (read_committed)."""

    partition: int
    offset: int
    event_id: str | None  # None: no outbox-event-id header (not an outbox's record)
    key: Hashable | None  # the record's key (its bytes): equal keys, equal values; None: none


@dataclass(frozen=True, slots=True)
class GroupState:
    """What one consumer group has: its committed offsets and the events it applied."""

    committed: Mapping[int, int]  # partition -> next offset it reads (absent: none committed)
    applied: frozenset[str]


@dataclass(frozen=True, slots=True)
class GroupReport:
    group: str
    applied: int
    lag: list[str]  # published, readable, not yet applied
    unreadable: list[str]  # gone from the topic before the group read them
    passed_unapplied: list[str]  # the group read past them without a dedup record


@dataclass(slots=True)
class Report:
    recorded: int = 0
    read: int = 0
    lost: list[dict[str, object]] = field(default_factory=list)
    duplicates: dict[str, int] = field(default_factory=dict)
    order_violations: list[dict[str, object]] = field(default_factory=list)
    foreign: int = 0  # records without an outbox event id
    unrecorded: int = 0  # outbox records not in the record (older, or another outbox's)
    unplaced: int = 0  # recorded without a place (recovered from a marker)
    # Recorded at or past their partition's last stable offset: not readable yet, not lost.
    beyond_stable_offset: list[str] = field(default_factory=list)
    groups: list[GroupReport] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (
            self.lost
            or self.duplicates
            or self.order_violations
            or any(g.unreadable or g.passed_unapplied for g in self.groups)
        )


_PLACE = itemgetter(0, 1)


def reconcile(
    recorded: Sequence[tuple[str, int, int | None, int | None, int | None]],
    seen: Iterable[tuple[int, int, str | None, Hashable | None]],
    low_watermarks: Mapping[int, int],
    groups: Mapping[str, GroupState] | None = None,
    stable_ends: Mapping[int, int] | None = None,
    log_ends: Mapping[int, int] | None = None,
) -> Report:
    """Compare the delivery record (``Recorded`` rows) with the topic (``Seen`` records, read
    to the end of every partition from ``low_watermarks`` or a later start) and with each
    group's committed offsets and dedup records.

    ``stable_ends``: where each partition's read ended (its last stable offset); ``log_ends``:
    each partition's high watermark, read uncommitted after the read. A recorded event between
    the two was committed behind a transaction still open: not lost, not checked. One at or
    past the high watermark is on no record of the partition (the topic re-created shorter or
    empty, another cluster): lost. Without ``log_ends`` nothing counts as held back.

    Plain tuples in, one pass over the topic: verify compares hundreds of thousands of
    records, so the loop avoids per-record objects and attribute lookups.
    """
    report = Report(recorded=len(recorded))
    outbox_id = {r[0]: r[1] for r in recorded}
    at: dict[int, dict[int, str | None]] = {}  # partition -> offset -> event id
    once: set[str] = set()
    extra: dict[str, int] = {}  # event id -> copies, for those on the topic more than once
    # Per key: (partition, highest outbox id so far, its event) along the partition's order.
    keys: dict[Hashable, tuple[int, int, str]] = {}
    violations = report.order_violations
    read = foreign = unrecorded = 0
    here: dict[int, str | None] = {}
    current: int | None = None
    for partition, offset, event_id, key in sorted(seen, key=_PLACE):
        read += 1
        if partition != current:
            current = partition
            here = at.setdefault(partition, {})
        here[offset] = event_id
        if event_id is None:
            foreign += 1
            continue
        if event_id in once:
            extra[event_id] = extra.get(event_id, 1) + 1
        else:
            once.add(event_id)
        rid = outbox_id.get(event_id)
        if rid is None:
            unrecorded += 1
            continue
        if key is None:
            continue  # no key, no order promise
        before = keys.get(key)
        if before is None:
            keys[key] = (partition, rid, event_id)
            continue
        on, highest, after_event = before
        if on != partition:
            violations.append(
                {
                    "event_id": event_id,
                    "partition": partition,
                    "offset": offset,
                    "reason": f"its key is also on partition {on}",
                }
            )
        elif rid < highest:
            violations.append(
                {
                    "event_id": event_id,
                    "partition": partition,
                    "offset": offset,
                    "reason": f"after event {after_event}, later in the outbox",
                }
            )
        else:
            keys[key] = (partition, rid, event_id)
    report.read, report.foreign, report.unrecorded = read, foreign, unrecorded
    report.duplicates = dict(sorted(extra.items()))
    gone: set[str] = set()
    nothing: dict[int, str | None] = {}
    ends, tops = stable_ends or {}, log_ends or {}
    for event_id, _, on_partition, at_offset, _ in recorded:
        if on_partition is None or at_offset is None:
            report.unplaced += 1
            continue
        found = at.get(on_partition, nothing).get(at_offset, _MISSING)
        if found == event_id:
            continue
        top = tops.get(on_partition, 0)
        if found is _MISSING and ends.get(on_partition, top) <= at_offset < top:
            report.beyond_stable_offset.append(event_id)
            continue
        if at_offset < low_watermarks.get(on_partition, 0):
            reason = "deleted from the topic (below the partition's start)"
            gone.add(event_id)
        elif found is _MISSING and on_partition in tops and at_offset >= top:
            reason = "past the partition's end (the topic was re-created, or another cluster?)"
        elif found is _MISSING:
            reason = "no record at its offset (another cluster, or the topic was re-created?)"
        else:
            reason = f"another record is at its offset ({found or 'not an outbox record'})"
        report.lost.append(
            {
                "event_id": event_id,
                "partition": on_partition,
                "offset": at_offset,
                "reason": reason,
            }
        )
    for name, state in sorted((groups or {}).items()):
        report.groups.append(_group_report(name, state, recorded, gone))
    return report


_MISSING = "\x00missing"


def _group_report(
    name: str,
    state: GroupState,
    recorded: Sequence[tuple[str, int, int | None, int | None, int | None]],
    gone: set[str],
) -> GroupReport:
    lag: list[str] = []
    unreadable: list[str] = []
    passed: list[str] = []
    applied = 0
    done, committed = state.applied, state.committed
    for event_id, _, partition, offset, _ in recorded:
        if event_id in done:
            applied += 1
            continue
        if partition is None or offset is None:
            continue  # no place to compare with the group's position
        position = committed.get(partition)
        if position is not None and offset < position:
            passed.append(event_id)
        elif event_id in gone:
            unreadable.append(event_id)
        else:
            lag.append(event_id)
    return GroupReport(name, applied, lag, unreadable, passed)
