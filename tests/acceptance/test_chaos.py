"""The chaos test at CI size: the whole pipeline under seeded faults, exactly-once effects.

Two services (outboxes), each with its own database, topic, writers, ``outbox relay`` and
``outbox consume`` processes, share one PostgreSQL server and one broker (behind a TCP proxy),
both with default relay settings, while relays and consumers are SIGKILLed, PostgreSQL is
restarted (immediate) and the broker link is cut. The timing of the faults is random (the seed
is printed; replay with ``CHAOS_SEED=<seed>`` or ``python -m tests.chaos --seed <seed>``), the
invariants are not: every committed event of each outbox applied exactly once, nothing lost,
nothing from rolled-back transactions, per-key order. The run also fails when the faults did
not strike what they aim at (a relay recovery, a consumer dedup skip, a relay killed with a
batch in flight), when too many events were left out of the check, or when it committed too
little, or when the operator's ``outbox verify`` (run as a subprocess on each outbox's topic
and consumer group) disagrees with the harness's verdict. See docs/chaos.md.

It runs once per broker. ``[tansu]``: the run's own Tansu behind the proxy, whose link is cut.
``[kafka]``: the session's 3-node Apache Kafka cluster, where the broker fault SIGKILLs a node
(its leaders move) and starts it again, and the topic must hold every event exactly once for
read_committed readers: 0 duplicates, asserted.

``CHAOS_EVENTS`` / ``CHAOS_SECONDS`` change the size (default 1000 events, 20 s: the schedule
then holds every kind of fault, 3 relay kills, 2 consumer kills, 1 cut and 1 restart on average,
and a kind that missed its moment is aimed again in the harness's bounded extension);
``CHAOS_SECOND_OUTBOX=1`` / ``0`` runs the second outbox or not (default: ``SECOND_OUTBOX``).

Two variants (one outbox, 20 to 24 s of faults) cover failure classes of issue 14: relays in
``--guarantee at-least-once`` through a broker-wide outage longer than their delivery timeout
(Tansu), and writers that publish a share of events to a topic that does not exist (Apache
Kafka, where auto-create is off).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.chaos.faults import FaultKind, Rates
from tests.chaos.harness import AT_LEAST_ONCE_SETTINGS, ChaosConfig, Summary, run_chaos
from tests.conftest import Broker

SECOND_OUTBOX = "1"
"""A second outbox (own database, default relay settings) beside the first on one broker: before
issue 12's fix the two fenced each other and one deleted the other's rows (a run lost 110 of 432
events of outbox b)."""


def _seed() -> int:
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(2**31))
    print(f"chaos seed: {seed} (replay: CHAOS_SEED={seed} or python -m tests.chaos --seed {seed})")
    return seed


def _assert_every_kind_struck(summary: Summary, where: str) -> None:
    """The faults' aims: a miss was aimed again; only a kind that never struck fails."""
    print(f"faults aimed again: {summary.faults_reaimed}")
    assert summary.aim_failures == [], f"{where}: " + "; ".join(summary.aim_failures)


def _assert_every_event_applied_once(summary: Summary, where: str) -> None:
    """The checker's verdict, and the counts it rests on, for each outbox."""
    assert summary.failures == [], f"{where}: " + "; ".join(summary.failures)
    for name, report in summary.outboxes.items():
        at = f"{where}, outbox {name}"
        assert report["lost"] == report["topic_lost"] == 0, at
        assert report["duplicate_effects"] == report["phantoms"] == 0, at
        assert report["order_violations"] == report["topic_order_violations"] == 0, at
        assert report["effects_applied"] == report["committed"] > 0, at
        assert report["rolled_back"] > 0, f"{at}: no transaction was rolled back"
        assert report["excluded_over_limit"] == report["too_few_committed"] == 0, at


def _assert_outbox_verify_agrees(summary: Summary, where: str) -> None:
    """The real ``outbox verify`` (a subprocess, the operator's command) as a second checker:
    it exits 0 where the harness found the topic clean; where the broker showed records of
    aborted transactions (Tansu), it names exactly those extra copies as duplicates."""
    assert set(summary.verify) == set(summary.outboxes), where
    for name, verify in summary.verify.items():
        harness, report = summary.outboxes[name], verify["report"]
        at = f"{where}, outbox {name}, outbox verify exit {verify['exit']}: {report}"
        assert report is not None, at
        assert report["lost"] == [], at
        if harness["topic_duplicates"] == 0:
            assert (verify["exit"], report["clean"]) == (0, True), at
        else:
            extra = sum(n - 1 for n in report["duplicates"].values())
            assert (verify["exit"], extra) == (1, harness["topic_duplicates"]), at
        [group] = report["groups"]
        assert (group["applied"], group["lag"]) == (report["recorded"], 0), at
        assert group["unreadable"] == group["passed_unapplied"] == [], at


