"""Real services for the whole test session: PostgreSQL and a Kafka-protocol broker.

PostgreSQL is started here (embedded, run as an unprivileged user under root). A test that
talks to Kafka runs on a broker its id names (``[tansu]``, ``[kafka]``):

- ``tansu``: the Tansu broker from its wheel, the zero-setup default: every broker test;
- ``kafka``: a 3-node Apache Kafka 4.x KRaft cluster (outbox.embedded.kafka_cluster), wherever
  ``java`` (and, for the first fetch of its jars, ``mvn``) are present; elsewhere those
  runs are skipped, and the reason is printed in the header and the skip summary.

The rule for ``[kafka]``: a test runs there too only where Apache Kafka shows something Tansu
cannot, and says so with a marker: ``needs_abort_filtering`` / ``needs_apache_kafka`` (Kafka
only) or ``both_brokers`` (both): aborted-transaction filtering (no extra copies after a
crash, a fence or a failed batch), auto-create off (a missing topic), broker-side record size
limits, SASL, failover (a node killed), rebalances, LSO and offsets as Kafka reports them.
Every other broker test checks the product's logic, which the broker does not change: it runs on
Tansu only (``OUTBOX_TEST_ALL_BROKERS=1`` or ``OUTBOX_TEST_BROKER=kafka`` runs every one on
Kafka too). A new test that waits for Kafka's behaviour gets ``both_brokers``.

Under pytest-xdist (``python3 dev.py test`` runs ``-n 4 --dist loadgroup``) each worker starts
its own PostgreSQL and Tansu (seconds); the ``[kafka]`` runs are one group (`xdist_group_of`,
`BrokerGroups`), so one worker starts the cluster, runs them one after another (tests that kill
nodes see no other test's traffic) and goes first, since it is the longest unit of work; the
chaos runs on Tansu are another group.

Environment (read here only):

- ``OUTBOX_TEST_BROKER=tansu|kafka``: run on that broker only;
- ``OUTBOX_TEST_DB``: a PostgreSQL URL whose user may CREATE DATABASE;
- ``OUTBOX_TEST_BOOTSTRAP_SERVERS``: a Kafka cluster you run (test id ``[external]``);
  with ``OUTBOX_TEST_BROKER_FILTERS_ABORTS=1`` (or ``OUTBOX_TEST_BROKER=kafka``) it is
  taken to hide aborted transactions from read_committed readers, like Apache Kafka;
- ``OUTBOX_KAFKA_CACHE``: where the Kafka jars are cached (default ~/.cache/kafka-outbox).

Tests marked ``needs_abort_filtering`` run only on such a broker (Apache Kafka: yes; Tansu
shows records of aborted transactions). Each test gets a fresh database cloned from a
migrated template (fast, isolated) and, on brokers that do not auto-create topics, its
``topic`` created with 4 partitions at the cluster's replication factor.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from xdist.scheduler import LoadGroupScheduling

from outbox.embedded.kafka_cluster import create_topic
from outbox.migrate import upgrade
from outbox.relay import Relay, RelayStats, Seams
from outbox.relay.config import RelayConfig
from tests import hypothesis_profiles  # noqa: F401  (registers the profiles)
from tests.scheduling import CACHE_KEY, longest_first, merged, read_committed
from tests.support import InThread, KafkaReader, stop_all, wait_for

BROKERS = ("tansu", "kafka")
TOPIC_PARTITIONS = 4  # what Tansu auto-creates; tests that compute partitions rely on it


@dataclass(frozen=True)
class Services:
    admin_url: str  # SQLAlchemy URL of the maintenance database (postgres)
    pg: Any  # EmbeddedPostgres or None


@dataclass(frozen=True)
class Broker:
    """The broker a test runs on (one per value of the session-scoped ``broker`` param)."""

    name: str  # tansu | kafka | external
    bootstrap_servers: str
    filters_aborts: bool  # read_committed readers never see records of aborted transactions
    auto_creates_topics: bool
    cluster: Any = None  # outbox.embedded.kafka_cluster.KafkaCluster for name == "kafka"
    # Tansu 0.6: with many transactional producers on one partition, its last stable offset
    # can stay below committed transactions for good (tests/support.py, KafkaReader).
    stable_offset_sticks: bool = False


def _kafka_cache() -> Path | None:
    cache = os.environ.get("OUTBOX_KAFKA_CACHE")
    return Path(cache) if cache else None


def _kafka_skip_reason() -> str | None:
    from outbox.embedded.kafka_cluster import kafka_unavailable_reason

    return kafka_unavailable_reason(_kafka_cache())


def _broker_params() -> list[str]:
    if os.environ.get("OUTBOX_TEST_BOOTSTRAP_SERVERS"):
        return ["external"]
    chosen = os.environ.get("OUTBOX_TEST_BROKER")
    if not chosen:
        # Without java/mvn the [kafka] runs are left out, not listed one skip per test:
        # the header and the closing summary say so once.
        return [b for b in BROKERS if b != "kafka" or _kafka_skip_reason() is None]
    if chosen not in BROKERS:
        raise pytest.UsageError(f"OUTBOX_TEST_BROKER={chosen!r}: pick one of {', '.join(BROKERS)}")
    if chosen == "kafka" and (reason := _kafka_skip_reason()):
        raise pytest.UsageError(f"OUTBOX_TEST_BROKER=kafka, but Apache Kafka cannot run: {reason}")
    return [chosen]


_STARTUPS: list[str] = []


def _kafka_left_out() -> str | None:
    """The line saying the Apache Kafka runs are skipped, or None when they run."""
    if "kafka" in _broker_params() or os.environ.get("OUTBOX_TEST_BOOTSTRAP_SERVERS"):
        return None
    if os.environ.get("OUTBOX_TEST_BROKER"):
        return None  # the user picked another broker
    return f"Apache Kafka runs SKIPPED (the broker tests ran on Tansu only): {_kafka_skip_reason()}"


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = [f"brokers: {', '.join(_broker_params())}"]
    if "kafka" in _broker_params() and not os.environ.get("OUTBOX_TEST_BROKER"):
        lines.append(
            "[kafka] runs: only tests marked both_brokers, needs_abort_filtering or "
            "needs_apache_kafka (OUTBOX_TEST_ALL_BROKERS=1: every broker test)"
        )
    if note := _kafka_left_out():
        lines.append(note)
    return lines


def pytest_sessionfinish(session: pytest.Session) -> None:
    """An xdist worker hands its services' start-up lines to the controller, which prints them."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["outbox_startups"] = list(_STARTUPS)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """xdist's controller: collect what a finished worker started (see pytest_sessionfinish)."""
    _STARTUPS.extend(getattr(node, "workeroutput", {}).get("outbox_startups", []))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for line in _STARTUPS:
        terminalreporter.write_line(line)
    if note := _kafka_left_out():
        terminalreporter.write_line(note, yellow=True, bold=True)


BROKER_MARKERS = ("needs_abort_filtering", "needs_apache_kafka", "both_brokers")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Leave out the ``[kafka]`` runs of tests that check nothing broker-specific (decided by
    `runs_on_kafka`) and skip, before any broker starts, the runs a broker cannot give (decided
    by `skip_reason`)."""
    external_filters = _external_filters_aborts()
    every_test_on_kafka = (
        os.environ.get("OUTBOX_TEST_BROKER") == "kafka"
        or os.environ.get("OUTBOX_TEST_ALL_BROKERS") == "1"
    )
    kept: list[pytest.Item] = []
    left_out: list[pytest.Item] = []
    for item in items:
        name = broker_of(item)
        markers = {m for m in BROKER_MARKERS if m in item.keywords}
        if name == "kafka" and not runs_on_kafka(markers, every_test=every_test_on_kafka):
            left_out.append(item)
            continue
        kept.append(item)
        if name is not None and (
            reason := skip_reason(name, markers, external_filters=external_filters)
        ):
            item.add_marker(pytest.mark.skip(reason=reason))
    if left_out:
        config.hook.pytest_deselected(items=left_out)
    items[:] = kept


