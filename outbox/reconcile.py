"""``outbox verify``'s comparison: the delivery record against what the topic holds and what
each consumer group applied. Pure: the CLI reads the three sides and hands them here.

What it can see: events recorded as published (within the record's retention) and the records
on the topic now. What it cannot: events deleted from the outbox by hand before publishing
(never recorded), events published with the record off or before its window.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Recorded:
    """One row of the delivery record."""

    event_id: str
    id: int  # the outbox row's id: the outbox order
    partition: int | None  # None: recovered from a marker, place unknown
    offset: int | None
    key_hash: int | None


@dataclass(frozen=True, slots=True)
class Seen:
    """One record read from the topic (read_committed)."""

    partition: int
    offset: int
    event_id: str | None  # None: no outbox-event-id header (not an outbox's record)
    key_hash: int | None


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
    groups: list[GroupReport] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (
            self.lost
            or self.duplicates
            or self.order_violations
            or any(g.unreadable or g.passed_unapplied for g in self.groups)
        )


def reconcile(
    recorded: Sequence[Recorded],
    seen: Iterable[Seen],
    low_watermarks: Mapping[int, int],
    groups: Mapping[str, GroupState] | None = None,
) -> Report:
    """Compare the delivery record with the topic (read to the end of every partition from
    ``low_watermarks``) and with each group's committed offsets and dedup records."""
    report = Report(recorded=len(recorded))
    by_event = {r.event_id: r for r in recorded}
    at: dict[tuple[int, int], str | None] = {}
    copies: Counter[str] = Counter()
    # Per key: (partition, highest outbox id so far, its event) along the partition's order.
    keys: dict[int | None, tuple[int, int, str]] = {}
    ordered = sorted(seen, key=lambda s: (s.partition, s.offset))
    for s in ordered:
        report.read += 1
        at[(s.partition, s.offset)] = s.event_id
        if s.event_id is None:
            report.foreign += 1
            continue
        copies[s.event_id] += 1
        rec = by_event.get(s.event_id)
        if rec is None:
            report.unrecorded += 1
            continue
        if s.key_hash is None:
            continue  # no key, no order promise
        before = keys.get(s.key_hash)
        if before is None:
            keys[s.key_hash] = (s.partition, rec.id, s.event_id)
            continue
        partition, highest, after_event = before
        if partition != s.partition:
            report.order_violations.append(
                {
                    "event_id": s.event_id,
                    "partition": s.partition,
                    "offset": s.offset,
                    "reason": f"its key is also on partition {partition}",
                }
            )
        elif rec.id < highest:
            report.order_violations.append(
                {
                    "event_id": s.event_id,
                    "partition": s.partition,
                    "offset": s.offset,
                    "reason": f"after event {after_event}, later in the outbox",
                }
            )
        else:
            keys[s.key_hash] = (partition, rec.id, s.event_id)
    report.duplicates = {e: n for e, n in sorted(copies.items()) if n > 1}
    gone: set[str] = set()
    for rec in recorded:
        if rec.partition is None or rec.offset is None:
            report.unplaced += 1
            continue
        found = at.get((rec.partition, rec.offset), _MISSING)
        if found == rec.event_id:
            continue
        low = low_watermarks.get(rec.partition, 0)
        if rec.offset < low:
            reason = "deleted from the topic (below the partition's start)"
            gone.add(rec.event_id)
        elif found is _MISSING:
            reason = "no record at its offset (another cluster, or the topic was re-created?)"
        else:
            reason = f"another record is at its offset ({found or 'not an outbox record'})"
        report.lost.append(
            {
                "event_id": rec.event_id,
                "partition": rec.partition,
                "offset": rec.offset,
                "reason": reason,
            }
        )
    for name, state in sorted((groups or {}).items()):
        report.groups.append(_group_report(name, state, recorded, gone))
    return report


_MISSING = "\x00missing"


def _group_report(
    name: str, state: GroupState, recorded: Sequence[Recorded], gone: set[str]
) -> GroupReport:
    lag: list[str] = []
    unreadable: list[str] = []
    passed: list[str] = []
    applied = 0
    for rec in recorded:
        if rec.event_id in state.applied:
            applied += 1
            continue
        if rec.partition is None or rec.offset is None:
            continue  # no place to compare with the group's position
        committed = state.committed.get(rec.partition)
        if committed is not None and rec.offset < committed:
            passed.append(rec.event_id)
        elif rec.event_id in gone:
            unreadable.append(rec.event_id)
        else:
            lag.append(rec.event_id)
    return GroupReport(name, applied, lag, unreadable, passed)
