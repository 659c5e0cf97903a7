"""The chaos checker and fault schedule are pure: prove the checker is not vacuous.

Each test starts from a clean, consistent run and breaks exactly one thing
(an effect missing, applied twice, applied for a rolled-back transaction,
applied out of order...) and asserts that the checker names it, and only it.
"""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from tests.chaos.checker import Effect, Observations, TopicRecord, Written, check
from tests.chaos.faults import FaultKind, Rates, Step, actions, count_by_kind, schedule

KEYS = ("w0-k0", "w0-k1", "w1-k0")
PER_KEY = 4


def _clean() -> Observations:
    """Three keys with four committed events each, applied and published in order."""
    committed: dict[str, Written] = {}
    effects: list[Effect] = []
    topic: list[TopicRecord] = []
    ids = itertools.count(1)
    for partition, key in enumerate(KEYS):
        for seq in range(1, PER_KEY + 1):
            event_id = f"{key}-{seq}"
            committed[event_id] = Written(event_id, key, seq)
            effects.append(Effect(next(ids), event_id, key, seq))
            topic.append(TopicRecord(partition, seq - 1, event_id, key, seq))
    return Observations(
        committed=committed,
        acknowledged=set(committed),
        rolled_back={"rb-1", "rb-2"},
        effects=effects,
        topic=topic,
        planned=14,
    )


def _pad(obs: Observations, n: int) -> None:
    """``n`` more committed events, applied and published, one key each."""
    obs.committed.update({f"x{i}": Written(f"x{i}", f"x{i}", 1) for i in range(n)})
    obs.effects += [Effect(200 + i, f"x{i}", f"x{i}", 1) for i in range(n)]
    obs.topic += [TopicRecord(1, 100 + i, f"x{i}", f"x{i}", 1) for i in range(n)]
    obs.planned += n


def _failing(obs: Observations) -> set[str]:
    return {failure.split("=")[0] for failure in check(obs).failures}


def test_a_clean_run_passes() -> None:
    report = check(_clean())
    assert report.ok, report.failures
    assert report.committed == report.effects_applied == report.topic_records == 12
    assert report.duplicate_effects == report.lost == report.phantoms == 0


def test_a_lost_event_is_caught() -> None:
    obs = _clean()
    obs.effects = [e for e in obs.effects if e.event_id != "w0-k1-3"]
    report = check(obs)
    assert _failing(obs) == {"lost"}
    assert report.lost == 1
    assert report.examples["lost"] == ["w0-k1-3"]


def test_a_duplicate_effect_is_caught() -> None:
    obs = _clean()
    again = next(e for e in obs.effects if e.event_id == "w1-k0-4")
    obs.effects.append(replace(again, id=100))  # the last of its key: no order problem
    report = check(obs)
    assert _failing(obs) == {"duplicate_effects"}
    assert report.duplicate_effects == 1
    assert report.examples["duplicate_effects"] == ["w1-k0-4"]


def test_a_phantom_from_a_rolled_back_transaction_is_caught() -> None:
    obs = _clean()
    obs.effects.append(Effect(100, "rb-1", "w0-k0", 99))
    report = check(obs)
    assert _failing(obs) == {"phantoms"}
    assert report.phantoms == report.phantoms_rolled_back == 1


def test_a_phantom_of_an_ambiguous_commit_that_did_not_commit_is_caught() -> None:
    """A commit cut by a restart may or may not have committed: the database decides."""
    obs = _clean()
    _pad(obs, 20)  # one event left out of 33 checked: under the 5 % bound
    obs.ambiguous = {"amb-committed", "amb-lost"}
    obs.committed["amb-committed"] = Written("amb-committed", "w0-k0", 10)
    obs.effects.append(Effect(100, "amb-committed", "w0-k0", 10))
    obs.topic.append(TopicRecord(0, 10, "amb-committed", "w0-k0", 10))
    assert check(obs).ok
    assert check(obs).ambiguous_committed == 1
    obs.effects.append(Effect(101, "amb-lost", "w0-k0", 11))
    assert _failing(obs) == {"phantoms"}


def test_an_order_violation_is_caught() -> None:
    obs = _clean()
    # Swap the application order of seq 2 and 3 of one key (effect ids 2 and 3).
    swapped = {2: 3, 3: 2}
    obs.effects = [replace(e, id=swapped.get(e.id, e.id)) for e in obs.effects]
    report = check(obs)
    assert _failing(obs) == {"order_violations"}
    assert report.order_violations == 1
    assert report.examples["order_violations"] == ["w0-k0-2"]


def test_order_is_per_key_not_global() -> None:
    """Interleaving keys is fine; only the order within one key matters."""
    obs = _clean()
    obs.effects = [replace(e, id=(e.seq * 10 + KEYS.index(e.key))) for e in obs.effects]
    assert check(obs).ok


def test_an_effect_with_the_wrong_payload_is_caught() -> None:
    obs = _clean()
    obs.effects = [replace(e, seq=40) if e.event_id == "w0-k0-4" else e for e in obs.effects]
    assert _failing(obs) == {"mismatched_effects"}