class _Order:
    """The order of the collection. Under xdist (`BrokerGroups` hands the units out in this
    order): the longest unit of work first (`tests.scheduling.longest_first`), so that no long
    test starts last and runs alone at the end. In one process: the ``[kafka]`` runs first
    (stable), after pytest grouped the tests per broker (one cluster start)."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(
        self, config: pytest.Config, items: list[pytest.Item]
    ) -> None:
        if not hasattr(config, "workerinput"):
            items[:] = sorted(items, key=lambda item: broker_of(item) != "kafka")
            return
        store = getattr(config, "cache", None)  # absent under -p no:cacheprovider
        cache = store.get(CACHE_KEY, {}) if store is not None else {}
        measured = merged(read_committed(), cache if isinstance(cache, dict) else {})
        order = longest_first(
            [item.nodeid for item in items], lambda n: xdist_group_of(n) or n, measured
        )
        items[:] = [items[i] for i in order]


class _Timeline:
    """xdist's controller: each test's seconds (left in pytest's cache for the next run's order)
    and what each worker did, printed at the end: the critical path of the run."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.seconds: dict[str, float] = {}
        self.busy: dict[str, float] = {}
        self.tests: dict[str, int] = {}
        self.done_at: dict[str, float] = {}
        self.last: dict[str, tuple[float, str]] = {}

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        node = getattr(report, "node", None)
        if node is None:
            return
        worker = str(node.gateway.id)
        self.seconds[report.nodeid] = self.seconds.get(report.nodeid, 0.0) + report.duration
        self.busy[worker] = self.busy.get(worker, 0.0) + report.duration
        if report.when == "teardown":
            self.tests[worker] = self.tests.get(worker, 0) + 1
            self.last[worker] = (self.seconds[report.nodeid], report.nodeid)

    @pytest.hookimpl(optionalhook=True)
    def pytest_testnodedown(self, node: Any, error: Any) -> None:
        self.done_at[str(node.gateway.id)] = time.monotonic() - self.started

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        store = getattr(session.config, "cache", None)  # absent under -p no:cacheprovider
        if self.seconds and store is not None:
            previous = store.get(CACHE_KEY, {})
            last_run = merged(previous if isinstance(previous, dict) else {}, self.seconds)
            store.set(CACHE_KEY, {k: round(v, 2) for k, v in last_run.items()})

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        for worker in sorted(self.busy):
            seconds, nodeid = self.last.get(worker, (0.0, "-"))
            terminalreporter.write_line(
                f"xdist {worker}: {self.tests.get(worker, 0)} tests, "
                f"{self.busy[worker]:.0f} s in tests, done {self.done_at.get(worker, 0):.0f} s "
                f"after the start; its last test: {nodeid} ({seconds:.1f} s)"
            )


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(_Order(), "outbox-tests-order")
    if not hasattr(config, "workerinput"):  # acts only on xdist's reports (from a worker)
        config.pluginmanager.register(_Timeline(), "outbox-tests-timeline")


