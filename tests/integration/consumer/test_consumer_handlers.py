"""I11: the user's handler at the consumer's boundary, on real PostgreSQL and a real broker.

Async handlers are awaited with every guarantee of the sync ones; a handler that breaks the
runner's transaction fails alone; engines without transactions are refused; faults are
charged by what caused them; attempts ended by transient faults are given back; records of
dead-letter topics are never dead-lettered again.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Generator
from typing import Any, ClassVar

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from consumer import Event, IdempotentConsumer, RetryLater, RetryPolicy
from consumer.handling import HandlerMisdeclared, TransactionMisuse
from consumer.testing import consumer_for_tests, deliver, record
from outbox import publish
from outbox.errors import ConfigError
from tests.integration.consumer.test_consumer_effects import (
    GROUP_SETTINGS,
    Fixture,
    Projector,
    Running,
    _committed,
    _effects,
    _produce,
    _publish,
)
from tests.support import KafkaReader, wait_for

ONE_TRY = RetryPolicy(attempts=1, initial_backoff=0.01, max_backoff=0.05, jitter=0)
"""No retries: a failure charged to the record dead-letters it at once."""

INSERT_EFFECT = text("INSERT INTO effects (event_id, consumer) VALUES (:event_id, :consumer)")


def _outbox_topics(engine: Engine) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(conn.execute(text("SELECT topic FROM outbox_events")).scalars())


def _dead_letter_header(engine: Engine, header: str) -> list[str]:
    """One header of each dead letter still in the outbox (not yet relayed)."""
    with engine.connect() as conn:
        rows = conn.execute(text("SELECT header_names, header_values FROM outbox_events")).all()
    return [
        bytes(value).decode()
        for names, values in rows
        for name, value in zip(names, values, strict=True)
        if name == header
    ]


# -- async handlers --------------------------------------------------------------------


class AsyncProjector(IdempotentConsumer):
    topics: ClassVar[list[str]] = ["set-per-test"]
    group_id = "set-per-test"

    def __init__(self, *args: Any, fail_on: str | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.fail_on = fail_on
        self.calls: Counter[str] = Counter()

    async def handle(self, session: AsyncSession, event: Event) -> None:
        self.calls[event.id] += 1
        await asyncio.sleep(0)  # really awaited on an event loop
        if event.id == self.fail_on:
            raise ValueError("cannot apply this one")
        await session.execute(INSERT_EFFECT, {"event_id": event.id, "consumer": "async"})


def test_i11_an_async_handler_is_awaited_and_applies_each_event_once(
    env: Fixture, drain: Callable[..., Any], start_consumer: Callable[..., Running]
) -> None:
    ids = _publish(env.engine, env.topic, [{"n": i} for i in range(8)])
    drain()
    running = start_consumer(AsyncProjector, batch_size=100)
    wait_for(lambda: running.stats.applied == 8, timeout=60, what="8 events applied")
    stats = running.stop()
    assert _effects(env.engine) == dict.fromkeys(ids, 1)
    assert stats.dead_lettered == 0


def test_i11_an_async_handler_failure_is_dead_lettered_through_the_outbox_alone(
    env: Fixture, drain: Callable[..., Any], start_consumer: Callable[..., Running]
) -> None:
    ids = _publish(env.engine, env.topic, [{"n": i} for i in range(5)])
    drain()
    running = start_consumer(AsyncProjector, fail_on=ids[2])
    wait_for(
        lambda: running.stats.applied == 4 and running.stats.dead_lettered == 1,
        timeout=60,
        what="4 applied, 1 dead letter",
    )
    running.stop()
    assert _effects(env.engine) == {i: 1 for i in ids if i != ids[2]}
    assert _outbox_topics(env.engine) == {f"{env.topic}.DLT": 1}
    assert running.consumer.calls[ids[2]] == 3  # FAST_RETRY's attempts


def test_i11_an_async_handler_gets_an_async_engine_given_to_the_consumer(
    env: Fixture, database_url: str
) -> None:
    engine = create_async_engine(database_url)
    try:
        projector = consumer_for_tests(AsyncProjector, engine, group_id="g", topics=["t"])
        event = record("t", {"n": 1})
        assert deliver(projector, event) is True
        assert deliver(projector, event) is False  # the same event id: skipped
        projector.close()
    finally:
        asyncio.run(engine.dispose())
    assert sum(_effects(env.engine).values()) == 1


class CoroutineByAccident(IdempotentConsumer):
    topics: ClassVar[list[str]] = ["t"]
    group_id = "g"

    def handle(self, session: Session, event: Event) -> Any:
        async def apply() -> None:
            session.execute(INSERT_EFFECT, {"event_id": event.id, "consumer": "never"})

        return apply()  # a plain def returning a coroutine: nothing of it would run


class GeneratorHandler(IdempotentConsumer):
    topics: ClassVar[list[str]] = ["t"]
    group_id = "g"

    def handle(self, session: Session, event: Event) -> Generator[None, None, None]:  # type: ignore[override]
        session.execute(INSERT_EFFECT, {"event_id": event.id, "consumer": "never"})
        yield


def test_i11_a_handler_returning_a_coroutine_is_refused_and_nothing_is_committed(
    env: Fixture,
) -> None:
    projector = consumer_for_tests(CoroutineByAccident, env.engine)
    with pytest.raises(HandlerMisdeclared, match="async def"):
        deliver(projector, record("t", {"n": 1}))
    with env.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM outbox_processed_events")).scalar() == 0


def test_i11_a_generator_handler_is_refused_at_start(env: Fixture) -> None:
    with pytest.raises(ConfigError, match="generator"):
        consumer_for_tests(GeneratorHandler, env.engine)


def test_i11_a_consumer_runs_as_a_task_of_the_apps_event_loop(
    env: Fixture, drain: Callable[..., Any]
) -> None:
    ids = _publish(env.engine, env.topic, [{"n": i} for i in range(3)])
    drain()
    consumer = AsyncProjector(
        env.engine,
        env.bootstrap_servers,
        topics=[env.topic],
        group_id=env.group,
        settings=GROUP_SETTINGS,
    )

    async def app() -> int:
        task = asyncio.create_task(consumer.run_async())
        deadline = time.monotonic() + 60
        ticks = 0
        while consumer.stats.applied < 3 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # the app's own loop keeps running meanwhile
            ticks += 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return ticks

    ticks = asyncio.run(app())
    assert ticks > 1
    assert consumer.stop.is_set()
    assert _effects(env.engine) == dict.fromkeys(ids, 1)


# -- the guarded transaction ------------------------------------------------------------


class Misbehaving(Projector):
    """Misuses the runner's transaction on one event (``bad``), in the way ``how`` says."""

    how = "swallow"
    bad: ClassVar[str] = ""

    def handle(self, session: Session, event: Event) -> None:
        if event.id == type(self).bad:
            self.calls[event.id] += 1
            session.execute(INSERT_EFFECT, {"event_id": event.id, "consumer": "misbehaving"})
            if self.how == "swallow":
                with contextlib.suppress(Exception):  # an "idempotent insert", no savepoint
                    session.execute(text("SELECT 1/0"))
            elif self.how == "rollback":
                session.rollback()
            elif self.how == "commit":
                session.commit()
            elif self.how == "sql-commit":
                session.execute(text("COMMIT"))
            return
        super().handle(session, event)


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("swallow", "swallowed a database error"),
        ("rollback", "rolled the transaction back"),
        ("commit", "called session.commit()"),
        ("sql-commit", "ended the transaction itself"),
    ],
)
def test_i11_a_handler_that_breaks_its_transaction_is_dead_lettered_alone(
    env: Fixture,
    drain: Callable[..., Any],
    start_consumer: Callable[..., Running],
    how: str,
    says: str,
) -> None:
    ids = _publish(env.engine, env.topic, [{"n": i} for i in range(6)])
    drain()
    bad = ids[2]
    cls = type(f"Misbehaving_{how}", (Misbehaving,), {"how": how, "bad": bad})
    running = start_consumer(cls, batch_size=100)
    wait_for(
        lambda: (
            running.stats.applied + running.stats.duplicates == 5
            and running.stats.dead_lettered == 1
        ),
        timeout=60,
        what="5 applied, the misbehaving one dead-lettered",
    )
    stats = running.stop()
    effects = _effects(env.engine)
    for i in ids:
        if i != bad:
            assert effects[i] == 1, f"{i} lost or doubled"
    if how != "sql-commit":
        assert effects[bad] == 0
        assert stats.duplicates == 0  # no innocent record skipped as already processed
    # A COMMIT sent as SQL committed the records before it with it (found as duplicates
    # when redone alone) and what the handler did before it, on each attempt.
    assert [m for m in _dead_letter_header(env.engine, "dlt-error-message") if says in m]