@pytest.mark.both_brokers
@pytest.mark.timeout(420)
def test_i2_i3_i4_i5_i9_exactly_once_effects_under_chaos(tmp_path: Path, broker: Broker) -> None:
    # [tansu] (and an external cluster): the run's own Tansu behind a proxy it can cut.
    # [kafka]: the session's 3-node cluster; the broker fault SIGKILLs a node instead.
    on_kafka = broker.name == "kafka"
    seed = _seed()
    config = ChaosConfig(
        seed=seed,
        events=int(os.environ.get("CHAOS_EVENTS", "1000")),
        seconds=float(os.environ.get("CHAOS_SECONDS", "20")),
        settle_timeout=90,
        log_dir=tmp_path / "chaos-logs",
        strict=True,  # a relay or consumer that crashes on its own, or logs a traceback, fails
        second_outbox=os.environ.get("CHAOS_SECOND_OUTBOX", SECOND_OUTBOX) == "1",
        broker="kafka" if on_kafka else "tansu",
    )
    summary = run_chaos(config, broker.cluster if on_kafka else None)
    print(summary.as_dict())
    where = f"seed {seed}, logs in {summary.log_dir}"

    _assert_every_event_applied_once(summary, where)
    _assert_outbox_verify_agrees(summary, where)
    assert set(summary.outboxes) == ({"a", "b"} if config.second_outbox else {"a"})
    # The run really was chaotic: every kind of fault was scheduled, injected and struck what
    # it aims at (a batch in flight, a recovery, a dedup skip), in the schedule or in the
    # bounded extension that aims a kind again when a busy machine made it miss its moment.
    _assert_every_kind_struck(summary, where)
    for kind in FaultKind:
        assert summary.faults_scheduled[kind.value] >= 1, f"{where}: {summary.faults_scheduled}"
        assert summary.faults[kind.value] >= 1, f"{where}: {summary.faults}"
    assert summary.process_logs["relay_recoveries"] >= 1, where
    assert summary.process_logs["consumer_duplicates_skipped"] >= 1, where
    assert summary.relay_kills_mid_batch >= 1, where
    # Tansu shows records of aborted transactions (reported); Apache Kafka hides them, so
    # there the topic holds every event exactly once for read_committed readers (I4).
    print(f"topic duplicates: {summary.topic_duplicates} ({summary.topic_duplicates_note})")
    if on_kafka:
        assert summary.topic_duplicates == 0, f"{where}: duplicates on the topic"
    print(f"left out of the check: {summary.events_excluded} {summary.excluded_reasons}")


OUTAGE_SECONDS = 12.0
"""Longer than the relays' delivery timeout in the at-least-once run (``message.timeout.ms``)."""


@pytest.mark.timeout(300)
def test_i2_at_least_once_loses_nothing_through_an_outage_longer_than_the_delivery_timeout(
    tmp_path: Path, broker: Broker
) -> None:
    # Issue 14: at-least-once deleted rows whose delivery was never acknowledged, so records
    # that expired while the broker was unreachable were lost. Tansu only: the proxy cuts
    # every connection at once (a broker-wide outage).
    if broker.name != "tansu":
        pytest.skip("the broker-wide outage is a cut of the proxy in front of Tansu")
    assert int(AT_LEAST_ONCE_SETTINGS["message.timeout.ms"]) < OUTAGE_SECONDS * 1000
    seed = _seed()
    config = ChaosConfig(
        seed=seed,
        events=600,
        seconds=24,  # the outage, with traffic before it and time after it
        settle_timeout=150,  # consumers took 60-85 s to catch up after the outage on Tansu
        log_dir=tmp_path / "chaos-logs",
        strict=True,
        second_outbox=False,
        guarantee="at-least-once",
        rates=Rates(outage_seconds=OUTAGE_SECONDS),
    )
    summary = run_chaos(config)
    print(summary.as_dict())
    where = f"seed {seed}, logs in {summary.log_dir}"
    # Duplicates on the topic are allowed in at-least-once; the consumer applies each once.
    _assert_every_event_applied_once(summary, where)
    _assert_every_kind_struck(summary, where)
    assert summary.faults["cut-broker"] >= 1, where
    # The outage outlasted the delivery timeout: records expired, their rows were kept.
    assert summary.process_logs["relay_deliveries_expired"] >= 1, where


@pytest.mark.needs_apache_kafka
@pytest.mark.timeout(420)
def test_i6_rows_of_a_missing_topic_become_dead_rows_while_every_other_event_arrives(
    tmp_path: Path, broker: Broker
) -> None:
    # Issue 14: a row of a topic that does not exist was retried forever and held up every
    # other topic of its slot. Apache Kafka only: Tansu creates topics on first use.
    if broker.name != "kafka" or broker.cluster is None:
        pytest.skip("needs a broker that does not create topics on first use (Apache Kafka)")
    seed = _seed()
    config = ChaosConfig(
        seed=seed,
        events=400,
        seconds=20,
        settle_timeout=90,
        log_dir=tmp_path / "chaos-logs",
        strict=True,
        second_outbox=False,
        broker="kafka",
        missing_topic_share=0.1,
    )
    summary = run_chaos(config, broker.cluster)
    print(summary.as_dict())
    where = f"seed {seed}, logs in {summary.log_dir}"
    # Every other event arrived once; the checker fails on any dead row but theirs.
    _assert_every_event_applied_once(summary, where)
    _assert_every_kind_struck(summary, where)
    report = summary.outboxes["a"]
    assert report["dead_rows"] == report["missing_topic_not_dead"] == 0, where
    assert report["missing_topic_dead"] > 0, where
    assert summary.process_logs["relay_topics_held"] >= 1, where
