"""Real services for the whole test session: PostgreSQL and a Kafka-protocol broker.

By default both are started here (embedded PostgreSQL, run as an unprivileged
user under root; the Tansu broker from its wheel). Point the suite at servers
you already run with:

- ``OUTBOX_TEST_DB``: a PostgreSQL URL whose user may CREATE DATABASE;
- ``OUTBOX_TEST_BOOTSTRAP_SERVERS``: a Kafka cluster (Apache Kafka filters
  aborted transactions, so the tests marked ``needs_abort_filtering`` run too);
- ``OUTBOX_TEST_BROKER_FILTERS_ABORTS=1`` to say the broker there does that.

Each test gets a fresh database cloned from a migrated template (fast, isolated).
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url

from outbox.config import RelayConfig
from outbox.migrate import upgrade
from outbox.relay import Relay
from tests.support import KafkaReader, wait_for


@dataclass(frozen=True)
class Services:
    admin_url: str  # SQLAlchemy URL of the maintenance database (postgres)
    bootstrap_servers: str
    filters_aborts: bool
    pg: Any  # EmbeddedPostgres or None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("OUTBOX_TEST_BROKER_FILTERS_ABORTS") == "1":
        return
    skip = pytest.mark.skip(
        reason="the embedded Tansu broker shows records of aborted transactions to "
        "read_committed consumers; run with OUTBOX_TEST_BOOTSTRAP_SERVERS=<Apache Kafka> "
        "and OUTBOX_TEST_BROKER_FILTERS_ABORTS=1"
    )
    for item in items:
        if "needs_abort_filtering" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    from outbox.embedded import EmbeddedBroker, EmbeddedPostgres

    pg = None
    broker = None
    try:
        db = os.environ.get("OUTBOX_TEST_DB")
        if db:
            admin_url = make_url(db).set(drivername="postgresql+psycopg", database="postgres")
            admin = admin_url.render_as_string(hide_password=False)
        else:
            pg = EmbeddedPostgres(database="postgres").start()
            admin = pg.sqlalchemy_url
        bootstrap = os.environ.get("OUTBOX_TEST_BOOTSTRAP_SERVERS")
        if not bootstrap:
            broker = EmbeddedBroker().start()
            bootstrap = broker.bootstrap_servers
        filters = os.environ.get("OUTBOX_TEST_BROKER_FILTERS_ABORTS") == "1"
        yield Services(admin, bootstrap, filters, pg)
    finally:
        if broker is not None:
            broker.stop()
        if pg is not None:
            pg.stop()


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def template_db(services: Services) -> str:
    """A migrated database that every test clones (CREATE DATABASE ... TEMPLATE)."""
    name = f"outbox_template_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(_libpq(services.admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(services.admin_url).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    return name


def create_database(services: Services, prefix: str, template: str | None = None) -> str:
    """SQLAlchemy URL of a new database (a copy of ``template`` if given)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    with psycopg.connect(_libpq(services.admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{clause}')
    return make_url(services.admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(services: Services, url: str) -> None:
    with psycopg.connect(_libpq(services.admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')


@pytest.fixture
def database_url(services: Services, template_db: str) -> Iterator[str]:
    """SQLAlchemy URL of a fresh, migrated database for this test."""
    url = create_database(services, "outbox_test", template_db)
    # A copy would share the template's identity; each test's outbox is one of its own,
    # as if migrated afresh (I9).
    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        conn.execute("UPDATE outbox_identity SET outbox_id = gen_random_uuid()")
    yield url
    drop_database(services, url)


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = create_engine(database_url)
    yield eng
    eng.dispose()


@pytest.fixture
def bootstrap_servers(services: Services) -> str:
    return services.bootstrap_servers


@pytest.fixture
def topic() -> str:
    """A topic no other test uses (the broker lives for the whole session)."""
    return f"test.{uuid.uuid4().hex[:12]}"


@pytest.fixture
def kafka(bootstrap_servers: str) -> Iterator[KafkaReader]:
    reader = KafkaReader(bootstrap_servers)
    yield reader
    reader.close()


class RelayHandle:
    """A relay running in a thread of the test process."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            self.relay.run()
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.relay.stop.set()
        self.thread.join(60)
        assert not self.thread.is_alive(), "relay did not stop within 60 s"
        if self.error is not None:
            raise self.error


@pytest.fixture
def relay_config(database_url: str, bootstrap_servers: str) -> Callable[..., RelayConfig]:
    def make(**overrides: Any) -> RelayConfig:
        fields: dict[str, Any] = {
            "dsn": database_url,
            "bootstrap_servers": bootstrap_servers,
            "slots": 2,
            "poll_interval": 0.2,
            "transactional_id_prefix": f"test-{uuid.uuid4().hex[:8]}",
            "producer_overrides": {"request.timeout.ms": "40000"},
        }
        fields.update(overrides)
        return RelayConfig(**fields)

    return make


@pytest.fixture
def start_relay(relay_config: Callable[..., RelayConfig]) -> Iterator[Callable[..., RelayHandle]]:
    handles: list[RelayHandle] = []

    def start(**overrides: Any) -> RelayHandle:
        handle = RelayHandle(Relay(relay_config(**overrides)))
        handle.thread.start()
        handles.append(handle)
        return handle

    yield start
    for h in handles:
        h.relay.stop.set()
    for h in handles:
        h.thread.join(60)


@pytest.fixture
def drain(relay_config: Callable[..., RelayConfig]) -> Callable[..., Relay]:
    """Run a relay with --once semantics in this thread: publish what is pending, return."""

    def run(**overrides: Any) -> Relay:
        relay = Relay(relay_config(once=True, **overrides))
        relay.run()
        return relay

    return run


__all__ = ["RelayHandle", "Services", "create_database", "drop_database", "wait_for"]
