"""The relay through a PostgreSQL crash, on a server configured as users run it for no loss.

The session's embedded server runs with ``synchronous_commit=off`` and ``fsync=off`` for speed;
an immediate restart of such a server may lose commits it already acknowledged, and a test
would then measure the test server's loss, not the library's. This test kills its own server,
which runs with ``synchronous_commit=on`` and ``fsync=on``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.orm import Session

from outbox import publish
from outbox.embedded import EmbeddedPostgres
from outbox.migrate import upgrade
from tests.conftest import Broker, RelayHandle, Services
from tests.support import KafkaReader, assert_exactly_once, wait_for

DURABLE = {"synchronous_commit": "on", "fsync": "on"}


@pytest.fixture
def durable_pg(services: Services) -> Iterator[EmbeddedPostgres]:
    if services.pg is None:
        pytest.skip("needs the embedded PostgreSQL (it kills its own server)")
    with EmbeddedPostgres(database="crash", extra_settings=DURABLE) as pg:
        upgrade(pg.sqlalchemy_url)
        yield pg


def _pending(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM outbox_events")).scalar_one())


def _publish_many(engine: Engine, topic: str, n: int) -> list[str]:
    ids = []
    for i in range(n):
        with Session(engine) as session, session.begin():
            ids.append(str(publish(session, topic=topic, key=f"key-{i % 5}", value={"i": i})))
    return ids


@pytest.mark.both_brokers
def test_relay_survives_a_postgres_crash_and_keeps_going(
    durable_pg: EmbeddedPostgres,
    topic: str,
    broker: Broker,
    start_relay: Callable[..., RelayHandle],
    kafka: KafkaReader,
) -> None:
    with psycopg.connect(durable_pg.dsn) as conn:
        settings = conn.execute(
            "SELECT current_setting('synchronous_commit'), current_setting('fsync')"
        ).fetchone()
    assert settings == ("on", "on")
    engine = create_engine(durable_pg.sqlalchemy_url)
    try:
        handle = start_relay(dsn=durable_pg.sqlalchemy_url)
        wait_for(lambda: len(handle.relay.workers) == 2, what="relay owns its slots")
        first = _publish_many(engine, topic, 20)
        wait_for(lambda: _pending(engine) == 0, what="first events published")
        durable_pg.restart(immediate=True)
        engine.dispose()  # the application's pooled connections died with the server
        second = _publish_many(engine, topic, 20)
        wait_for(lambda: _pending(engine) == 0, timeout=60, what="relay reconnects and drains")
        wait_for(lambda: len(handle.relay.workers) == 2, what="relay owns its slots again")
        handle.stop()
    finally:
        engine.dispose()
    # A transaction cut by the crash may have been aborted: Tansu shows its records.
    records = kafka.read(topic, 40)
    assert_exactly_once(records, first + second, aborted_copies_visible=not broker.filters_aborts)