def test_i11_deliver_reports_a_swallowed_database_error(env: Fixture) -> None:
    class Swallows(IdempotentConsumer):
        topics: ClassVar[list[str]] = ["t"]
        group_id = "g"

        def handle(self, session: Session, event: Event) -> None:
            with contextlib.suppress(Exception):
                session.execute(text("SELECT 1/0"))

    with pytest.raises(TransactionMisuse, match="swallowed"):
        deliver(consumer_for_tests(Swallows, env.engine), record("t", {"n": 1}))


def test_i11_an_autocommit_engine_is_refused_at_start(env: Fixture, database_url: str) -> None:
    engine = create_engine(database_url, isolation_level="AUTOCOMMIT")
    try:
        consumer = Projector(engine, env.bootstrap_servers, topics=[env.topic], group_id=env.group)
        with pytest.raises(ConfigError, match="AUTOCOMMIT"):
            consumer.run()
    finally:
        engine.dispose()


# -- faults charged by what caused them ----------------------------------------------------


class SaveFailed(Exception):
    pass


class WrapsADroppedConnection(Projector):
    """The first call loses its connection and wraps the error in its own exception."""

    def handle(self, session: Session, event: Event) -> None:
        if not self.calls:
            self.calls["dropped"] += 1
            try:
                session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
            except OperationalError as exc:
                raise SaveFailed("could not save the order") from exc
        super().handle(session, event)