def test_topic_duplicates_are_reported_but_do_not_fail() -> None:
    """Tansu keeps records of aborted transactions visible: reported, absorbed by the consumer."""
    obs = _clean()
    aborted = [r for r in obs.topic if r.key == "w0-k0" and r.seq <= 2]
    obs.topic += [replace(r, offset=r.offset + 100) for r in aborted]
    obs.topic.append(TopicRecord(0, 200, "w0-k0-3", "w0-k0", 3))
    report = check(obs)
    assert report.ok, report.failures
    assert report.topic_duplicates == 3


def test_topic_duplicates_fail_on_a_broker_that_filters_aborts() -> None:
    obs = _clean()
    obs.filters_aborts = True
    obs.topic.append(TopicRecord(0, 100, "w0-k0-4", "w0-k0", 4))
    report = check(obs)
    assert _failing(obs) == {"topic_duplicates_filtered", "topic_order_violations"}
    assert report.topic_duplicates == report.topic_duplicates_filtered == 1


def test_topic_order_is_checked_on_every_copy() -> None:
    """An aborted copy must not hide a reordering or a loss when its batch is sent again."""
    obs = _clean()  # w0-k0: 1 2 3 4 on partition 0, offsets 0-3
    obs.topic = [r for r in obs.topic if r.key != "w0-k0"]

    def key_copies(*seqs: int) -> list[TopicRecord]:
        return [TopicRecord(0, i, f"w0-k0-{s}", "w0-k0", s) for i, s in enumerate(seqs)]

    # Tansu: batch 3 4 aborted (visible), sent again in order: fine.
    obs.topic += key_copies(1, 2, 3, 4, 3, 4)
    assert check(obs).ok, check(obs).failures
    # Sent again with 4 missing: 4 is on the topic only as an aborted copy.
    obs.topic = obs.topic[:-6] + key_copies(1, 2, 3, 4, 3)
    obs.topic = [*obs.topic[:-1], TopicRecord(0, 9, "w0-k0-1", "w0-k0", 1)]
    assert check(obs).ok  # a replay that stops early is an abort too
    obs.topic = obs.topic[:-5] + key_copies(1, 2, 3, 4, 2, 4)
    assert _failing(obs) == {"topic_order_violations"}
    assert check(obs).examples["topic_order_violations"] == ["w0-k0-4"]
    # The failure shows the key's copies, so a CI log alone says what repeated or skipped.
    assert "w0-k0-4 [1@0/0 2@0/1 3@0/2 4@0/3 2@0/4 4@0/5]" in check(obs).failures[0]
    # On a broker that filters aborts every copy is committed: any repeat is out of order.
    obs.topic = obs.topic[:-6] + key_copies(1, 2, 3, 4, 3, 4)
    obs.filters_aborts = True
    assert "topic_order_violations" in _failing(obs)


def test_events_left_out_of_the_check_are_bounded() -> None:
    """A publish() bug that fails transactions under concurrency must not shrink the check."""
    obs = _clean()  # 12 committed
    obs.failed = {"failed-1"}  # 1 of 13: above 5 %
    obs.excluded_reasons = {"OperationalError": 1}
    report = check(obs)
    assert _failing(obs) == {"excluded_over_limit"}
    assert (report.excluded, report.excluded_share) == (1, round(1 / 13, 4))
    assert report.excluded_reasons == {"OperationalError": 1}
    _pad(obs, 8)
    assert check(obs).ok, check(obs).failures  # 1 of 21: under 5 %
    obs.ambiguous = {"amb-1"}  # unknown and not committed: left out too
    assert _failing(obs) == {"excluded_over_limit"}


@pytest.mark.parametrize("planned", [25, 1000])
def test_a_near_empty_run_fails(planned: int) -> None:
    obs = _clean()  # 12 committed
    obs.planned = planned
    report = check(obs)
    assert _failing(obs) == {"too_few_committed"}
    assert report.too_few_committed == planned - 12


def test_an_empty_run_fails() -> None:
    report = check(Observations(committed={}, planned=0))
    assert "too_few_committed" in {f.split("=")[0] for f in report.failures}


def test_topic_loss_phantom_order_and_split_keys_are_caught() -> None:
    obs = _clean()
    obs.topic = [r for r in obs.topic if r.event_id != "w0-k0-1"]
    assert _failing(obs) == {"topic_lost"}

    obs = _clean()
    obs.topic.append(TopicRecord(0, 50, "rb-2", "w0-k0", 7))
    assert _failing(obs) == {"topic_phantoms"}

    obs = _clean()
    obs.topic = [replace(r, offset=5 - r.offset) if r.key == "w1-k0" else r for r in obs.topic]
    assert _failing(obs) == {"topic_order_violations"}

    obs = _clean()
    obs.topic = [replace(r, partition=3) if r.event_id == "w0-k1-4" else r for r in obs.topic]
    assert _failing(obs) == {"keys_on_several_partitions"}


