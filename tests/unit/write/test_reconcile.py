"""``outbox verify``'s comparison of the delivery record, the topic and the groups."""

from __future__ import annotations

import pytest

from outbox.reconcile import GroupState, Recorded, Seen, reconcile

A, B, C = "a", "b", "c"
K1, K2 = 11, 22


def rec(event: str, id_: int, offset: int | None, key: int | None = K1, p: int = 0) -> Recorded:
    return Recorded(event, id_, None if offset is None else p, offset, key)


def seen(event: str | None, offset: int, key: int | None = K1, p: int = 0) -> Seen:
    return Seen(p, offset, event, key)


RECORDED = [rec(A, 1, 0), rec(B, 2, 1), rec(C, 3, 2, key=K2)]
CLEAN = [seen(A, 0), seen(B, 1), seen(C, 2, key=K2)]


def test_i2_a_topic_that_holds_every_recorded_event_once_in_order_is_clean() -> None:
    report = reconcile(RECORDED, CLEAN, {0: 0})
    assert report.clean
    assert (report.recorded, report.read, report.foreign, report.unrecorded) == (3, 3, 0, 0)


@pytest.mark.parametrize(
    ("topic", "low", "lost", "reason"),
    [
        (CLEAN[1:], {0: 1}, [A], "deleted from the topic"),  # retention / delete_records
        ([seen(B, 1), seen(C, 2, key=K2)], {0: 0}, [A], "no record at its offset"),
        ([seen("x", 0), *CLEAN[1:]], {0: 0}, [A], "another record is at its offset (x)"),
        ([seen(None, 0), *CLEAN[1:]], {0: 0}, [A], "not an outbox record"),
    ],
)
def test_i2_a_recorded_event_not_at_its_offset_is_reported_lost_with_why(
    topic: list[Seen], low: dict[int, int], lost: list[str], reason: str
) -> None:
    report = reconcile(RECORDED, topic, low)
    assert [x["event_id"] for x in report.lost] == lost
    assert reason in str(report.lost[0]["reason"])
    assert not report.clean


def test_i4_an_event_on_the_topic_twice_is_a_duplicate() -> None:
    report = reconcile(RECORDED, [*CLEAN, seen(B, 3)], {0: 0})
    assert report.duplicates == {B: 2}
    assert report.order_violations == []  # a copy after the original keeps the key's order
    assert not report.clean


@pytest.mark.parametrize(
    ("extra", "violating"),
    [
        ([seen(B, 3), seen(A, 4)], [A]),  # copies in the opposite order
        ([seen(A, 3)], [A]),  # an earlier event again after a later one of its key
        ([seen(A, 0, p=1)], [A]),  # the key on another partition
    ],
)
def test_i3_an_event_after_a_later_one_of_its_key_is_an_order_violation(
    extra: list[Seen], violating: list[str]
) -> None:
    report = reconcile(RECORDED, [*CLEAN, *extra], {0: 0, 1: 0})
    assert [v["event_id"] for v in report.order_violations] == violating
    assert not report.clean


def test_i3_events_of_other_keys_and_keyless_events_keep_no_order() -> None:
    recorded = [rec(A, 2, 0, key=K1), rec(B, 1, 1, key=K2), rec(C, 0, 2, key=None)]
    report = reconcile(recorded, [seen(A, 0), seen(B, 1, key=K2), seen(C, 2, key=None)], {})
    assert report.clean


def test_foreign_and_unrecorded_records_are_counted_not_findings() -> None:
    report = reconcile(RECORDED, [*CLEAN, seen(None, 3), seen("older", 4)], {0: 0})
    assert (report.foreign, report.unrecorded) == (1, 1)
    assert report.clean


def test_recovered_events_without_a_place_are_counted_not_lost() -> None:
    report = reconcile([*RECORDED, rec("r", 4, None)], CLEAN, {0: 0})
    assert report.unplaced == 1
    assert report.clean


@pytest.mark.parametrize(
    ("committed", "applied", "low", "lag", "unreadable", "passed"),
    [
        ({0: 3}, {A, B, C}, {0: 0}, [], [], []),  # caught up
        ({0: 1}, {A}, {0: 0}, [B, C], [], []),  # behind: lag, not a finding
        ({}, set(), {0: 0}, [A, B, C], [], []),  # never committed
        ({0: 1}, {A}, {0: 2}, [C], [B], []),  # B deleted before the group read it
        ({0: 3}, {A, C}, {0: 0}, [], [], [B]),  # read past B without applying it
    ],
)
def test_i5_per_group_lag_is_told_apart_from_events_it_can_no_longer_read(
    committed: dict[int, int],
    applied: set[str],
    low: dict[int, int],
    lag: list[str],
    unreadable: list[str],
    passed: list[str],
) -> None:
    topic = [s for s in CLEAN if s.offset >= low[0]]
    report = reconcile(RECORDED, topic, low, {"g": GroupState(committed, frozenset(applied))})
    [group] = report.groups
    assert (group.lag, group.unreadable, group.passed_unapplied) == (lag, unreadable, passed)
    assert group.applied == len(applied)
    assert report.clean == (not unreadable and not passed and low[0] == 0)


def test_i2_an_event_recorded_behind_an_open_transaction_is_not_lost_but_not_checked() -> None:
    """The read ended at offset 1, the partition's last stable offset (a transaction open
    there): B and C, recorded at 1 and 2, cannot be read yet. A recorded before it and
    missing is still lost."""
    report = reconcile(RECORDED, [seen(A, 0)], {0: 0}, stable_ends={0: 1}, log_ends={0: 4})
    assert report.beyond_stable_offset == [B, C]
    assert report.lost == []
    assert report.clean
    missing_first = reconcile(RECORDED, [], {0: 0}, stable_ends={0: 1}, log_ends={0: 4})
    assert [x["event_id"] for x in missing_first.lost] == [A]
    assert missing_first.beyond_stable_offset == [B, C]


def test_i2_an_event_recorded_past_its_partitions_high_watermark_is_lost() -> None:
    """The partition ends (high watermark) at 1 and no transaction holds its read back: B and C,
    recorded at 1 and 2, are on no record of it (the topic re-created shorter, another
    cluster). They are lost, not waiting behind a last stable offset."""
    report = reconcile(RECORDED, [seen(A, 0)], {0: 0}, stable_ends={0: 1}, log_ends={0: 1})
    assert [x["event_id"] for x in report.lost] == [B, C]
    assert "past the partition's end" in str(report.lost[0]["reason"])
    assert report.beyond_stable_offset == []
    assert not report.clean
    empty = reconcile(RECORDED, [], {0: 0}, stable_ends={0: 0}, log_ends={0: 0})
    assert [x["event_id"] for x in empty.lost] == [A, B, C]
