"""I9: a copied database (same outbox identity) relaying beside its original is reported.

A copy made with ``CREATE DATABASE ... TEMPLATE`` (or a dump restored as a second service)
keeps the outbox identity, so its relay uses the original's default transactional ids and
the two relays fence each other on every slot. Nothing is lost, but the relay must say
what is wrong and how to fix it (an ERROR and a metric), and must not say it for the fences
of normal operation (a takeover in the same database, a slot-count change).
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, make_url, text
from sqlalchemy.orm import Session

from outbox import publish, sql
from outbox.cli.views import renew_identity
from outbox.db import connect
from outbox.errors import ConfigError, SlotLost
from outbox.relay import GUARD_NAMESPACE, SLOT_NAMESPACE, Relay, RelayStats, Row, SlotWorker
from outbox.relay.config import RelayConfig
from outbox.relay.fences import RENEW_IDENTITY_SQL, ForeignFence
from outbox.relay.layout import SlotLayout
from tests.conftest import RelayHandle, Services, create_database, drop_database
from tests.integration.relay.faults import Faults, FaultyProducer, TrackedSession
from tests.support import KafkaReader, wait_for

FOREIGN = "Another database is relaying with this outbox's identity"


@pytest.fixture
def default_config(relay_config: Callable[..., RelayConfig]) -> Callable[..., RelayConfig]:
    """The default transactional-id prefix (the layout a copy ends up in), any database."""

    def make(dsn: str, **overrides: Any) -> RelayConfig:
        return relay_config(dsn=dsn, transactional_id_prefix=None, **overrides)

    return make


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture
def copy_url(services: Services, database_url: str) -> Iterator[str]:
    """A copy of the test's database made with CREATE DATABASE ... TEMPLATE: it keeps the
    original's outbox identity (the ``database_url`` fixture renews only its own)."""
    url = create_database(services, "outbox_copy", template=make_url(database_url).database)
    yield url
    drop_database(services, url)


@contextmanager
def _engine(url: str) -> Iterator[Engine]:
    eng = create_engine(url)
    try:
        yield eng
    finally:
        eng.dispose()


def _identity(url: str) -> uuid.UUID:
    with psycopg.connect(_libpq(url)) as conn:
        row = conn.execute("SELECT outbox_id FROM outbox_identity").fetchone()
        assert row is not None
        return uuid.UUID(str(row[0]))


def _publish_many(engine: Engine, topic: str, n: int) -> list[str]:
    with Session(engine) as session, session.begin():
        return [
            str(publish(session, topic=topic, key=f"key-{i % 7}", value={"i": i})) for i in range(n)
        ]