ONE_AT_A_TIME = ("tests/acceptance/test_chaos.py::",)
"""Tests that load both cores (the chaos runs): under xdist they share one worker."""


def xdist_group_of(nodeid: str) -> str | None:
    """The group of tests that must share one xdist worker, from a test's id: its ``[kafka]`` runs
    (one cluster, started once; a test that kills nodes sees no other test's traffic), then the
    tests of `ONE_AT_A_TIME`; None: any worker."""
    if re.search(r"\[kafka[-\]]", nodeid):
        return "kafka"
    if nodeid.startswith(ONE_AT_A_TIME):
        return "one_at_a_time"
    return None


class BrokerGroups(LoadGroupScheduling):  # type: ignore[misc]  # xdist is untyped
    """xdist's ``loadgroup``, the groups decided by `xdist_group_of` (pytest 9 ignores the node
    id suffix xdist 3.8's ``xdist_group`` marker relies on, so the groups are named here)."""

    def _split_scope(self, nodeid: str) -> str:
        return xdist_group_of(nodeid) or nodeid

    def schedule(self) -> None:
        """The units in the collection's order (`_Order`: longest first), not xdist's (most tests
        first)."""
        self.config.option.loadscopereorder = False
        super().schedule()


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup`` (what ``python3 dev.py test`` passes): `BrokerGroups`."""
    if config.getvalue("dist") != "loadgroup":
        return None
    return BrokerGroups(config, log)


def broker_of(item: pytest.Item) -> str | None:
    """The broker a test runs on (its ``broker`` fixture's param), or None (also for a test that
    parametrizes an argument of its own named ``broker``)."""
    callspec = getattr(item, "callspec", None)
    name = callspec.params.get("broker") if callspec is not None else None
    for mark in item.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", ())
        if "broker" in ([n.strip() for n in names.split(",")] if isinstance(names, str) else names):
            return None
    return name if isinstance(name, str) else None


def runs_on_kafka(markers: set[str], *, every_test: bool) -> bool:
    """Whether a test's ``[kafka]`` run is kept: only where Apache Kafka shows something Tansu
    cannot (a marker of `BROKER_MARKERS`), unless every test is asked for on Kafka
    (``OUTBOX_TEST_BROKER=kafka``, ``OUTBOX_TEST_ALL_BROKERS=1``)."""
    return every_test or bool(markers & set(BROKER_MARKERS))


def skip_reason(broker: str, markers: set[str], *, external_filters: bool) -> str | None:
    """Why a test with these markers cannot run on this broker, or None."""
    if "needs_apache_kafka" in markers and broker != "kafka":
        return "needs the Apache Kafka test cluster (outbox.embedded.kafka_cluster)"
    filters = broker == "kafka" or (broker == "external" and external_filters)
    if "needs_abort_filtering" in markers and not filters:
        return (
            "Tansu shows records of aborted transactions to read_committed consumers; "
            "this test runs on Apache Kafka"
        )
    return None


def _external_filters_aborts() -> bool:
    return (
        os.environ.get("OUTBOX_TEST_BROKER_FILTERS_ABORTS") == "1"
        or os.environ.get("OUTBOX_TEST_BROKER") == "kafka"
    )


@pytest.fixture(scope="session")
def services() -> Iterator[Services]:
    """PostgreSQL for the session (no broker: tests that need none are not run per broker)."""
    from outbox.embedded import EmbeddedPostgres

    db = os.environ.get("OUTBOX_TEST_DB")
    if db:
        admin_url = make_url(db).set(drivername="postgresql+psycopg", database="postgres")
        yield Services(admin_url.render_as_string(hide_password=False), None)
        return
    pg = EmbeddedPostgres(database="postgres").start()
    try:
        yield Services(pg.sqlalchemy_url, pg)
    finally:
        pg.stop()


@pytest.fixture(scope="session", params=_broker_params())
def broker(request: pytest.FixtureRequest) -> Iterator[Broker]:
    """The session's broker; pytest groups the tests per broker, so one runs at a time."""
    name: str = request.param
    if name == "external":
        yield Broker(
            name,
            os.environ["OUTBOX_TEST_BOOTSTRAP_SERVERS"],
            filters_aborts=_external_filters_aborts(),
            auto_creates_topics=False,
        )
        return
    if name == "tansu":
        from outbox.embedded import EmbeddedBroker

        with EmbeddedBroker() as tansu:
            yield Broker(name, tansu.bootstrap_servers, False, True, stable_offset_sticks=True)
        return
    from outbox.embedded.kafka_cluster import (
        TEST_JVM_OPTIONS,
        KafkaCluster,
        KafkaUnavailableError,
    )

    if reason := _kafka_skip_reason():
        pytest.skip(f"Apache Kafka runs skipped: {reason}")
    try:
        cluster = KafkaCluster(cache_dir=_kafka_cache(), jvm_options=TEST_JVM_OPTIONS).start()
    except KafkaUnavailableError as exc:  # Maven Central unreachable, JVM unusable
        pytest.skip(f"Apache Kafka runs skipped: {exc}")
    _STARTUPS.append(
        f"Apache Kafka {cluster.version}: {cluster.node_count}-node KRaft cluster started "
        f"in {cluster.startup_seconds:.1f}s"
    )
    try:
        yield Broker(name, cluster.bootstrap_servers, True, False, cluster)
    finally:
        cluster.close()


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