def test_i11_a_wrapped_dropped_connection_is_not_charged_to_the_record(
    env: Fixture, drain: Callable[..., Any], start_consumer: Callable[..., Running]
) -> None:
    ids = _publish(env.engine, env.topic, [{"n": 1}])
    drain()
    running = start_consumer(WrapsADroppedConnection, retry=ONE_TRY)
    wait_for(lambda: running.stats.applied == 1, timeout=60, what="the record applied")
    stats = running.stop()
    assert (stats.dead_lettered, stats.retries) == (0, 0)
    assert stats.outages >= 1
    assert _effects(env.engine) == {ids[0]: 1}


class SaysRetryLater(Projector):
    def handle(self, session: Session, event: Event) -> None:
        if self.calls["later"] < 3:
            self.calls["later"] += 1
            raise RetryLater("the pricing service is down", delay=0.05)
        super().handle(session, event)


def test_i11_retry_later_is_never_charged_to_the_record(
    env: Fixture, drain: Callable[..., Any], start_consumer: Callable[..., Running]
) -> None:
    ids = _publish(env.engine, env.topic, [{"n": 1}])
    drain()
    running = start_consumer(SaysRetryLater, retry=ONE_TRY)
    wait_for(lambda: running.stats.applied == 1, timeout=60, what="the record applied")
    stats = running.stop()
    assert stats.dead_lettered == 0
    assert running.consumer.calls["later"] == 3
    assert _effects(env.engine) == {ids[0]: 1}