def _pending(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM outbox_events")).scalar_one())


def _start(config: RelayConfig) -> RelayHandle:
    handle = RelayHandle(Relay(config))
    handle.thread.start()
    return handle


def _foreign_errors(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "outbox.relay" and r.levelno == logging.ERROR and FOREIGN in r.getMessage()
    ]


def _all_on_topic(kafka: KafkaReader, topic: str, ids: list[str]) -> set[str]:
    """The events of ``ids`` that are NOT on the topic (at least once)."""
    return set(ids) - {r.event_id for r in kafka.read_every(topic, ids)}


SHORT_TRANSACTIONS: dict[str, Any] = {
    "producer_overrides": {"request.timeout.ms": "10000", "transaction.timeout.ms": "15000"}
}
"""For the relays that fence each other: a new owner's init_transactions, and a fenced owner's
flush or abort, can wait up to transaction.timeout.ms for the other's open transaction (Tansu
does not abort it at once); at the default 60 s the fencing paused for minutes under load and
a relay took over 60 s to stop."""


def _held_back(handles: list[RelayHandle], caplog: pytest.LogCaptureFixture) -> int:
    """Foreign fences logged as neither the first WARNING nor an ERROR: held back by the
    once-per-slot-per-period rule (each is counted just before it is logged)."""
    fences = sum(h.relay.stats.foreign_fences for h in handles)
    warnings = [
        r
        for r in caplog.records
        if r.levelno == logging.WARNING and "while this relay still held" in r.getMessage()
    ]
    return fences - len(warnings) - len(_foreign_errors(caplog))


def _renew_once_unlocked(url: str) -> tuple[str, str]:
    """``renew_identity`` once the stopped relay's slot sessions are gone. A slot session whose
    unlock failed at close (SlotSession.release suppresses the error and skips the close) can
    hold its lock after the relay stopped: renew then refuses, rightly, for a while; seen once
    in 30 busy-core runs. The wait is bounded and says what held on."""
    refusals: list[str] = []

    def renewed() -> tuple[str, str] | None:
        try:
            return renew_identity(url)
        except ConfigError as exc:
            refusals.append(str(exc))
            return None

    result = wait_for(renewed, timeout=60, what="the stopped relay's slot locks to go")
    assert result is not None  # wait_for returns only a truthy value
    if refusals:
        print(f"renew refused {len(refusals)} times first: {refusals[0]}")
    return result


def _assert_counters_agree(handle: RelayHandle) -> None:
    """The relay's counters, its scraped metric and its fence count, read while it is stopped
    (a running relay may count a fence between two reads)."""
    stats = handle.relay.stats
    scraped = handle.relay.metrics.registry.get_sample_value("outbox_relay_foreign_fences_total")
    assert (scraped or 0.0) == stats.foreign_fences
    assert stats.fenced >= stats.foreign_fences


@pytest.mark.timeout(720)
def test_i9_a_copied_database_relaying_beside_its_original_is_reported_with_the_fix(
    database_url: str,
    copy_url: str,
    default_config: Callable[..., RelayConfig],
    make_topic: Callable[..., str],
    kafka: KafkaReader,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Two relays with one identity fence each other on every takeover. Under that fencing the
    test waits only for the ERROR, not for a full drain: which relay wins a takeover is a race,
    and the fencing can stall either relay for minutes on a busy machine. The rows left in the
    copy are relayed after ``renew``, and every event of both databases is checked on its topic
    at the end."""
    caplog.set_level(logging.DEBUG, logger="outbox.relay")  # held-back fences, on a failure
    original_id = _identity(database_url)
    assert _identity(copy_url) == original_id  # the copy kept it: the case to report
    topic_a, topic_b = make_topic(), make_topic()
    with _engine(database_url) as a, _engine(copy_url) as b:
        handles = [
            _start(default_config(url, **SHORT_TRANSACTIONS)) for url in (database_url, copy_url)
        ]
        running = list(handles)
        ids_a: list[str] = []
        ids_b: list[str] = []
        try:
            wait_for(
                lambda: all(len(h.relay.workers) == 2 for h in handles),
                what="each relay owns its database's slots",
            )

            def fenced_from_outside() -> bool:
                # Work for both relays (a fence shows at a batch), but no more than a batch
                # or two behind: the backlog does not grow with every poll of this wait.
                if _pending(a) < 20:
                    ids_a.extend(_publish_many(a, topic_a, 20))
                if _pending(b) < 20:
                    ids_b.extend(_publish_many(b, topic_b, 20))
                return bool(_foreign_errors(caplog))

            # The ERROR needs a repeat on one slot: two takeovers racing. On a loaded machine a
            # repeat can take longer than the first fence; while fences are being counted the
            # wait goes on, within a bounded extension, and says which part never happened.
            try:
                wait_for(fenced_from_outside, timeout=90, what="an ERROR about a foreign fence")
            except AssertionError:
                fences = sum(h.relay.stats.foreign_fences for h in handles)
                assert fences, "no foreign fence at all in 90 s: the copies never fenced each other"
                wait_for(
                    fenced_from_outside,
                    timeout=150,
                    what=f"a repeated foreign fence (an ERROR) after {fences} unrepeated ones",
                )
            # The once-per-slot-per-period rule shows only when a slot is fenced again after
            # its ERROR (that fence is held back). Two relays with one identity race at every
            # takeover, and their fencing can pause for minutes on a busy machine, so the
            # backlog is kept up for a bounded while; the count of ERRORs below is checked in
            # any case, and the rule itself by test_fences.py.
            try:
                wait_for(
                    lambda: fenced_from_outside() and _held_back(handles, caplog) > 0,
                    timeout=60,
                    what="a foreign fence held back after its slot's ERROR",
                )
            except AssertionError as exc:
                print(f"{exc}: the ERROR count below did not see a held-back fence this run")
            errors = _foreign_errors(caplog)
            assert errors, "no ERROR for a fence from outside the database"
            message = errors[0].getMessage()
            assert str(original_id) in message
            assert f"outbox-{original_id.hex[:12]}-" in message  # the transactional id
            assert "CREATE DATABASE ... TEMPLATE" in message
            assert "outbox identity renew" in message  # the fix
            assert RENEW_IDENTITY_SQL in message
            assert "postgresql://" not in message
            assert "@" not in message
            # /readyz names fences confirmed by a repeat (an ERROR) in the last minutes.
            reported = [h for h in handles if h.relay.fence_alarm.confirmed_since(0.0)]
            assert "from outside this database" in reported[0].relay.readiness()[1]
            running.remove(handles[1])
            handles[1].stop()
            _assert_counters_agree(handles[1])
            # The fix the message gives: the copy gets its own identity; its relay restarts.
            old, new = _renew_once_unlocked(copy_url)
            assert (uuid.UUID(old), _identity(copy_url)) == (original_id, uuid.UUID(new))
            # A slot of the original fenced by the copy's last takeover finds out at its next
            # batch: one round for both slots, then the original owns them with its own epoch
            # and, unopposed, drains what the fencing left.
            ids_a += _publish_many(a, topic_a, 40)
            try:
                wait_for(
                    lambda: _pending(a) == 0 and len(handles[0].relay.workers) == 2,
                    timeout=120,
                    what="the original relay owns its slots again",
                )
            except AssertionError as exc:
                # Unopposed, the original must drain: say where it stands (the DEBUG log above
                # has its slots' held-back fences and batches).
                stats, workers = handles[0].relay.stats, sorted(handles[0].relay.workers)
                raise AssertionError(
                    f"{exc}: {_pending(a)} rows pending, slots {workers} owned, {stats}"
                ) from None
            renewed = _start(default_config(copy_url, **SHORT_TRANSACTIONS))
            running.append(renewed)
            wait_for(lambda: len(renewed.relay.workers) == 2, what="the renewed copy's relay runs")
            before = handles[0].relay.stats.fenced
            for _ in range(5):
                ids_a += _publish_many(a, topic_a, 40)
                ids_b += _publish_many(b, topic_b, 40)
            # The copy's rows left by the fencing are relayed by its renewed relay.
            wait_for(
                lambda: _pending(a) == 0 and _pending(b) == 0,
                timeout=120,
                what="both outboxes drained",
            )
            assert renewed.relay.stats.fenced == 0
            assert renewed.relay.stats.foreign_fences == 0
            assert handles[0].relay.stats.fenced == before  # the fencing stopped
        finally:
            for h in running:
                h.stop()
    _assert_counters_agree(handles[0])
    errors = _foreign_errors(caplog)
    # Once per slot per period, not once per fence (they fence each other repeatedly).
    assert len(errors) <= 2 * len(handles)
    assert sum(h.relay.stats.foreign_fences for h in handles) >= len(errors)
    # Nothing was lost: every event of both is on its topic at least once.
    assert _all_on_topic(kafka, topic_a, ids_a) == set()
    assert _all_on_topic(kafka, topic_b, ids_b) == set()


def test_i9_a_takeover_in_the_same_database_is_not_reported_as_a_foreign_fence(
    database_url: str,
    default_config: Callable[..., RelayConfig],
    topic: str,
    kafka: KafkaReader,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The first relay loses the slot in the database with a batch in hand; the second relay
    of the same database takes the slot, and its init_transactions fences the first one's
    producer before that one sends the batch: a normal takeover, a warning as before."""
    taken = threading.Event()

    def publish_after_losing_the_slot(session: TrackedSession, rows: list[Row]) -> None:
        if rows and not taken.is_set():
            session.conn.execute(sql.UNLOCK_SLOT, {"namespace": SLOT_NAMESPACE, "slot": 0})
            taken.wait(30)

    def started(producer: FaultyProducer) -> None:
        taken.set()  # the second relay's producer is initialised: the first one is fenced

    config = default_config(database_url, slots=1)
    first = Relay(config, seams=Faults(claimed=publish_after_losing_the_slot).seams())
    second = Relay(config, seams=Faults(started=started).seams())
    running = [RelayHandle(first)]
    running[0].thread.start()
    ids: list[str] = []
    with _engine(database_url) as engine:
        try:
            wait_for(lambda: len(first.workers) == 1, what="the first relay owns the slot")
            running.append(RelayHandle(second))
            running[1].thread.start()
            wait_for(lambda: second._members == 2, what="the second relay is up")
            for _ in range(5):
                ids += _publish_many(engine, topic, 40)
            wait_for(lambda: _pending(engine) == 0, timeout=60, what="the outbox drained")
        finally:
            for h in running:
                h.stop()
    assert taken.is_set()
    assert first.stats.fenced == 1  # the takeover fenced the first relay's batch
    assert second.stats.published > 0
    assert [r.stats.foreign_fences for r in (first, second)] == [0, 0]
    assert _foreign_errors(caplog) == []
    lost = [r.getMessage() for r in caplog.records if "slot 0 lost: fenced" in r.getMessage()]
    assert lost  # today's warning
    assert _all_on_topic(kafka, topic, ids) == set()


def test_i9_a_fence_while_this_database_still_holds_the_slot_is_foreign(
    slot_worker: SlotWorker,
) -> None:
    lost = slot_worker._fenced("fenced")
    assert isinstance(lost, ForeignFence)
    assert slot_worker.context.stats.foreign_fences == 1
    assert slot_worker.context.stats.fenced == 1


def test_i9_a_fence_after_the_slot_was_lost_in_this_database_is_a_takeover(
    slot_worker: SlotWorker, database_url: str
) -> None:
    slot_worker.conn.execute(sql.UNLOCK_SLOT, {"namespace": SLOT_NAMESPACE, "slot": 0})
    with psycopg.connect(_libpq(database_url), autocommit=True) as other:  # the new owner
        other.execute(sql.TRY_LOCK_SLOT, {"namespace": SLOT_NAMESPACE, "slot": 0})
        lost = slot_worker._fenced("fenced")
    assert type(lost) is SlotLost
    assert slot_worker.context.stats.foreign_fences == 0
    slot_worker.conn.close()  # the connection is gone: no check possible, today's warning
    assert type(slot_worker._fenced("fenced")) is SlotLost
    assert slot_worker.context.stats.foreign_fences == 0
    assert slot_worker.context.stats.fenced == 2


def test_i9_a_fence_by_a_slot_count_change_of_this_database_is_not_foreign(
    slot_worker: SlotWorker, database_url: str
) -> None:
    """Settling a slot-count change fences the old layout's slots under the guard lock, then records
    the new count: neither moment reads as a fence from outside."""
    with psycopg.connect(_libpq(database_url)) as settling:
        settling.execute(sql.GUARD_SLOT_COUNT, {"namespace": GUARD_NAMESPACE})
        lost = slot_worker._fenced("fenced")
        assert type(lost) is SlotLost
        assert "slot count" in str(lost)
        settling.execute(sql.RECORD_SLOT_COUNT, {"slots": 4})
        settling.commit()
    lost = slot_worker._fenced("fenced")
    assert type(lost) is SlotLost
    assert "slot count" in str(lost)
    assert slot_worker.context.stats.foreign_fences == 0


def test_i9_a_relay_that_read_the_identity_before_a_renew_stops_at_its_start_up_check(
    database_url: str, default_config: Callable[..., RelayConfig]
) -> None:
    """`outbox identity renew` sees no relay that has read the identity but holds no lock yet
    (it waits for Kafka). Its start-up check, serialised with renew by the same lock, stops
    it instead of letting it run under the old identity's transactional ids."""
    refused: list[BaseException] = []
    settled: list[int] = []
    layout = SlotLayout(default_config(database_url), stats=RelayStats(), refuse=refused.append)
    control = connect(database_url, application_name="outbox-relay")
    try:
        layout.load_identity(control)
        old, new = renew_identity(database_url)  # while the relay waits for Kafka
        assert uuid.UUID(old) == layout.outbox_id
        with pytest.raises(ConfigError, match=f"identity changed from {old} to {new}"):
            layout.announce(control, settle=settled.append)
        assert not settled, "a layout was settled under the old identity"
    finally:
        control.close()