def test_the_writers_view_must_agree_with_the_database() -> None:
    obs = _clean()
    obs.acknowledged.add("acked-but-missing")
    assert _failing(obs) == {"acknowledged_missing"}

    obs = _clean()
    obs.committed["rb-1"] = Written("rb-1", "w0-k0", 20)
    obs.effects.append(Effect(100, "rb-1", "w0-k0", 20))
    obs.topic.append(TopicRecord(0, 20, "rb-1", "w0-k0", 20))
    assert _failing(obs) == {"uncommitted_in_database"}


@pytest.mark.parametrize(
    ("field", "value"), [("pending_outbox", 3), ("dead_rows", 1), ("dead_letters", 2)]
)
def test_leftovers_fail_the_run(field: str, value: int) -> None:
    obs = _clean()
    setattr(obs, field, value)
    assert _failing(obs) == {field}


# -- the fault schedule ----------------------------------------------------------------


def test_the_schedule_is_a_function_of_the_seed() -> None:
    a = schedule(42, 30, relays=3, consumers=2)
    assert a == schedule(42, 30, relays=3, consumers=2)
    assert a != schedule(43, 30, relays=3, consumers=2)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("seconds", [10.0, 30.0, 120.0])
def test_the_schedule_is_well_formed(seed: int, seconds: float) -> None:
    relays, consumers = 3, 2
    faults = schedule(seed, seconds, relays=relays, consumers=consumers)
    counts = count_by_kind(faults)
    assert counts[FaultKind.RESTART_POSTGRES] == (1 if seconds < 60 else 2)
    assert min(counts.values()) >= 1, f"every kind of fault at least once: {counts}"
    assert [f.at for f in faults] == sorted(f.at for f in faults)
    steps = actions(faults)
    assert all(0 < a.at < seconds for a in steps), "every fault is over before the phase ends"

    # Kills and starts alternate per process, so every killed process gets a replacement,
    # and cuts and restores alternate, so the link is never restored in the middle of a cut.
    state = {("relay", i): True for i in range(relays)} | {
        ("consumer", i): True for i in range(consumers)
    }
    link_up = True
    for a in steps:
        match a.step:
            case Step.KILL_RELAY | Step.KILL_CONSUMER:
                who = ("relay" if a.step is Step.KILL_RELAY else "consumer", a.target)
                assert state[who], f"{who} killed while already dead"
                state[who] = False
            case Step.START_RELAY | Step.START_CONSUMER:
                who = ("relay" if a.step is Step.START_RELAY else "consumer", a.target)
                assert not state[who]
                state[who] = True
            case Step.CUT_BROKER:
                assert link_up
                link_up = False
            case Step.RESTORE_BROKER:
                assert not link_up
                link_up = True
    assert all(state.values())
    assert link_up


def test_rates_shape_the_schedule() -> None:
    calm = Rates(relay_kill_every=1000, consumer_kill_every=1000, cut_every=1000, kill_after_cut=0)
    faults = schedule(1, 30, relays=2, consumers=2, rates=calm)
    assert count_by_kind(faults) == dict.fromkeys(count_by_kind(faults), 1)
    with pytest.raises(ValueError, match="seconds"):
        schedule(1, 0, relays=1, consumers=1)


@pytest.mark.parametrize("seed", range(20))
def test_an_outage_is_one_cut_of_its_length_with_no_kill_while_it_lasts(seed: int) -> None:
    faults = schedule(seed, 30, relays=3, consumers=2, rates=Rates(outage_seconds=12))
    (cut,) = [f for f in faults if f.kind is FaultKind.CUT_BROKER]
    assert cut.duration == 12
    assert cut.at + cut.duration < 30 - 1.5
    assert min(count_by_kind(faults).values()) >= 1, count_by_kind(faults)
    kills = [f for f in faults if f.kind in (FaultKind.KILL_RELAY, FaultKind.KILL_CONSUMER)]
    assert not [f for f in kills if cut.at - f.duration <= f.at <= cut.at + cut.duration]
    with pytest.raises(ValueError, match="outage"):
        schedule(seed, 30, relays=3, consumers=2, rates=Rates(outage_seconds=29))


# -- events published to a topic that does not exist ---------------------------------


def test_events_to_a_missing_topic_are_expected_as_dead_rows_and_only_them() -> None:
    obs = _clean()
    obs.to_missing_topic = {"m1", "m2"}
    obs.to_missing_topic_unknown = {"m3"}
    obs.dead_of_missing_topic = {"m1", "m2", "m3"}
    obs.dead_rows = 3
    report = check(obs)
    assert report.ok, report.failures
    assert (report.missing_topic_dead, report.dead_rows) == (3, 0)

    obs.dead_of_missing_topic = {"m1"}  # m2 acknowledged but never buried: still held or lost
    obs.dead_rows = 1
    assert _failing(obs) == {"missing_topic_not_dead"}

    obs.dead_of_missing_topic = {"m1", "m2", "rb-1"}  # a rolled-back event buried
    obs.dead_rows = 4  # and a row of another topic
    assert _failing(obs) == {"dead_rows"}
    assert check(obs).dead_rows == 2