class AlwaysTimesOut(Projector):
    bad: ClassVar[str] = ""

    def handle(self, session: Session, event: Event) -> None:
        if event.id == type(self).bad:
            self.calls[event.id] += 1
            session.execute(text("SET LOCAL statement_timeout = 50"))
            session.execute(text("SELECT pg_sleep(1)"))
        super().handle(session, event)


def test_i11_a_record_that_always_hits_a_statement_timeout_is_dead_lettered_in_bounded_time(
    env: Fixture, drain: Callable[..., Any], start_consumer: Callable[..., Running]
) -> None:
    ids = _publish(env.engine, env.topic, [{"n": i} for i in range(4)])
    drain()
    cls = type("TimesOut", (AlwaysTimesOut,), {"bad": ids[1]})
    budget = RetryPolicy(attempts=3, initial_backoff=0.05, max_backoff=0.2, stuck_budget=2.0)
    running = start_consumer(cls, retry=budget)
    wait_for(
        lambda: running.stats.applied == 3 and running.stats.dead_lettered == 1,
        timeout=60,
        what="the stuck record dead-lettered, the others applied",
    )
    running.stop()
    assert _effects(env.engine) == {i: 1 for i in ids if i != ids[1]}
    assert _dead_letter_header(env.engine, "dlt-reason") == ["stuck"]


# -- attempts ---------------------------------------------------------------------------------


def _attempt_rows(engine: Engine, group: str) -> list[tuple[int, int, int]]:
    with engine.connect() as conn:
        return [
            (int(r[0]), int(r[1]), int(r[2]))
            for r in conn.execute(
                text(
                    "SELECT first_offset, last_offset, attempts FROM outbox_consumer_attempts "
                    "WHERE group_id = :g"
                ),
                {"g": group},
            )
        ]


def test_i11_finished_batches_leave_no_attempts_row(
    env: Fixture, drain: Callable[..., Any], start_consumer: Callable[..., Running]
) -> None:
    _publish(env.engine, env.topic, [{"n": i} for i in range(5)])
    drain()
    running = start_consumer(batch_size=100)
    wait_for(lambda: running.stats.applied == 5, timeout=60, what="5 applied")
    running.stop()
    assert _attempt_rows(env.engine, env.group) == []


class WaitsForItsDependency(Projector):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.asked = threading.Event()

    def handle(self, session: Session, event: Event) -> None:
        self.asked.set()
        raise RetryLater("the dependency is down", delay=30)


def test_i11_an_attempt_ended_by_a_transient_fault_is_given_back_when_stopped_in_the_backoff(
    env: Fixture, drain: Callable[..., Any], start_consumer: Callable[..., Running]
) -> None:
    _publish(env.engine, env.topic, [{"n": 1}])
    drain()
    for _run in range(4):  # more runs than the record's attempts
        running = start_consumer(WaitsForItsDependency, retry=ONE_TRY)
        consumer = running.consumer
        assert isinstance(consumer, WaitsForItsDependency)
        wait_for(consumer.asked.is_set, timeout=60, what="the handler to be called")
        wait_for(
            lambda: all(a == 0 for _f, _l, a in _attempt_rows(env.engine, env.group)),
            timeout=30,
            what="the attempt given back",
        )
        stats = running.stop()
        assert stats.dead_lettered == 0
    assert _outbox_topics(env.engine) == {}


# -- no dead-letter loops ----------------------------------------------------------------------


def test_i11_a_record_of_a_dead_letter_topic_is_never_dead_lettered_again(
    env: Fixture,
    drain: Callable[..., Any],
    kafka: KafkaReader,
    start_consumer: Callable[..., Running],
) -> None:
    dlt = f"{env.topic}.DLT"
    _publish(env.engine, dlt, [{"n": 1}])
    drain()
    running = start_consumer(
        topics=[dlt], retry=ONE_TRY, fail=lambda e: ValueError("still failing")
    )
    wait_for(lambda: running.stats.not_dead_lettered == 1, timeout=60, what="the record given up")
    stats = running.stop()
    assert stats.dead_lettered == 0
    assert _outbox_topics(env.engine) == {}
    partition = kafka.read(dlt, 1)[0].partition
    wait_for(
        lambda: _committed(env.bootstrap_servers, env.group, dlt)[partition] == 1,
        what="its offset committed",
    )


