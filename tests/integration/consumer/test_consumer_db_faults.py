"""I10: database faults that are transient by nature are retried with backoff, never charged
to the record, never a dead letter. Real faults of the real PostgreSQL: a lock held by
another session (lock_timeout, statement_timeout), a read-only database (failover), and
the consumer's backend terminated under it."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from confluent_kafka import Producer
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from consumer import Event, RetryPolicy
from consumer.handling import SyncTransactions
from consumer.startup import check_database
from tests.integration.consumer.test_consumer_effects import GROUP_SETTINGS, Running
from tests.integration.consumer.test_consumer_hostile import PositionProjector
from tests.support import stop_all, wait_for

ONE_ATTEMPT = RetryPolicy(attempts=2, initial_backoff=0.01, max_backoff=0.05, jitter=0)
"""Two handler attempts: a fault charged to the record would dead-letter it at once."""


def _produce(bootstrap_servers: str, topic: str, n: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap_servers})
    for i in range(n):
        producer.produce(
            topic,
            value=json.dumps({"n": i}).encode(),
            partition=0,
            headers=[("content-type", b"application/json")],
        )
    assert producer.flush(30) == 0


@pytest.fixture
def consume(
    database_url: str, bootstrap_servers: str, topic: str
) -> Iterator[Callable[..., Running]]:
    """A consumer on its own engine (one fresh connection per transaction, server options)."""
    handles: list[Running] = []
    engines: list[Engine] = []

    def start(options: str = "", cls: type[PositionProjector] = PositionProjector) -> Running:
        engine = create_engine(
            database_url, poolclass=NullPool, connect_args={"options": options} if options else {}
        )
        engines.append(engine)
        consumer = cls(
            engine,
            bootstrap_servers,
            topics=[topic],
            group_id=f"g-{uuid.uuid4().hex[:8]}",
            settings=GROUP_SETTINGS,
            retry=ONE_ATTEMPT,
        )
        handle = Running(consumer)  # type: ignore[arg-type]
        handles.append(handle)
        return handle

    yield start
    stop_all(handles)
    for engine in engines:
        engine.dispose()


def _effects(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(text("SELECT position FROM effects")).scalars())


@pytest.mark.parametrize(
    ("options", "fault"),
    [
        ("-c lock_timeout=100", "due to lock timeout"),  # 55P03
        ("-c statement_timeout=100", "due to statement timeout"),  # 57014
    ],
    ids=["lock-timeout", "statement-timeout"],
)
def test_i10_lock_and_statement_timeouts_are_waited_out_not_charged_to_the_record(
    effects: Engine,
    bootstrap_servers: str,
    topic: str,
    consume: Callable[..., Running],
    options: str,
    fault: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _produce(bootstrap_servers, topic, 2)
    with effects.connect() as locker:
        locker.execute(text("LOCK TABLE effects IN ACCESS EXCLUSIVE MODE"))  # held until rollback
        running = consume(options)
        wait_for(
            lambda: running.stats.outages >= 2 * ONE_ATTEMPT.attempts,
            timeout=60,
            what="several timeouts, more than the record's attempts",
        )
        locker.rollback()
    wait_for(lambda: running.stats.applied == 2, timeout=60, what="both records applied")
    stats = running.stop()
    assert (stats.dead_lettered, stats.retries) == (0, 0)
    assert sorted(_effects(effects)) == [f"{topic}/0/0", f"{topic}/0/1"]
    assert "database unavailable" in caplog.text
    assert fault in caplog.text


def test_i10_a_read_only_database_is_waited_out_not_charged_to_the_record(
    effects: Engine, bootstrap_servers: str, topic: str, consume: Callable[..., Running]
) -> None:
    """As during a failover: the server still answers, every write fails with 25006."""
    database = effects.url.database
    _produce(bootstrap_servers, topic, 2)
    with effects.connect().execution_options(isolation_level="AUTOCOMMIT") as admin:
        admin.execute(text(f'ALTER DATABASE "{database}" SET default_transaction_read_only = on'))
        running = consume()
        wait_for(
            lambda: running.stats.outages >= 2 * ONE_ATTEMPT.attempts,
            timeout=60,
            what="several read-only refusals",
        )
        admin.execute(text(f'ALTER DATABASE "{database}" RESET default_transaction_read_only'))
    wait_for(lambda: running.stats.applied == 2, timeout=60, what="both records applied")
    stats = running.stop()
    assert (stats.dead_lettered, stats.retries) == (0, 0)
    assert len(_effects(effects)) == 2


class Blocking(PositionProjector):
    """The first call reports its backend and waits until the test let it go."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.pid: int | None = None
        self.release = threading.Event()

    def handle(self, session: Session, event: Event) -> None:
        if self.pid is None:
            self.pid = int(session.execute(text("SELECT pg_backend_pid()")).scalar_one())
            self.release.wait(60)
        super().handle(session, event)


def test_i10_a_terminated_backend_is_a_lost_connection_retried_not_charged(
    effects: Engine, bootstrap_servers: str, topic: str, consume: Callable[..., Running]
) -> None:
    _produce(bootstrap_servers, topic, 1)
    running = consume(cls=Blocking)
    consumer = running.consumer
    assert isinstance(consumer, Blocking)
    wait_for(lambda: consumer.pid is not None, timeout=60, what="the handler to start")
    with effects.connect() as admin:
        assert admin.execute(text("SELECT pg_terminate_backend(:p)"), {"p": consumer.pid}).scalar()
    consumer.release.set()
    wait_for(lambda: running.stats.applied == 1, timeout=60, what="the record applied")
    stats = running.stop()
    assert (stats.dead_lettered, stats.retries) == (0, 0)
    assert stats.outages >= 1
    assert _effects(effects) == [f"{topic}/0/0"]
    assert consumer.calls[f"{topic}/0/0"] == 2  # the killed call, then the one that committed


def test_i8_a_database_gone_between_the_start_up_checks_is_a_one_line_connection_error(
    engine: Engine,
) -> None:
    """The start-up checks read the dedup tables, then ask the handler's engine whether it runs
    in AUTOCOMMIT. A PostgreSQL restart between the two (CI's chaos run) made that second
    connection's error a traceback, and the chaos harness counted the consumer as crashed;
    it is the one-line "cannot connect to PostgreSQL" the CLI reports, redacted, and that a
    supervisor restarts on."""
    gone = create_engine("postgresql+psycopg://app:s3cr3t@127.0.0.1:1/app", poolclass=NullPool)
    transactions = SyncTransactions(gone, lambda session, event: None, object)
    with pytest.raises(ConnectionError) as caught:
        check_database(engine, transactions)
    assert str(caught.value).startswith("cannot connect to PostgreSQL")
    assert "s3cr3t" not in str(caught.value)