def create_database(
    services: Services, prefix: str, template: str | None = None, *, encoding: str | None = None
) -> str:
    """SQLAlchemy URL of a new database (a copy of ``template`` if given; of this server
    ``encoding``, with the C locale, if given)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    if encoding:
        clause = f" ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
    with psycopg.connect(_libpq(services.admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{clause}')
    return make_url(services.admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(services: Services, url: str) -> None:
    with psycopg.connect(_libpq(services.admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{make_url(url).database}" WITH (FORCE)')


def own_outbox(services: Services, template_db: str, prefix: str) -> Iterator[str]:
    """SQLAlchemy URL of a fresh, migrated database, an outbox of its own, dropped after."""
    url = create_database(services, prefix, template_db)
    # A copy would share the template's identity; each test's outbox is one of its own,
    # as if migrated afresh (I9).
    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        conn.execute("UPDATE outbox_identity SET outbox_id = gen_random_uuid()")
    yield url
    drop_database(services, url)


@pytest.fixture
def database_url(services: Services, template_db: str) -> Iterator[str]:
    """SQLAlchemy URL of a fresh, migrated database for this test."""
    yield from own_outbox(services, template_db, "outbox_test")


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    eng = create_engine(database_url)
    yield eng
    eng.dispose()


@pytest.fixture
def effects(engine: Engine) -> Engine:
    """The test's database with an ``effects`` table, where test handlers record each record
    they applied (by its position), so a test can count effects."""
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE effects (position text NOT NULL)"))
    return engine


@pytest.fixture
def bootstrap_servers(broker: Broker) -> str:
    return broker.bootstrap_servers


@pytest.fixture
def make_topic(broker: Broker) -> Callable[..., str]:
    """Create a topic on brokers that do not auto-create them (a no-op name on Tansu)."""

    def make(
        name: str | None = None,
        partitions: int = TOPIC_PARTITIONS,
        config: dict[str, str] | None = None,
    ) -> str:
        name = name or f"test.{uuid.uuid4().hex[:12]}"
        if broker.auto_creates_topics and not config:
            return name
        return create_topic(broker.bootstrap_servers, name, partitions, config)

    return make


@pytest.fixture
def topic(make_topic: Callable[..., str]) -> str:
    """A topic no other test uses (the broker lives for the whole session)."""
    return make_topic()


@pytest.fixture
def kafka(broker: Broker) -> Iterator[KafkaReader]:
    reader = KafkaReader(broker.bootstrap_servers, stable_offset_sticks=broker.stable_offset_sticks)
    yield reader
    reader.close()


class RelayHandle(InThread[RelayStats]):
    """A relay running in a thread of the test process (``thread.start()`` or ``with``)."""

    def __init__(self, relay: Relay) -> None:
        super().__init__(relay, what="relay")
        self.relay = relay


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

    def start(*, seams: Seams | None = None, **overrides: Any) -> RelayHandle:
        handle = RelayHandle(Relay(relay_config(**overrides), seams=seams))
        handle.thread.start()
        handles.append(handle)
        return handle

    yield start
    stop_all(handles)


@pytest.fixture
def drain(relay_config: Callable[..., RelayConfig]) -> Callable[..., Relay]:
    """Run a relay with --once semantics in this thread: publish what is pending, return."""

    def run(*, seams: Seams | None = None, **overrides: Any) -> Relay:
        relay = Relay(relay_config(once=True, **overrides), seams=seams)
        relay.run()
        return relay

    return run


__all__ = ["Broker", "RelayHandle", "Services", "create_database", "drop_database", "wait_for"]


@pytest.fixture
def unmigrated_database_url(services: Services) -> Iterator[str]:
    """SQLAlchemy URL of a fresh database nobody ran ``outbox migrate`` on."""
    url = create_database(services, "outbox_bare")
    yield url
    drop_database(services, url)