def test_i11_a_regex_subscription_matching_its_dead_letter_topics_warns_at_start(
    env: Fixture,
    drain: Callable[..., Any],
    start_consumer: Callable[..., Running],
    caplog: pytest.LogCaptureFixture,
) -> None:
    _publish(env.engine, env.topic, [{"n": 1}])
    drain()
    running = start_consumer(topics=[f"^{env.topic}.*"])
    wait_for(
        lambda: "also matches its own dead-letter topics" in caplog.text,
        timeout=30,
        what="the warning",
    )
    running.stop()


def test_i11_a_swallowed_integrity_error_in_an_async_handler_is_dead_lettered_alone(
    env: Fixture, drain: Callable[..., Any], start_consumer: Callable[..., Running]
) -> None:
    with env.engine.begin() as conn:
        conn.execute(text("CREATE TABLE unique_thing (id int PRIMARY KEY)"))
        conn.execute(text("INSERT INTO unique_thing VALUES (1)"))
    ids = _publish(env.engine, env.topic, [{"n": i} for i in range(4)])
    drain()

    class Idempotentish(AsyncProjector):
        async def handle(self, session: AsyncSession, event: Event) -> None:
            if event.value["n"] == 1:
                with contextlib.suppress(IntegrityError):
                    await session.execute(text("INSERT INTO unique_thing VALUES (1)"))
                return
            await super().handle(session, event)

    running = start_consumer(Idempotentish, batch_size=100)
    wait_for(
        lambda: running.stats.applied == 3 and running.stats.dead_lettered == 1,
        timeout=60,
        what="3 applied, 1 dead-lettered",
    )
    assert running.stop().duplicates == 0
    assert _effects(env.engine) == {i: 1 for i in ids if i != ids[1]}


class LeavesATaskRunning(AsyncProjector):
    """On one event, starts a task that writes through the session and returns without
    awaiting it (fire and forget): the task would run inside a later record's transaction."""

    bad: ClassVar[str] = ""
    stray: asyncio.Task[None] | None = None

    async def handle(self, session: AsyncSession, event: Event) -> None:
        if event.id == type(self).bad:
            self.calls[event.id] += 1

            async def later() -> None:
                await asyncio.sleep(0.05)
                await session.execute(INSERT_EFFECT, {"event_id": event.id, "consumer": "stray"})

            self.stray = asyncio.get_running_loop().create_task(later())
            return
        await super().handle(session, event)


def test_i11_an_async_handler_leaving_a_task_running_is_dead_lettered_alone(
    env: Fixture, drain: Callable[..., Any], start_consumer: Callable[..., Running]
) -> None:
    ids = _publish(env.engine, env.topic, [{"n": i} for i in range(5)])
    drain()
    cls = type("LeavesATaskRunning_", (LeavesATaskRunning,), {"bad": ids[1]})
    running = start_consumer(cls, batch_size=100, retry=ONE_TRY)
    wait_for(
        lambda: running.stats.applied == 4 and running.stats.dead_lettered == 1,
        timeout=60,
        what="4 applied, the one that left a task running dead-lettered",
    )
    stats = running.stop()
    assert stats.duplicates == 0
    assert _effects(env.engine) == {i: 1 for i in ids if i != ids[1]}  # the stray wrote nothing
    stray = getattr(running.consumer, "stray", None)
    assert stray is not None
    assert stray.cancelled()
    assert [
        m
        for m in _dead_letter_header(env.engine, "dlt-error-message")
        if "left 1 task running" in m
    ]


class Abort(BaseException):
    """A library's BaseException subclass (like gevent's or a test framework's)."""


