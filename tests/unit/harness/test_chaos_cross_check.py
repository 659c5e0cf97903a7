"""The chaos harness's second checker: where ``outbox verify``'s verdict and its own differ."""

from __future__ import annotations

from typing import Any

from tests.chaos.checker import Report, cross_check

COPIES = {"e1": 1, "e2": 1, "e3": 1}


def _verify(**changes: Any) -> dict[str, Any]:
    report: dict[str, Any] = {
        "clean": True,
        "recorded": 3,
        "read": 3,
        "lost": [],
        "duplicates": {},
        "order_violations": [],
        "groups": [
            {"group": "g", "applied": 3, "lag": 0, "unreadable": [], "passed_unapplied": []}
        ],
    }
    report.update(changes)
    return report


def test_i2_verify_clean_on_a_clean_topic_agrees() -> None:
    assert cross_check(0, _verify(), Report(), COPIES) == []


def test_i4_verify_finding_duplicates_the_harness_did_not_see_disagrees() -> None:
    found = _verify(clean=False, duplicates={"e1": 2})
    [why] = cross_check(1, found, Report(), COPIES)
    assert "exited 1" in why


def test_i4_extra_copies_shown_by_the_broker_must_be_verifys_duplicates_and_nothing_else() -> None:
    copies = {**COPIES, "e2": 2}
    agrees = _verify(
        clean=False,
        read=4,
        duplicates={"e2": 2},
        order_violations=[{"event_id": "e2", "partition": 0, "offset": 3, "reason": "x"}],
    )
    assert cross_check(1, agrees, Report(), copies) == []
    other_dup = _verify(clean=False, duplicates={"e1": 2})
    assert "duplicates" in cross_check(1, other_dup, Report(), copies)[0]
    stray = _verify(
        clean=False,
        duplicates={"e2": 2},
        order_violations=[{"event_id": "e3", "partition": 0, "offset": 2, "reason": "x"}],
    )
    assert "out of key order" in cross_check(1, stray, Report(), copies)[0]


def test_i2_a_lost_event_or_a_wrong_record_count_disagrees() -> None:
    lost = _verify(clean=False, lost=[{"event_id": "e1"}])
    assert any("lost" in d for d in cross_check(1, lost, Report(), COPIES))
    short = _verify(recorded=2)
    assert (
        "2 events in the delivery record, 3 on the topic"
        in cross_check(0, short, Report(), COPIES)[0]
    )


def test_i5_a_group_that_did_not_apply_everything_disagrees() -> None:
    behind = _verify(
        groups=[{"group": "g", "applied": 2, "lag": 1, "unreadable": [], "passed_unapplied": []}]
    )
    assert "applied 2 of 3" in cross_check(0, behind, Report(), COPIES)[0]


def test_verify_without_a_verdict_disagrees_and_a_failed_harness_only_reports() -> None:
    assert cross_check(3, None, Report(), COPIES) == ["outbox verify gave no verdict (exit 3)"]
    assert cross_check(None, None, Report(), COPIES) != []
    failed = Report(failures=["lost=1: committed events without an effect"])
    assert cross_check(1, _verify(clean=False, lost=[{"event_id": "e1"}]), failed, COPIES) == []


def test_i2_an_event_on_the_topic_past_a_misreported_offset_is_no_loss_only_where_offsets_err() -> (
    None
):
    """Tansu 0.6 answered a produce with a base offset one below where it stored the records:
    verify found another event at each recorded offset, while the harness read every event."""
    misplaced = {"event_id": "e2", "reason": "another record is at its offset (e1)"}
    report = _verify(clean=False, lost=[misplaced])
    assert cross_check(1, report, Report(), COPIES, offsets_misreported=True) == []
    assert any("lost" in d for d in cross_check(1, report, Report(), COPIES))
    gone = _verify(clean=False, lost=[{**misplaced, "event_id": "e9"}])  # not on the topic
    assert any(
        "lost" in d for d in cross_check(1, gone, Report(), COPIES, offsets_misreported=True)
    )
    other = _verify(clean=False, lost=[{"event_id": "e2", "reason": "past the high watermark"}])
    assert any(
        "lost" in d for d in cross_check(1, other, Report(), COPIES, offsets_misreported=True)
    )