def test_i11_a_base_exception_from_the_handler_fails_its_record_not_the_consumer(
    env: Fixture, drain: Callable[..., Any], start_consumer: Callable[..., Running]
) -> None:
    ids = _publish(env.engine, env.topic, [{"n": i} for i in range(3)])
    drain()
    bad = ids[1]

    class Aborts(Projector):
        def handle(self, session: Session, event: Event) -> None:
            if event.id == bad:
                raise Abort("no")
            super().handle(session, event)

    running = start_consumer(Aborts, retry=ONE_TRY)
    wait_for(
        lambda: running.stats.applied == 2 and running.stats.dead_lettered == 1,
        timeout=60,
        what="2 applied, 1 dead-lettered",
    )
    running.stop()
    assert _effects(env.engine) == {i: 1 for i in ids if i != bad}


# -- the property: arbitrary handler behaviours through the real consumer ------------------------

BEHAVIOURS = ["ok", "raise", "wrapped", "swallow", "rollback", "commit", "timeout", "retry-later"]
FAILS = {"raise", "swallow", "rollback", "commit", "timeout"}
"""Behaviours that are the record's own fault, every time: it ends dead-lettered, once."""


class Behaves(Projector):
    """Does to its transaction what the event says; ``wrapped`` and ``retry-later`` only on
    the first call (a dependency that comes back)."""

    def handle(self, session: Session, event: Event) -> None:
        do = event.value["do"]
        first = self.calls[event.id] == 0
        self.calls[event.id] += 1
        if do == "raise":
            raise ValueError("bad data")
        if do == "wrapped" and first:
            try:
                session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
            except OperationalError as exc:
                raise SaveFailed("could not save") from exc
        if do == "retry-later" and first:
            raise RetryLater("dependency down", delay=0.01)
        if do == "timeout":
            session.execute(text("SET LOCAL statement_timeout = 20"))
            session.execute(text("SELECT pg_sleep(1)"))
        session.execute(INSERT_EFFECT, {"event_id": event.id, "consumer": do})
        if do == "swallow":
            with contextlib.suppress(Exception):
                session.execute(text("SELECT 1/0"))
        elif do == "rollback":
            session.rollback()
        elif do == "commit":
            session.commit()


def _dead_lettered_ids(engine: Engine) -> Counter[str]:
    return Counter(_dead_letter_header(engine, "dlt-original-event-id"))


@pytest.fixture
def behaving(
    env: Fixture, drain: Callable[..., Any], start_consumer: Callable[..., Running]
) -> Running:
    """One consumer for every example (a group join costs seconds)."""
    policy = RetryPolicy(attempts=2, initial_backoff=0.01, max_backoff=0.02, stuck_budget=0.3)
    _publish(env.engine, env.topic, [{"do": "ok"}])  # creates the topic on Tansu
    drain()
    running = start_consumer(Behaves, batch_size=3, retry=policy)
    wait_for(lambda: running.stats.applied == 1, timeout=60, what="the first record applied")
    return running


@settings(
    max_examples=12,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],  # no shrinking: real services
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=st.lists(st.sampled_from(BEHAVIOURS), min_size=1, max_size=5))
def test_i11_whatever_the_handler_does_each_record_ends_applied_once_or_dead_lettered_once(
    env: Fixture, behaving: Running, batch: list[str]
) -> None:
    # Produced straight to Kafka (as the relay would), so the outbox holds only dead letters.
    ids = [str(uuid.uuid4()) for _ in batch]
    _produce(
        env.bootstrap_servers,
        env.topic,
        [
            (
                b"k",
                json.dumps({"do": do}).encode(),
                [("outbox-event-id", i.encode()), ("content-type", b"application/json")],
            )
            for i, do in zip(ids, batch, strict=True)
        ],
    )
    expect_applied = {i for i, do in zip(ids, batch, strict=True) if do not in FAILS}
    expect_dead = {i for i, do in zip(ids, batch, strict=True) if do in FAILS}

    def settled() -> bool:
        effects, dead = _effects(env.engine), _dead_lettered_ids(env.engine)
        return all(effects[i] for i in expect_applied) and all(dead[i] for i in expect_dead)

    wait_for(settled, timeout=60, what=f"{batch} settled")
    effects, dead = _effects(env.engine), _dead_lettered_ids(env.engine)
    for i in expect_applied:
        assert (effects[i], dead[i]) == (1, 0), f"{i} applied {effects[i]}, dead {dead[i]}"
    for i in expect_dead:
        assert (effects[i], dead[i]) == (0, 1), f"{i} applied {effects[i]}, dead {dead[i]}"
    assert behaving.thread.is_alive()


class WaitsLongerThanThePollInterval(Projector):
    def handle(self, session: Session, event: Event) -> None:
        if not self.calls["later"]:
            self.calls["later"] += 1
            raise RetryLater("dependency down", delay=9)  # > max.poll.interval.ms below
        super().handle(session, event)


def test_i11_a_record_waiting_longer_than_the_poll_interval_keeps_the_member_in_its_group(
    env: Fixture,
    drain: Callable[..., Any],
    start_consumer: Callable[..., Running],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    ids = _publish(env.engine, env.topic, [{"n": 1}])
    drain()
    settings = {**GROUP_SETTINGS, "max.poll.interval.ms": "6000"}
    running = start_consumer(WaitsLongerThanThePollInterval, settings=settings)
    wait_for(lambda: running.consumer.calls["later"] == 1, timeout=60, what="the first call")
    wait_for(
        lambda: "waits to be retried" in running.consumer.liveness()[1],
        timeout=10,
        what="liveness to say a record waits",
    )
    wait_for(lambda: running.stats.applied == 1, timeout=60, what="the record applied")
    stats = running.stop()
    assert (stats.dead_lettered, stats.retries) == (0, 0)
    assert _effects(env.engine) == {ids[0]: 1}
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if m.startswith("assigned")]) == 1  # never re-joined
    assert not [m for m in messages if m.startswith("lost") or "poll interval" in m.lower()]


def test_i11_a_regex_subscription_with_a_poison_record_makes_exactly_one_dead_letter(
    env: Fixture, drain: Callable[..., Any], start_consumer: Callable[..., Running]
) -> None:
    """``^topic.*`` also reads ``topic.DLT``: the poison record's dead letter fails there too
    and is given up, not dead-lettered to ``topic.DLT.DLT`` (and so on, a topic a round)."""
    ids = _publish(env.engine, env.topic, [{"n": 0}, {"n": 1, "poison": True}])
    drain()
    running = start_consumer(
        topics=[f"^{env.topic}.*"],
        retry=ONE_TRY,
        settings={**GROUP_SETTINGS, "topic.metadata.refresh.interval.ms": "1000"},
        fail=lambda e: ValueError("poison") if e.value.get("poison") else None,
    )
    wait_for(
        lambda: running.stats.applied == 1 and running.stats.dead_lettered == 1,
        timeout=60,
        what="the poison record dead-lettered",
    )
    assert _outbox_topics(env.engine) == {f"{env.topic}.DLT": 1}
    drain()  # the dead letter reaches topic.DLT, which the subscription matches
    wait_for(
        lambda: running.stats.not_dead_lettered == 1,
        timeout=60,
        what="the dead letter read back, failed and given up",
    )
    stats = running.stop()
    assert stats.dead_lettered == 1
    assert _outbox_topics(env.engine) == {}
    assert _effects(env.engine) == {ids[0]: 1}


def test_i11_a_commit_sent_as_sql_never_lets_an_earlier_duplicate_be_applied_again(
    env: Fixture, drain: Callable[..., Any], start_consumer: Callable[..., Running]
) -> None:
    """The dedup rows the handler's COMMIT committed for records it had not reached are
    deleted, but never one an earlier transaction committed (that event would apply twice)."""
    done = uuid.uuid4()
    with Session(env.engine) as session, session.begin():
        publish(session, topic=env.topic, key="k", value={"n": 0}, event_id=done)
    drain()
    first = start_consumer()
    wait_for(lambda: first.stats.applied == 1, timeout=60, what="the first event applied")
    first.stop()

    bad = str(uuid.uuid4())
    with Session(env.engine) as session, session.begin():
        publish(session, topic=env.topic, key="k", value={"n": 1}, event_id=uuid.UUID(bad))
        publish(session, topic=env.topic, key="k", value={"n": 0}, event_id=done)  # again
        publish(session, topic=env.topic, key="k", value={"n": 2})
    drain()
    cls = type("CommitsAsSql", (Misbehaving,), {"how": "sql-commit", "bad": bad})
    running = start_consumer(cls, batch_size=100)
    wait_for(
        lambda: running.stats.dead_lettered == 1 and running.stats.applied == 1,
        timeout=60,
        what="the misbehaving one dead-lettered, the new one applied",
    )
    running.stop()
    assert _effects(env.engine)[str(done)] == 1


class CommitsThenWorks(Projector):
    """On ``bad``: a COMMIT sent as SQL, then more statements (psycopg opens a new
    transaction for them, so the connection looks in a transaction again)."""

    bad: ClassVar[str] = ""

    def handle(self, session: Session, event: Event) -> None:
        if event.id == type(self).bad:
            session.execute(INSERT_EFFECT, {"event_id": event.id, "consumer": "commits"})
            session.execute(text("COMMIT"))
            session.execute(text("SELECT 1"))
            return
        super().handle(session, event)


def test_i11_a_commit_sent_as_sql_then_more_work_never_loses_the_records_after_it(
    env: Fixture, drain: Callable[..., Any], start_consumer: Callable[..., Running]
) -> None:
    """The records after the handler that ended the transaction are applied once each, even
    when a later handler fails and the batch is redone."""
    ids = _publish(env.engine, env.topic, [{"n": i} for i in range(6)])
    drain()
    bad, flaky = ids[2], ids[4]
    failed: list[str] = []

    def fail_once(event: Event) -> Exception | None:
        if event.id == flaky and not failed:
            failed.append(event.id)
            return ValueError("a transient fault of this record")
        return None

    cls = type("CommitsThenWorksHere", (CommitsThenWorks,), {"bad": bad})
    running = start_consumer(cls, batch_size=100, fail=fail_once)
    wait_for(
        lambda: (
            all(_effects(env.engine)[i] == 1 for i in ids if i != bad)
            and running.stats.dead_lettered == 1
        ),
        timeout=60,
        what="every other record applied once, the one that ended its transaction dead-lettered",
    )
    running.stop()
    effects = _effects(env.engine)
    assert [effects[i] for i in ids if i != bad] == [1] * 5
    messages = _dead_letter_header(env.engine, "dlt-error-message")
    assert [m for m in messages if "ended the transaction itself" in m]


def test_i11_deliver_reports_a_commit_sent_as_sql_then_more_work_sync_and_async(
    env: Fixture, database_url: str
) -> None:
    class Sync(IdempotentConsumer):
        topics: ClassVar[list[str]] = ["t"]
        group_id = "g"

        def handle(self, session: Session, event: Event) -> None:
            session.execute(text("COMMIT"))
            session.execute(text("SELECT 1"))

    class Async(IdempotentConsumer):
        topics: ClassVar[list[str]] = ["t"]
        group_id = "g-async"

        async def handle(self, session: AsyncSession, event: Event) -> None:
            await session.execute(text("COMMIT"))
            await session.execute(text("SELECT 1"))

    with pytest.raises(TransactionMisuse, match="ended the transaction itself"):
        deliver(consumer_for_tests(Sync, env.engine), record("t", {"n": 1}))
    engine = create_async_engine(database_url)
    try:
        projector = consumer_for_tests(Async, engine)
        with pytest.raises(TransactionMisuse, match="ended the transaction itself"):
            deliver(projector, record("t", {"n": 2}))
        projector.close()
    finally:
        asyncio.run(engine.dispose())
