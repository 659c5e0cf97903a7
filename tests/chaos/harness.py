"""The chaos run: real services, real ``outbox`` processes, a seeded fault injector, a verdict.

Layout of one run (``run_chaos``):

- PostgreSQL (``EmbeddedPostgres`` with ``synchronous_commit=on`` and
  ``fsync=on``, what users run when they care about loss, so an immediate
  restart never loses an acknowledged commit) and the Tansu broker, which
  advertises a ``TcpProxy``: every Kafka connection of every client, bootstrap
  and broker alike, goes through the proxy, so cutting it cuts them all.
- Application writers (threads here) insert a ``chaos_orders`` row and
  ``publish()`` its event in ONE transaction; some roll back on purpose. Each
  writer owns its keys and numbers their events, so per-key order is defined.
- ``outbox relay`` and ``outbox consume tests.chaos.projector:ChaosProjector``
  run as subprocesses, as in production, with default relay settings.
- Two outboxes (``OutboxSpec``): two services, each with its own database,
  topic, writers, relays and consumers, on the same broker with default
  settings, the most common production layout. Loss is counted per outbox.
- The main thread plays the fault schedule (``faults.schedule(seed)``): SIGKILL
  a relay or a consumer and start a replacement, restart PostgreSQL
  (immediate), cut the broker link for a few seconds.
- Then nothing fails any more: the run waits (on a condition, with a
  deadline) until the outbox is empty and every committed event has an effect,
  stops every process with SIGTERM, reads every topic back to the end of each
  partition with an independent client and hands everything to ``checker.check``.
- The run then asserts that the faults struck what they aim at: at least one
  relay recovery from the marker, one redelivery skipped by a consumer's dedup
  table, one relay killed with a batch in flight.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import Engine, create_engine, text
from sqlalchemy import exc as sa_exc

from outbox import publish
from outbox.embedded import EmbeddedBroker, EmbeddedPostgres, EmbeddedServiceError, free_port
from outbox.embedded.kafka_cluster import TEST_JVM_OPTIONS, KafkaCluster, create_topic
from outbox.migrate import upgrade
from tests.chaos.checker import (
    Effect,
    Observations,
    Report,
    TopicRecord,
    Written,
    check,
    cross_check,
)
from tests.chaos.faults import (
    Action,
    Aim,
    Aims,
    Fault,
    FaultKind,
    Rates,
    Step,
    actions,
    aim_failures,
    aims_of,
    count_by_kind,
    reaim,
    schedule,
    unstruck,
)
from tests.chaos.projector import FAULTS_OVER, OFFSET_COMMIT_DELAY_ENV, TABLES, WINDOW_DIR_ENV
from tests.support import TcpProxy, TopicReadError, read_topic

log = logging.getLogger("chaos")

REPO = Path(__file__).resolve().parents[2]
PARTITIONS = 4
SLOTS = 4

RELAY_PRODUCER_SETTINGS = {
    # Short enough that a cut link or a dead broker connection is noticed in seconds,
    # within the rules the relay enforces (delivery <= transaction timeout, etc.).
    "request.timeout.ms": "5000",
    "transaction.timeout.ms": "30000",
    "reconnect.backoff.max.ms": "1000",
}

AT_LEAST_ONCE_SETTINGS = {"message.timeout.ms": "8000"}
"""With ``--guarantee at-least-once``: records expire 8 s after they were produced, so an
outage longer than that makes deliveries fail (the relay must keep those rows)."""

MISSING_TOPIC_TIMEOUT = 5.0
"""``--missing-topic-timeout`` when writers publish to a topic that does not exist."""

MISSING_TOPIC_SETTINGS = {"topic.metadata.propagation.max.ms": "1000"}
"""librdkafka reports an unknown topic after 1 s instead of 30 s."""


@dataclass(frozen=True, slots=True)
class ChaosConfig:
    """The size of a run; ``seed`` alone decides the fault schedule and the writers' choices."""

    seed: int
    events: int = 1500
    seconds: float = 30.0
    relays: int = 3
    consumers: int = 2
    writers: int = 4
    keys_per_writer: int = 8
    max_events_per_transaction: int = 3
    rollback_ratio: float = 0.1
    settle_timeout: float = 120.0
    stop_timeout: float = 30.0
    log_dir: Path | None = None
    keep_logs: bool = False
    offset_commit_delay: float = 0.3
    """Seconds each consumer waits between a batch's DB commit and its offset commit, so
    that consumer kills land in that window and the dedup path is exercised."""
    relay_commit_delay: float = 0.1
    """Seconds each relay batch's DB commit takes on purpose (a deferred trigger on
    ``outbox_events``): the window between the Kafka commit and the DB commit, where a
    relay kill leaves rows that only the recovery marker may delete."""
    second_outbox: bool = True
    """A second service (database, topic, writers, relays, consumers) on the same broker,
    both with default relay settings: loss is counted per outbox (I9)."""
    strict: bool = False
    """Also fail on processes that crashed and on tracebacks in their logs."""
    broker: str = "tansu"
    """``tansu`` (behind a proxy; the broker fault cuts it) or ``kafka`` (the 3-node Apache
    Kafka cluster; the broker fault SIGKILLs a node, and the topic must hold no duplicate)."""
    rates: Rates = field(default_factory=Rates)
    guarantee: str = "exactly-once"
    """The relays' ``--guarantee``: ``exactly-once`` or ``at-least-once`` (Tansu only; then
    records expire after ``AT_LEAST_ONCE_SETTINGS``, and the marker recovery is not there)."""
    missing_topic_share: float = 0.0
    """Share of events the writers publish to a topic that does not exist (Apache Kafka only,
    where auto-create is off): they must all end, alone, in ``outbox_dead_events``."""
    aim_extension: float = 30.0
    """Seconds after the schedule during which a fault kind that has not struck yet (a kill that
    found no batch in flight on a busy machine) is aimed again, with writers topping up the
    traffic; a kind that struck in the schedule costs nothing here."""

    def __post_init__(self) -> None:
        if self.guarantee not in ("exactly-once", "at-least-once"):
            raise ValueError(f"--guarantee={self.guarantee}: exactly-once or at-least-once")
        if self.guarantee == "at-least-once" and self.broker != "tansu":
            raise ValueError("--guarantee at-least-once runs on --broker tansu only")
        if self.rates.outage_seconds and self.broker != "tansu":
            raise ValueError("--outage runs on --broker tansu (a cut of every connection)")
        if self.rates.outage_seconds >= self.seconds * 0.7:
            raise ValueError("--outage must be shorter than 70 % of --seconds")
        if not 0 <= self.missing_topic_share < 1:
            raise ValueError("--missing-topic-share must be in [0, 1)")
        if self.missing_topic_share and self.broker != "kafka":
            raise ValueError("--missing-topic-share needs --broker kafka (Tansu auto-creates)")
        if self.aim_extension < 0:
            raise ValueError("--aim-extension must not be negative")
        if self.events < 1 or self.seconds <= 0:
            raise ValueError("--events and --seconds must be positive")
        if not 1 <= self.relays <= SLOTS:
            raise ValueError(f"--relays must be between 1 and {SLOTS} (the slot count)")
        if not 1 <= self.consumers <= PARTITIONS:
            raise ValueError(f"--consumers must be between 1 and {PARTITIONS} (the partitions)")
        if self.writers < 1 or self.keys_per_writer < 1:
            raise ValueError("--writers and keys per writer must be at least 1")

    @property
    def topic(self) -> str:
        return f"chaos.orders.{self.seed}"

    @property
    def at_least_once(self) -> bool:
        return self.guarantee == "at-least-once"

    def outboxes(self) -> list[OutboxSpec]:
        """The services of the run: ``a`` at full size, ``b`` (if on) a third of it."""
        specs = [
            OutboxSpec(
                "a", "chaos", self.topic, self.events, self.relays, self.consumers, self.writers
            )
        ]
        if self.second_outbox:
            specs.append(
                OutboxSpec(
                    "b",
                    "chaos_b",
                    f"chaos.orders-b.{self.seed}",
                    max(1, self.events // 3),
                    max(1, self.relays - 1),
                    1,
                    max(1, self.writers // 2),
                )
            )
        return specs


@dataclass(frozen=True, slots=True)
class OutboxSpec:
    """One service of the run: its own database and topic; relays with default settings."""

    name: str
    database: str
    topic: str
    events: int
    relays: int
    consumers: int
    writers: int


# --------------------------------------------------------------------------- writers


class Outcome(Enum):
    COMMITTED = "committed"
    ROLLED_BACK = "rolled back"
    FAILED = "failed before commit"
    AMBIGUOUS = "commit outcome unknown"


@dataclass
class Ledger:
    """What the writers believe happened; the database read afterwards is the truth."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    attempted: int = 0
    by_outcome: dict[Outcome, set[str]] = field(
        default_factory=lambda: {outcome: set() for outcome in Outcome}
    )
    errors: list[str] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)
    """Events of transactions that failed or whose commit was cut, by error class."""
    to_missing_topic: dict[Outcome, set[str]] = field(
        default_factory=lambda: {outcome: set() for outcome in Outcome}
    )
    """Events published to the missing topic (no business row), by their transaction's outcome."""

    def record(
        self,
        ids: list[str],
        outcome: Outcome,
        reason: str | None = None,
        missing: list[str] | None = None,
    ) -> None:
        with self.lock:
            self.attempted += len(ids)
            self.by_outcome[outcome].update(ids)
            self.to_missing_topic[outcome].update(missing or ())
            if reason is not None:
                self.reasons[reason] += len(ids)


_INSERT_ORDER = text("INSERT INTO chaos_orders (event_id, key, seq) VALUES (:event_id, :key, :seq)")


CONNECTION_LOST = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.PendingRollbackError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)
"""What a PostgreSQL restart does to a writer: its connection dies. Any other database error
(an integrity error, a deadlock, an SQL error from ``publish()``) is a bug, not a fault."""


class WriteError(Exception):
    """A transaction failed for another reason than a lost connection."""


def write_transaction(
    engine: Engine,
    topic: str,
    batch: list[tuple[uuid.UUID, str, int]],
    rollback: bool,
    missing: Sequence[uuid.UUID] = (),
) -> tuple[Outcome, str | None]:
    """One application transaction: business rows and their events, committed or rolled back.

    A lost connection before the commit was sent means nothing committed; one during the
    commit (PostgreSQL restarted under it) leaves the outcome unknown until the database is
    read back. Either way the reason (the error class) comes back with the outcome. Any
    other database error raises ``WriteError``: the run fails on it. ``missing``: events
    published, in the same transaction, to ``missing_topic(topic)``, with no business row.
    """
    committing = False
    try:
        with engine.connect() as conn:
            tx = conn.begin()
            for event_id, key, seq in batch:
                conn.execute(_INSERT_ORDER, {"event_id": event_id, "key": key, "seq": seq})
                value = {"key": key, "seq": seq}
                publish(conn, topic=topic, key=key, value=value, event_id=event_id)
            for event_id in missing:
                publish(conn, topic=missing_topic(topic), key="m", value={}, event_id=event_id)
            if rollback:
                tx.rollback()
                return Outcome.ROLLED_BACK, None
            committing = True
            tx.commit()
            return Outcome.COMMITTED, None
    except CONNECTION_LOST as exc:
        if rollback:
            return Outcome.ROLLED_BACK, None
        cause = getattr(exc, "orig", None) or exc
        return (Outcome.AMBIGUOUS if committing else Outcome.FAILED), type(cause).__name__
    except (sa_exc.DBAPIError, sa_exc.InvalidRequestError, psycopg.Error) as exc:
        raise WriteError(f"{type(exc).__name__}: {str(exc).splitlines()[0]}") from exc


def missing_topic(topic: str) -> str:
    """The topic nobody creates, of the outbox whose topic is ``topic``."""
    return f"{topic}.missing"


class Writer(threading.Thread):
    """An application thread: owns its keys, numbers their events, paces itself over the run."""

    def __init__(
        self,
        index: int,
        config: ChaosConfig,
        spec: OutboxSpec,
        engine: Engine,
        ledger: Ledger,
        quota: int,
        pace_seconds: float,
        stop: threading.Event,
    ) -> None:
        super().__init__(name=f"chaos-writer-{spec.name}{index}", daemon=True)
        self.config = config
        self.spec = spec
        self.engine = engine
        self.ledger = ledger
        self.quota = quota
        self.pace_seconds = pace_seconds
        self.stop = stop
        self.rng = random.Random(f"{config.seed}-writer-{spec.name}-{index}")
        self.keys = [f"w{index}-k{j}" for j in range(config.keys_per_writer)]
        self.next_seq = dict.fromkeys(self.keys, 0)

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # a bug in the harness: make it visible in the verdict
            log.exception("%s crashed", self.name)
            with self.ledger.lock:
                self.ledger.errors.append(f"{self.name}: {type(exc).__name__}: {exc}")

    def _run(self) -> None:
        started = time.monotonic()
        written = 0
        while written < self.quota and not self.stop.is_set():
            due = started + self.pace_seconds * written / self.quota
            if self.stop.wait(max(0.0, due - time.monotonic())):
                return  # pacing of the workload, not synchronisation
            size = self.rng.randint(1, self.config.max_events_per_transaction)
            n = min(size, self.quota - written)
            batch = []
            for _ in range(n):
                key = self.rng.choice(self.keys)
                self.next_seq[key] += 1  # numbers are never reused, whatever the outcome
                batch.append((uuid.uuid4(), key, self.next_seq[key]))
            rollback = self.rng.random() < self.config.rollback_ratio
            ids = [str(e) for e, _, _ in batch]
            share = self.config.missing_topic_share
            missing = [uuid.uuid4() for _ in batch if share and self.rng.random() < share]
            try:
                outcome, reason = write_transaction(
                    self.engine, self.spec.topic, batch, rollback, missing
                )
            except WriteError as exc:  # not a fault: fail the run, keep writing
                with self.ledger.lock:
                    self.ledger.errors.append(f"{self.name}: {exc}")
                outcome, reason = Outcome.FAILED, "WriteError"
            self.ledger.record(ids, outcome, reason, [str(e) for e in missing])
            written += n
            if outcome in (Outcome.FAILED, Outcome.AMBIGUOUS):
                self._wait_for_database()

    def _wait_for_database(self) -> None:
        """The database is restarting: wait until it answers again before the next transaction,
        so only transactions really cut by the restart are left out of the check, not every
        attempt made while the server was down."""
        while not self.stop.is_set():
            try:
                with self.engine.connect() as conn:
                    conn.execute(text("SELECT 1"))
                return
            except CONNECTION_LOST:
                self.stop.wait(0.2)  # backing off while the server is down


# --------------------------------------------------------------------------- processes


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn that SIGKILLs the child when this process dies (Linux), so nothing leaks."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)  # looked up here: nothing to load after fork
    prctl = libc.prctl
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGKILL)

    return preexec


_PREEXEC = _parent_death_signal()


@dataclass
class Member:
    role: str
    index: int
    generation: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    killed: bool = False
    started_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class Exit:
    """A process that exited although nobody killed or stopped it."""

    role: str
    index: int
    generation: int
    returncode: int
    log_path: str
    tail: str
    refused_start_during_db_restart: bool = False
    """It exited with "cannot connect to PostgreSQL" after a PostgreSQL restart began during
    its start-up: the CLI refuses to start without a database, as documented, and the harness
    restarts it as an init system would. Not a crash, even with --strict."""


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Fleet:
    """N interchangeable processes of one role: killed on purpose, restarted when they crash.

    Processes must be started from the thread that outlives them (the main
    thread): the parent-death signal fires when the *thread* that forked exits.
    """

    def __init__(
        self,
        role: str,
        count: int,
        command: list[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.role = role
        self.command = command
        self.env = {**os.environ, **(env or {})}
        self.log_dir = log_dir
        self.members: list[Member | None] = [None] * count
        self.generations = 0
        self.exits: list[Exit] = []
        self.unclean_stops: list[str] = []
        self._last_restart = [0.0] * count
        self.db_restarts: list[float] = []
        """Monotonic times of PostgreSQL restarts (shared by every fleet of a run)."""

    def start(self, index: int) -> bool:
        member = self.members[index]
        if member is not None and member.proc.poll() is None:
            return False
        self.generations += 1
        log_path = self.log_dir / f"{self.role}-{index}-{self.generations}.log"
        with log_path.open("wb") as out:
            proc = subprocess.Popen(
                self.command,
                cwd=REPO,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C reaches the harness, which stops them
                preexec_fn=_PREEXEC,  # noqa: PLW1509 - only calls prctl, preloaded
            )
        self.members[index] = Member(self.role, index, self.generations, proc, log_path)
        self._last_restart[index] = time.monotonic()
        return True

    def kill(self, index: int) -> bool:
        member = self.members[index]
        if member is None or member.proc.poll() is not None:
            return False
        member.killed = True
        member.proc.send_signal(signal.SIGKILL)
        member.proc.wait(10)
        return True

    def supervise(self, *, restart: bool) -> None:
        """Record processes that died on their own; restart them, as an init system would."""
        now = time.monotonic()
        for index, member in enumerate(self.members):
            if member is None or member.killed or member.proc.poll() is None:
                continue
            if not any(e.generation == member.generation for e in self.exits):
                tail = _tail(member.log_path)
                exit_ = Exit(
                    self.role,
                    index,
                    member.generation,
                    int(member.proc.returncode),
                    str(member.log_path),
                    tail,
                    member.proc.returncode > 0
                    and "cannot connect to PostgreSQL" in tail
                    and any(t >= member.started_at for t in self.db_restarts),
                )
                self.exits.append(exit_)
                log.warning(
                    "%s %d exited on its own (code %d); log %s:\n%s",
                    self.role,
                    index,
                    exit_.returncode,
                    exit_.log_path,
                    exit_.tail,
                )
            if restart and now - self._last_restart[index] >= 1.0:
                self.start(index)

    def alive(self) -> int:
        return sum(1 for m in self.members if m is not None and m.proc.poll() is None)

    def pid(self, index: int) -> str:
        member = self.members[index]
        return str(member.proc.pid) if member is not None else ""

    def stop(self, timeout: float) -> None:
        """SIGTERM all, wait; a process still running after ``timeout`` is a hang: SIGKILL it.

        A process started a moment ago (by the supervision of the settle phase) may not have
        installed its SIGTERM handler yet and would die of the signal: first wait, within
        ``timeout``, until each has written its first log line.
        """
        deadline = time.monotonic() + timeout
        for m in self.members:
            while (
                m is not None
                and m.proc.poll() is None
                and m.log_path.stat().st_size == 0
                and time.monotonic() < deadline
            ):
                time.sleep(0.1)  # polling for the process to be up, bounded by ``timeout``
        running = [m for m in self.members if m is not None and m.proc.poll() is None]
        for m in running:
            m.killed = True  # stopping on purpose
            m.proc.send_signal(signal.SIGCONT)  # a frozen relay handles SIGTERM only once woken
            m.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for m in running:
            try:
                m.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.unclean_stops.append(f"{self.role} {m.index} ({m.log_path})")
                log.error("%s %d did not stop within %.0fs of SIGTERM", self.role, m.index, timeout)
                m.proc.kill()
                m.proc.wait(10)
            else:
                if m.proc.returncode != 0:
                    self.unclean_stops.append(
                        f"{self.role} {m.index} exited {m.proc.returncode} on SIGTERM "
                        f"({m.log_path})"
                    )

    def kill_all(self) -> None:
        for m in self.members:
            if m is not None and m.proc.poll() is None:
                m.killed = True
                m.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    m.proc.wait(10)


# --------------------------------------------------------------------------- services


@dataclass
class Services:
    """PostgreSQL and the broker, with the broker fault the run's broker allows.

    On Tansu the fault cuts the proxy every client goes through; on the 3-node Apache Kafka
    cluster it SIGKILLs one node (a different one each time, its partition leaders move to the
    other two) and starts it again at the restore.
    """

    pg: EmbeddedPostgres
    bootstrap: str
    filters_aborts: bool  # read_committed readers never see records of aborted transactions
    proxy: TcpProxy | None = None
    cluster: KafkaCluster | None = None
    _cuts: int = 0
    _down: int | None = None

    def cut_broker(self) -> None:
        if self.proxy is not None:
            self.proxy.cut()
        elif self.cluster is not None and self._down is None:
            self._down = self.cluster.node_ids[self._cuts % self.cluster.node_count]
            self._cuts += 1
            self.cluster.kill_node(self._down)

    def restore_broker(self, *, wait: bool = False) -> None:
        if self.proxy is not None:
            self.proxy.restore()
        elif self.cluster is not None:
            if self._down is not None:
                self.cluster.start_node(self._down, wait=wait)
                self._down = None
            if wait:
                self.cluster.start_all()  # every node back as a live broker


BROKERS = ("tansu", "kafka")


DURABLE_SETTINGS = {"synchronous_commit": "on", "fsync": "on"}
"""What users run when they care about loss (the embedded server's defaults are off, for speed):
with ``synchronous_commit=off`` an immediate restart can lose acknowledged commits, and the run
would report the test server's losses, not the library's."""


@contextlib.contextmanager
def services(
    log_dir: Path, broker: str = "tansu", cluster: KafkaCluster | None = None
) -> Iterator[Services]:
    """PostgreSQL and the broker: Tansu behind a proxy that every Kafka client goes through,
    or the 3-node Apache Kafka cluster of outbox.embedded.kafka_cluster (``cluster``, a running one
    lent by the caller and left running, or one started here).

    Both servers' logs end up in ``log_dir`` next to the processes' logs.
    """
    if broker not in BROKERS:
        raise ValueError(f"broker={broker!r}: pick one of {', '.join(BROKERS)}")
    pg = EmbeddedPostgres(database="chaos", extra_settings=DURABLE_SETTINGS)
    tansu: EmbeddedBroker | None = None
    proxy: TcpProxy | None = None
    owned: KafkaCluster | None = None
    try:
        pg.start()
        if broker == "kafka":
            if cluster is None:
                cluster = owned = KafkaCluster(jvm_options=TEST_JVM_OPTIONS).start()
            try:
                yield Services(pg, cluster.bootstrap_servers, True, cluster=cluster)
            finally:
                if len(cluster.running_nodes()) < cluster.node_count:
                    cluster.start_all()
            return
        for attempt in range(3):
            broker_port, proxy_port = free_port(), free_port()
            try:
                proxy = TcpProxy(broker_port, proxy_port)
            except OSError:
                if attempt == 2:
                    raise
                continue
            tansu = EmbeddedBroker(
                port=broker_port, advertised_port=proxy_port, log_path=log_dir / "tansu.log"
            )
            tansu.start()
            break
        assert tansu is not None
        assert proxy is not None
        yield Services(pg, tansu.bootstrap_servers, False, proxy=proxy)  # the proxy's address
    finally:
        if proxy is not None:
            proxy.close()
        if tansu is not None:
            tansu.stop()
        if cluster is not None:
            for node in cluster.node_ids:
                with contextlib.suppress(OSError):
                    shutil.copyfile(cluster.log_path(node), log_dir / f"kafka-{node}.log")
        if owned is not None:
            owned.close()
        with contextlib.suppress(OSError, EmbeddedServiceError):
            shutil.copyfile(pg.log_path, log_dir / "postgresql.log")
        pg.stop()


SLOW_COMMIT_SQL = """
CREATE TABLE IF NOT EXISTS chaos_commit_window (seconds float8 NOT NULL);
CREATE OR REPLACE FUNCTION chaos_slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('chaos.slowed', true) IS DISTINCT FROM 'yes' THEN
        PERFORM set_config('chaos.slowed', 'yes', true);
        PERFORM pg_sleep(coalesce(
            (SELECT max(seconds) FROM chaos_commit_window),
            current_setting('chaos.relay_commit_delay')::float));
    END IF;
    RETURN NULL;
END $$;
DROP TRIGGER IF EXISTS chaos_slow_commit ON outbox_events;
CREATE CONSTRAINT TRIGGER chaos_slow_commit AFTER DELETE ON outbox_events
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION chaos_slow_commit();
"""
"""Each transaction that deletes outbox rows (a relay's batch, after its Kafka commit) sleeps
once at its DB commit: a relay killed in that window leaves published rows in the outbox, and
only the recovery marker stands between them and a second publication. A row in
``chaos_commit_window`` overrides the delay while it is there (``Run._extend``)."""

WIDE_COMMIT_WINDOW = 1.0
"""The commit window while a relay kill is aimed again (seconds, below the relays' 3 s
takeover): on a busy machine the harness's 10 ms poll can miss a 0.1 s window every time."""


def _dsn(svc: Services, spec: OutboxSpec) -> str:
    return svc.pg.dsn_for(spec.database)


def _url(svc: Services, spec: OutboxSpec) -> str:
    return "postgresql+psycopg" + _dsn(svc, spec).removeprefix("postgresql")


def _prepare(svc: Services, spec: OutboxSpec, relay_commit_delay: float) -> None:
    if spec.database != svc.pg.database:
        with psycopg.connect(svc.pg.dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{spec.database}"')
    upgrade(_url(svc, spec))
    with psycopg.connect(_dsn(svc, spec), autocommit=True) as conn:
        conn.execute(TABLES)  # a constant holding several statements
        conn.execute(SLOW_COMMIT_SQL)
        conn.execute(
            f'ALTER DATABASE "{spec.database}" SET chaos.relay_commit_delay = '
            f"'{float(relay_commit_delay)}'"
        )
        # A backend notices within 10 ms that its client died, even while it sleeps in the
        # commit trigger: the kill then aborts the DB transaction, as a relay that died before
        # sending COMMIT would. Without it PostgreSQL finishes a COMMIT already sent.
        conn.execute(f'ALTER DATABASE "{spec.database}" SET client_connection_check_interval = 10')
    create_topic(svc.bootstrap, spec.topic, PARTITIONS)
    if svc.cluster is not None:  # Apache Kafka creates no topic on first use
        create_topic(svc.bootstrap, f"{spec.topic}.DLT", PARTITIONS)


def relay_command(svc: Services, spec: OutboxSpec, config: ChaosConfig) -> list[str]:
    """``outbox relay`` with default settings (no transactional-id prefix, default state topic),
    as two services deployed side by side would run it; the run's guarantee, and a short
    delivery timeout in at-least-once and missing-topic timeout with a missing topic."""
    extra: list[str] = ["--guarantee", config.guarantee]
    producer = dict(RELAY_PRODUCER_SETTINGS)
    if config.at_least_once:
        producer |= AT_LEAST_ONCE_SETTINGS
    if config.missing_topic_share:
        producer |= MISSING_TOPIC_SETTINGS
        extra += ["--missing-topic-timeout", str(MISSING_TOPIC_TIMEOUT)]
    settings = [arg for k, v in producer.items() for arg in ("-X", f"{k}={v}")]
    return [
        sys.executable,
        "-m",
        "outbox.cli",
        "relay",
        "--db",
        _url(svc, spec),
        "-b",
        svc.bootstrap,
        "--slots",
        str(SLOTS),
        "--batch-size",
        "100",
        "--poll-interval",
        "0.5",
        "--takeover-timeout",
        f"{TAKEOVER_SECONDS:g}",
        *settings,
        *extra,
        "--log-level",
        "DEBUG",
    ]


def consumer_command(svc: Services, config: ChaosConfig, spec: OutboxSpec) -> list[str]:
    return [
        sys.executable,
        "-m",
        "outbox.cli",
        "consume",
        "tests.chaos.projector:ChaosProjector",
        "--db",
        _url(svc, spec),
        "-b",
        svc.bootstrap,
        "--topic",
        spec.topic,
        "--group-id",
        f"chaos-{spec.name}-{config.seed}",
        "--log-level",
        "INFO",
    ]


# --------------------------------------------------------------------------- reading back

VERIFY_TIMEOUT = 120.0
"""Seconds ``outbox verify`` may take on a run's topic (a thousand-odd records: seconds)."""


def verify_command(svc: Services, spec: OutboxSpec, config: ChaosConfig) -> list[str]:
    """``outbox verify`` of the outbox's topic and consumer group, as an operator runs it."""
    return [
        sys.executable,
        "-m",
        "outbox.cli",
        "verify",
        "--db",
        _url(svc, spec),
        "-b",
        svc.bootstrap,
        "--topic",
        spec.topic,
        "--group",
        f"chaos-{spec.name}-{config.seed}",
        "--json",
    ]


def start_verify(svc: Services, spec: OutboxSpec, config: ChaosConfig, log_dir: Path) -> Any:
    """Start ``outbox verify`` (it runs while the harness reads the topic itself)."""
    with (log_dir / f"verify-{spec.name}.err").open("w") as err:
        return subprocess.Popen(
            verify_command(svc, spec, config), stdout=subprocess.PIPE, stderr=err, text=True
        )


def finish_verify(proc: Any, log_dir: Path, name: str) -> tuple[int | None, dict[str, Any] | None]:
    """Its exit code and ``--json`` report (None: killed at the timeout, or no JSON)."""
    try:
        out, _ = proc.communicate(timeout=VERIFY_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return None, None
    (log_dir / f"verify-{name}.json").write_text(out)
    try:
        report = json.loads(out)
    except ValueError:
        return proc.returncode, None
    return proc.returncode, report if isinstance(report, dict) else None


class Probe:
    """A monitoring connection that survives PostgreSQL restarts (None while it is down)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.Connection[Any] | None = None

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]] | None:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=3)
            return self._conn.execute(sql, params or None).fetchall()
        except psycopg.Error:
            if self._conn is not None:
                self._conn.close()
            self._conn = None
            return None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


PROGRESS_SQL = """
SELECT (SELECT count(*) FROM chaos_orders),
       (SELECT count(*) FROM outbox_events),
       (SELECT count(*) FROM chaos_effects),
       (SELECT count(*) FROM chaos_orders o
         WHERE NOT EXISTS (SELECT 1 FROM chaos_effects e WHERE e.event_id = o.event_id))
"""


RELAY_MID_BATCH_SQL = """
SELECT split_part(application_name, ':', 2), bool_or(wait_event = 'PgSleep')
  FROM pg_stat_activity
 WHERE application_name LIKE 'outbox-relay:%:slot-%' AND backend_xid IS NOT NULL
 GROUP BY 1
"""
"""Relays (by pid) whose slot connections hold a transaction id: a claimed batch is in flight
(its rows locked FOR UPDATE, or deleted and waiting for the DB commit); the second column says
whether one sleeps in ``chaos_slow_commit``, i.e. its Kafka transaction committed and its DB
commit has not: the moment a kill leaves work for the recovery marker."""

RELAY_SLOTS_SQL = """
SELECT split_part(a.application_name, ':', 2), count(*)
  FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.granted AND l.mode = 'ExclusiveLock' AND l.objsubid = 2
   AND a.application_name LIKE 'outbox-relay:%:slot-%'
 GROUP BY 1
"""
"""Slots held per relay (by pid), on every database of the server."""

TAKEOVER_SECONDS = 3.0
"""The relays' --takeover-timeout: a frozen relay's slots are taken over after about this long
(the fault keeps it frozen for ``Rates.freeze_seconds``, longer)."""

FREEZE_AIM_SECONDS = 5.0
"""How long a freeze may wait for a relay that holds slots (one just restarted may hold none)."""

AIM_SECONDS = 2.0
"""How long a relay kill may wait for a relay inside its commit window (else with a batch in
flight)."""

CONSUMER_AIM_SECONDS = 6.0
"""How long a consumer kill may wait for its target to be inside its offset-commit window (a
consumer that just joined the group may need a few seconds to get records)."""

WARM_UP_SECONDS = 60.0
"""How long the fleets get to be at work before the schedule starts: a relay slot first starts
its producer and reads its recovery marker, which on a fresh Apache Kafka cluster on a loaded
machine (the transaction coordinator's first load) took 7 s of a 20 s schedule, so every relay
kill of that schedule found no batch in flight. A run that is not warm by then starts anyway."""

SLOT_STARTED = re.compile(
    r"slot (\d+): (?:no recovery marker under |the last marker under |published outbox ids )"
)
"""A relay's log line saying a slot's start-up is over: its marker read, or a batch out."""

SLOT_STARTED_AT_LEAST_ONCE = re.compile(r"slot (\d+): (?:publishing shards |published outbox ids )")
"""The same for an at-least-once relay, which reads no marker: its slot held."""

FIRST_STRIKE_AIM_SECONDS = 10.0
"""How long a kill may wait for its moment while no kill of its kind has hit that moment yet:
the run fails if none ever does (a few large batches on Apache Kafka, a loaded machine), so
the first one is worth a late kill."""


def _topic_records(bootstrap: str, topic: str, timeout: float) -> list[TopicRecord]:
    """Every copy on ``topic``, every partition read to its end (``TopicReadError`` if not)."""
    out = []
    for r in read_topic(bootstrap, topic, timeout=timeout):
        try:
            value = json.loads(r.value) if r.value else {}
        except ValueError:
            value = {}
        if not isinstance(value, dict):
            value = {}
        out.append(
            TopicRecord(
                partition=r.partition,
                offset=r.offset,
                event_id=r.headers.get("outbox-event-id", b"?").decode(errors="replace"),
                key=str(value.get("key", "")),
                seq=int(value.get("seq", -1)),
            )
        )
    return out


def _dump_topic(path: Path, records: list[TopicRecord]) -> None:
    """Every copy read back, in (partition, offset) order: where a duplicate or a reordered
    record sits is what tells which relay, batch and fault made it."""
    with path.open("w") as out:
        for r in sorted(records, key=lambda r: (r.partition, r.offset)):
            out.write(json.dumps(dataclasses.asdict(r)) + "\n")


def collect(svc: Services, spec: OutboxSpec, ledger: Ledger) -> tuple[Observations, list[str]]:
    """What one outbox committed, applied and published; the second value lists the topics
    that could not be read to their end (each one fails the run)."""
    with psycopg.connect(_dsn(svc, spec), autocommit=True) as conn:
        committed = {
            str(e): Written(str(e), k, s)
            for e, k, s in conn.execute("SELECT event_id, key, seq FROM chaos_orders")
        }
        effects = [
            Effect(i, str(e), k, s)
            for i, e, k, s in conn.execute("SELECT id, event_id, key, seq FROM chaos_effects")
        ]
        pending = conn.execute("SELECT count(*) FROM outbox_events").fetchone()
        dead = conn.execute("SELECT count(*) FROM outbox_dead_events").fetchone()
        dead_of_missing_topic = {
            str(e)
            for (e,) in conn.execute(
                "SELECT event_id FROM outbox_dead_events WHERE topic = %s",
                (missing_topic(spec.topic),),
            )
        }
    unread: list[str] = []
    copies: dict[str, list[TopicRecord]] = {}
    for topic in (spec.topic, f"{spec.topic}.DLT"):
        try:
            copies[topic] = _topic_records(svc.bootstrap, topic, timeout=60)
        except TopicReadError as exc:
            unread.append(str(exc))
            copies[topic] = []
    with ledger.lock:
        outcomes = {k: set(v) for k, v in ledger.by_outcome.items()}
        reasons = dict(ledger.reasons)
        to_missing = {k: set(v) for k, v in ledger.to_missing_topic.items()}
    obs = Observations(
        committed=committed,
        acknowledged=outcomes[Outcome.COMMITTED],
        rolled_back=outcomes[Outcome.ROLLED_BACK],
        failed=outcomes[Outcome.FAILED],
        ambiguous=outcomes[Outcome.AMBIGUOUS],
        effects=effects,
        topic=copies[spec.topic],
        pending_outbox=int(pending[0]) if pending else -1,
        dead_rows=int(dead[0]) if dead else -1,
        dead_letters=len(copies[f"{spec.topic}.DLT"]),
        planned=spec.events,
        filters_aborts=svc.filters_aborts,
        excluded_reasons=reasons,
        to_missing_topic=to_missing[Outcome.COMMITTED],
        to_missing_topic_unknown=to_missing[Outcome.AMBIGUOUS],
        dead_of_missing_topic=dead_of_missing_topic,
    )
    return obs, unread


# --------------------------------------------------------------------------- the run

LOG_PATTERNS = {
    "relay_recoveries": re.compile(r"rows of the last committed Kafka transaction were still"),
    "relay_fenced": re.compile(r"slot \d+ lost: fenced"),
    "relay_slots_lost": re.compile(r"slot \d+ lost: "),
    "relay_transaction_retries": re.compile(r"Kafka transaction failed"),
    "relay_worker_crashes": re.compile(r"worker failed; the slot is released"),
    "relay_deliveries_expired": re.compile(r"records failed: .*_MSG_TIMED_OUT"),
    "relay_topics_held": re.compile(r"is missing or not writable .*holding its rows back"),
    "consumer_duplicates_skipped": re.compile(r"already processed; skipped"),
    "consumer_batch_fallbacks": re.compile(r"redoing it one record at a time"),
    "consumer_partitions_lost": re.compile(r"without a clean revoke"),
    "tracebacks": re.compile(r"^Traceback \(most recent call last\)"),
}
"""What the processes' own logs say they went through (proof the faults hit something)."""


def _slots_started(fleet: Fleet, line: re.Pattern[str]) -> set[int]:
    """The slots whose start-up a member of ``fleet`` logged (``line``)."""
    started: set[int] = set()
    for member in fleet.members:
        if member is not None and member.log_path.exists():
            text = member.log_path.read_text(errors="replace")
            started.update(int(slot) for slot in line.findall(text))
    return started


def scan_logs(log_dir: Path) -> dict[str, int]:
    counts = dict.fromkeys(LOG_PATTERNS, 0)
    for path in sorted(log_dir.glob("*-*-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            for name, pattern in LOG_PATTERNS.items():
                if pattern.search(line):
                    counts[name] += 1
    return counts


AIMS: Aims = {
    FaultKind.KILL_RELAY: (
        Aim(
            "relay_kills_mid_batch",
            "no relay was killed with a batch in flight (a slot transaction holding an xid)",
        ),
        Aim(
            "relay_recoveries",
            "no relay recovery from the marker: no relay kill landed between a Kafka commit and "
            "its DB commit (log line 'rows of the last committed Kafka transaction were still')",
        ),
    ),
    FaultKind.KILL_CONSUMER: (
        Aim(
            "consumer_duplicates_skipped",
            "no redelivery skipped by a consumer's dedup table: no consumer kill landed between "
            "a batch's DB commit and its offset commit (log line 'already processed; skipped')",
        ),
    ),
    FaultKind.FREEZE_RELAY: (
        Aim(
            "relay_freezes_taken_over",
            "no frozen relay's slots were taken over while it was frozen (it still held slots "
            "when woken: --takeover-timeout did not free them)",
        ),
    ),
}
"""What each fault kind is there to hit beyond being injected (the other kinds: injected once);
a run where one never struck, even after the extension that aims it again, fails."""

AT_LEAST_ONCE_AIMS: Aims = {
    FaultKind.KILL_RELAY: AIMS[FaultKind.KILL_RELAY][:1],
    FaultKind.KILL_CONSUMER: AIMS[FaultKind.KILL_CONSUMER],
    FaultKind.CUT_BROKER: (
        Aim(
            "relay_deliveries_expired",
            "no delivery report said _MSG_TIMED_OUT: the outage did not outlast the relay's "
            "delivery timeout (log line 'records failed: ..._MSG_TIMED_OUT')",
        ),
    ),
}
"""At-least-once has no recovery marker; its outage must make records expire instead."""

MISSING_TOPIC_STRUCK = (
    (
        "relay_topics_held",
        "no relay held back the rows of the missing topic (log line 'is missing or not "
        "writable ... holding its rows back')",
    ),
)
"""Not a fault: what the writers' events to a missing topic must make a relay do."""

FAULT_KINDS = frozenset(kind.value for kind in FaultKind)
"""The first step of each fault bears its kind's name (kill-relay, cut-broker, ...)."""

AIM_EXTENSION_SETTLE = 5.0
"""Seconds an extra fault of the extension gets to show in the logs (a recovery, a dedup skip)
before the next one is aimed."""


@dataclass
class Summary:
    """The JSON summary of a run (``--json``); ``ok`` says whether every invariant held.

    Event counts are summed over the outboxes; ``outboxes`` has each one's own report.
    """

    seed: int
    ok: bool
    events_attempted: int
    events_committed: int
    events_rolled_back: int
    events_failed_before_commit: int
    events_commit_unknown: int
    events_excluded: int
    excluded_reasons: dict[str, int]
    faults: dict[str, int]
    faults_scheduled: dict[str, int]
    relay_kills_mid_batch: int
    relay_kills_in_commit_window: int
    consumer_kills_in_window: int
    effects_applied: int
    duplicate_effects: int
    lost: int
    phantoms: int
    order_violations: int
    topic_records: int
    topic_duplicates: int
    topic_duplicates_note: str
    elapsed_seconds: float
    phases: dict[str, float]
    config: dict[str, Any]
    failures: list[str]
    """Invariants broken, processes crashed, the run's own errors: always a real failure."""
    aim_failures: list[str]
    """Fault kinds that never struck what they aim at, even after the extension."""
    faults_reaimed: dict[str, int]
    """Extra faults per kind played in the extension because the kind had not struck yet."""
    unexpected_exits: list[dict[str, Any]]
    process_logs: dict[str, int]
    outboxes: dict[str, dict[str, Any]]
    log_dir: str | None
    verify: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per outbox, ``outbox verify``'s exit code and report (a second checker: where it
    disagrees with the harness, ``failures`` says so)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


KAFKA_NOTE = (
    "on Apache Kafka, read_committed readers never see records of aborted transactions: every "
    "extra copy is a failure of the exactly-once publish"
)
TANSU_NOTE = (
    "on the embedded Tansu broker, records of Kafka transactions aborted by a relay kill stay "
    "visible to read_committed readers; the deduplicating consumer absorbs them (Apache Kafka "
    "hides them: 0 expected there)"
)


@dataclass
class Service:
    """One outbox while the run lasts: its spec, ledger, processes and connections."""

    spec: OutboxSpec
    ledger: Ledger
    relays: Fleet
    consumers: Fleet
    engine: Engine
    probe: Probe
    writers: list[Writer] = field(default_factory=list)


class Run:
    """One chaos run; ``execute()`` returns its summary. Everything started is stopped."""

    def __init__(self, config: ChaosConfig, cluster: KafkaCluster | None = None) -> None:
        self.config = config
        self.cluster = cluster
        self.specs = config.outboxes()
        self.faults = schedule(
            config.seed,
            config.seconds,
            relays=sum(o.relays for o in self.specs),
            consumers=sum(o.consumers for o in self.specs),
            rates=config.rates,
        )
        self.injected: Counter[str] = Counter()
        self.aims = aims_of(
            sorted({f.kind for f in self.faults}),
            AT_LEAST_ONCE_AIMS if config.at_least_once else AIMS,
        )
        self.reaimed: Counter[str] = Counter()
        self.extra_faults: list[Fault] = []
        self.log_dir: Path | None = None
        self.mid_batch = 0
        self.in_commit_window = 0
        self.relay_misses: list[str] = []
        """What the relays did when a kill found no batch in flight (``_relay_snapshot``)."""
        self.timeline: list[dict[str, Any]] = []
        self.stop_writers = threading.Event()
        self.phases: dict[str, float] = {}
        self.failures: list[str] = []
        self.cut = False
        self.services: list[Service] = []
        self.db_restarts: list[float] = []
        self.substitutes: dict[int, int] = {}
        """Scheduled relay target -> the relay killed in its place (started again in its place)."""
        self.consumer_kills_in_window = 0
        self.frozen: tuple[Fleet, int, str, int] | None = None
        """The frozen relay: its fleet, index, pid, and the slots it held when frozen."""
        self.freezes_taken_over = 0
        self.consumer_substitutes: dict[int, int] = {}
        """The same for consumers."""
        self.window_dir = Path(tempfile.mkdtemp(prefix="outbox-chaos-window-"))
        self.verify: dict[str, dict[str, Any]] = {}

    def execute(self) -> Summary:
        config = self.config
        started = time.monotonic()
        log_dir = config.log_dir or Path(tempfile.mkdtemp(prefix=f"outbox-chaos-{config.seed}-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = log_dir
        log.info(
            "chaos run: seed=%d outboxes=%s seconds=%.0f logs=%s",
            config.seed,
            ", ".join(
                f"{o.name}: {o.events} events, {o.relays} relays, {o.consumers} consumers"
                for o in self.specs
            ),
            config.seconds,
            log_dir,
        )
        reports: dict[str, Report] = {}
        with services(log_dir, self.config.broker, self.cluster) as svc:
            try:
                for spec in self.specs:
                    _prepare(svc, spec, config.relay_commit_delay)
                    suffix = "" if spec.name == "a" else f"-{spec.name}"
                    self.services.append(
                        Service(
                            spec,
                            Ledger(),
                            Fleet(
                                f"relay{suffix}",
                                spec.relays,
                                relay_command(svc, spec, config),
                                log_dir,
                            ),
                            Fleet(
                                f"consumer{suffix}",
                                spec.consumers,
                                consumer_command(svc, config, spec),
                                log_dir,
                                env={
                                    OFFSET_COMMIT_DELAY_ENV: str(config.offset_commit_delay),
                                    WINDOW_DIR_ENV: str(self.window_dir),
                                },
                            ),
                            create_engine(
                                _url(svc, spec),
                                pool_pre_ping=True,
                                pool_size=spec.writers,
                                max_overflow=2,
                                connect_args={"connect_timeout": 5},
                            ),
                            Probe(_dsn(svc, spec)),
                        )
                    )
                for service in self.services:
                    for fleet in (service.relays, service.consumers):
                        fleet.db_restarts = self.db_restarts
                        for i in range(len(fleet.members)):
                            fleet.start(i)
                self.phases["setup"] = time.monotonic() - started
                self._warm_up()
                for service in self.services:
                    service.writers = self._start_writers(service)
                self._fault_phase(svc)
                settled = self._settle(svc)
                t = time.monotonic()
                for service in self.services:
                    service.consumers.stop(config.stop_timeout)
                for service in self.services:
                    service.relays.stop(config.stop_timeout)
                self.phases["stop"] = time.monotonic() - t
                t = time.monotonic()
                verifying = {
                    s.spec.name: start_verify(svc, s.spec, config, log_dir) for s in self.services
                }
                try:
                    copies: dict[str, Counter[str]] = {}
                    for service in self.services:
                        obs, unread = collect(svc, service.spec, service.ledger)
                        reports[service.spec.name] = check(obs)
                        copies[service.spec.name] = Counter(r.event_id for r in obs.topic)
                        _dump_topic(log_dir / f"topic-{service.spec.name}.jsonl", obs.topic)
                        self.failures += [f"outbox {service.spec.name}: {u}" for u in unread]
                    for name, proc in verifying.items():
                        code, report = finish_verify(proc, log_dir, name)
                        self.verify[name] = {"exit": code, "report": report}
                        self.failures += [
                            f"outbox {name}: {d} (logs: verify-{name}.*)"
                            for d in cross_check(
                                code,
                                report,
                                reports[name],
                                copies[name],
                                offsets_misreported=not svc.filters_aborts,  # Tansu
                            )
                        ]
                finally:
                    for proc in verifying.values():
                        if proc.poll() is None:
                            proc.kill()
                            proc.wait()
                self.phases["check"] = time.monotonic() - t
                if not settled:
                    self.failures.append(
                        f"not settled within {config.settle_timeout:.0f}s after the faults: "
                        "an outbox was not empty or committed events had no effect"
                    )
                for service in self.services:
                    for fleet in (service.relays, service.consumers):
                        if fleet.unclean_stops:
                            self.failures.append(
                                f"{fleet.role}s that did not stop cleanly on SIGTERM: "
                                + "; ".join(fleet.unclean_stops)
                            )
                    if service.ledger.errors:
                        self.failures.append(
                            f"outbox {service.spec.name} writer errors: "
                            + "; ".join(service.ledger.errors[:5])
                        )
            finally:
                self.stop_writers.set()
                for service in self.services:
                    for w in service.writers:
                        w.join(10)
                for service in self.services:
                    service.consumers.kill_all()
                    service.relays.kill_all()
                    service.probe.close()
                    service.engine.dispose()
                shutil.rmtree(self.window_dir, ignore_errors=True)
        assert len(reports) == len(self.specs)
        summary = self._summary(reports, started, log_dir)
        (log_dir / "summary.json").write_text(json.dumps(summary.as_dict(), indent=2))
        (log_dir / "timeline.json").write_text(
            json.dumps(
                {
                    "schedule": [asdict(f) for f in self.faults],
                    "aimed_again": [asdict(f) for f in self.extra_faults],
                    "done": self.timeline,
                }
            )
        )
        if summary.ok and not config.keep_logs and config.log_dir is None:
            shutil.rmtree(log_dir, ignore_errors=True)
            summary.log_dir = None
        return summary

    def _start_writers(self, service: Service) -> list[Writer]:
        config, spec = self.config, service.spec
        pace = config.seconds * 0.85  # the last writes still meet a few faults
        quotas = [
            spec.events // spec.writers + (1 if i < spec.events % spec.writers else 0)
            for i in range(spec.writers)
        ]
        writers = [
            Writer(i, config, spec, service.engine, service.ledger, q, pace, self.stop_writers)
            for i, q in enumerate(quotas)
            if q > 0
        ]
        for w in writers:
            w.start()
        return writers

    def _supervise(self) -> None:
        for service in self.services:
            service.relays.supervise(restart=True)
            service.consumers.supervise(restart=True)

    def _warm_up(self) -> None:
        """Wait (bounded by ``WARM_UP_SECONDS``) until every slot of every outbox has started:
        faults aimed at batches in flight need relays that publish."""
        started = time.monotonic()
        deadline = started + WARM_UP_SECONDS
        while True:
            self._supervise()
            line = SLOT_STARTED_AT_LEAST_ONCE if self.config.at_least_once else SLOT_STARTED
            cold = {
                s.spec.name: sorted(set(range(SLOTS)) - _slots_started(s.relays, line))
                for s in self.services
            }
            cold = {name: slots for name, slots in cold.items() if slots}
            if not cold:
                break
            if time.monotonic() >= deadline:
                log.warning(
                    "slots not started after %.0fs, starting the schedule anyway: %s",
                    WARM_UP_SECONDS,
                    cold,
                )
                break
            time.sleep(0.1)  # polling the relays' logs, bounded by WARM_UP_SECONDS
        self.phases["warm_up"] = time.monotonic() - started
        log.info("relays warm after %.1fs", self.phases["warm_up"])

    def _fault_phase(self, svc: Services) -> None:
        """Play the schedule; between steps, restart crashed processes and log progress."""
        config = self.config
        t0 = time.monotonic()
        last_progress = 0.0
        for action in [*actions(self.faults), Action(config.seconds, Step.RESTORE_BROKER)]:
            while (now := time.monotonic()) < t0 + action.at:
                self._supervise()
                if now - last_progress >= 5.0:
                    last_progress = now
                    self._progress(now - t0)
                time.sleep(min(0.1, t0 + action.at - now))  # waiting for the schedule
            self._do(action, svc, time.monotonic() - t0)
        self.phases["faults"] = time.monotonic() - t0
        self._extend(svc, t0)

    def _struck(self) -> dict[str, int]:
        """The counters the aims read: the processes' logs so far, the kills' moments, and the
        faults injected per kind."""
        assert self.log_dir is not None
        return {
            **scan_logs(self.log_dir),
            "relay_kills_mid_batch": self.mid_batch,
            "relay_freezes_taken_over": self.freezes_taken_over,
            **self.injected,
        }

    def _extend(self, svc: Services, t0: float) -> None:
        """Aim again, for up to ``aim_extension`` seconds, each fault kind that has not struck.

        On a busy machine a fault can miss its moment (a kill finds no batch in flight, its
        target is down, its recovery did not happen): one more fault of such a kind is played
        (``faults.reaim``), the kinds taking turns, while extra writers keep batches coming,
        until every kind struck or the extension is over. Only a kind that never struck then
        fails the run (``aim_failures``, apart from the invariants' failures).
        """
        config = self.config
        started = time.monotonic()
        deadline = started + config.aim_extension
        rng = random.Random(f"{config.seed}-reaim")
        topups: list[Writer] = []
        stop_topups = threading.Event()
        widened = False
        try:
            while (missing := unstruck(self.aims, self._struck())) and time.monotonic() < deadline:
                if not topups:
                    topups = self._start_topups(stop_topups)
                kind = missing[sum(self.reaimed.values()) % len(missing)]
                if kind is FaultKind.KILL_RELAY and not widened:
                    widened = True
                    self._commit_window(svc, WIDE_COMMIT_WINDOW)
                fault = reaim(
                    kind,
                    time.monotonic() - t0,
                    rng,
                    relays=sum(o.relays for o in self.specs),
                    consumers=sum(o.consumers for o in self.specs),
                    rates=config.rates,
                )
                self.reaimed[kind.value] += 1
                self.extra_faults.append(fault)
                log.info("%s has not struck yet: one more at t=%.2fs", kind.value, fault.at)
                for action in actions([fault]):
                    self._wait_until(t0 + action.at)
                    self._do(action, svc, time.monotonic() - t0)
                shown_by = min(deadline, time.monotonic() + AIM_EXTENSION_SETTLE)
                while kind in unstruck(self.aims, self._struck()) and time.monotonic() < shown_by:
                    self._wait_until(time.monotonic() + 0.25)  # its effect shows in the logs
        finally:
            stop_topups.set()
            for w in topups:
                w.join(10)
            if widened:
                self._commit_window(svc, None)
        self.phases["aim_extension"] = time.monotonic() - started

    def _commit_window(self, svc: Services, seconds: float | None) -> None:
        """Widen the relays' commit window to ``seconds`` (None: back to the configured one);
        the trigger reads it at each batch's DB commit, so running relays see it at once."""
        for service in self.services:
            with psycopg.connect(_dsn(svc, service.spec), autocommit=True) as conn:
                conn.execute("DELETE FROM chaos_commit_window")
                if seconds is not None:
                    conn.execute("INSERT INTO chaos_commit_window VALUES (%s)", (seconds,))
        log.info("relay commit window: %s", f"{seconds:g} s" if seconds else "as configured")

    def _wait_until(self, when: float) -> None:
        """Supervise the fleets until ``when`` (the time of the next step)."""
        while (now := time.monotonic()) < when:
            self._supervise()
            time.sleep(min(0.1, when - now))  # waiting for the schedule

    def _start_topups(self, stop: threading.Event) -> list[Writer]:
        """One more writer per outbox, at the schedule's rate, over the extension: faults aimed
        again need batches in flight."""
        config = self.config
        topups = []
        for service in self.services:
            spec = service.spec
            rate = spec.events / max(1.0, config.seconds * 0.85)
            quota = max(1, round(rate * config.aim_extension))
            index = spec.writers + len(service.writers)  # its own keys
            writer = Writer(
                index,
                config,
                spec,
                service.engine,
                service.ledger,
                quota,
                config.aim_extension,
                stop,
            )
            writer.start()
            service.writers.append(writer)
            topups.append(writer)
        return topups

    def _target(self, role: str, index: int) -> tuple[Fleet, int]:
        """The fleet and member a fault's target index names: outbox a's first, then b's."""
        for service in self.services:
            fleet = service.relays if role == "relay" else service.consumers
            if index < len(fleet.members):
                return fleet, index
            index -= len(fleet.members)
        raise IndexError(f"no {role} {index}")

    def _aim_relay_kill(self, fleet: Fleet, index: int) -> tuple[int, str]:
        """The relay to kill and the moment it is at: ``commit`` (its Kafka transaction committed,
        its DB commit pending), ``batch`` (a batch in flight) or ``""``.

        For up to ``AIM_SECONDS`` (``FIRST_STRIKE_AIM_SECONDS`` until one kill has hit a commit
        window), look for the scheduled target, or else another live relay of
        its fleet, inside its commit window; failing that, take one with a batch in flight. A
        relay that owns no slot (it lost the race for them after its restart) can never be
        killed mid-batch. The kill lands a little after its schedule; without such a moment it
        hits the scheduled target anyway.
        """
        alive = [i for i, m in enumerate(fleet.members) if m is not None and m.proc.poll() is None]
        candidates = sorted(alive, key=lambda i: i != index)
        aim = AIM_SECONDS if self.in_commit_window else FIRST_STRIKE_AIM_SECONDS
        deadline = time.monotonic() + aim
        in_batch: int | None = None
        while candidates:
            rows = self.services[0].probe.query(RELAY_MID_BATCH_SQL) or []
            state = {str(pid): bool(sleeping) for pid, sleeping in rows}
            for i in candidates:
                member = fleet.members[i]
                pid = str(member.proc.pid) if member is not None else ""
                if state.get(pid):
                    return i, "commit"
                if pid in state and in_batch is None:
                    in_batch = i
            if time.monotonic() >= deadline:
                break
            time.sleep(0.01)  # polling for the moment to strike, bounded by AIM_SECONDS
        if in_batch is not None:
            return in_batch, "batch"
        self.relay_misses.append(self._relay_snapshot(fleet, aim))
        log.info("relay kill found no batch in flight: %s", self.relay_misses[-1])
        if index not in alive and alive:
            return alive[0], ""  # the target is down (killed in another's place): a live one
        return index, ""

    def _relay_snapshot(self, fleet: Fleet, aim: float) -> str:
        """What the relays of ``fleet`` were doing when a kill found none with a batch in flight
        for ``aim`` seconds: the evidence a failed aim needs, on a machine that keeps no logs."""
        held = self._slots_held()
        service = next(s for s in self.services if fleet in (s.relays, s.consumers))
        rows = service.probe.query(PROGRESS_SQL) or [("?", "?", "?", "?")]
        parts = [f"outbox {service.spec.name} after {aim:.0f}s: {rows[0][1]} rows pending"]
        for i, member in enumerate(fleet.members):
            if member is None:
                continue
            pid = str(member.proc.pid)
            state = "alive" if member.proc.poll() is None else f"exited {member.proc.returncode}"
            lines = member.log_path.read_text(errors="replace").splitlines() or [""]
            parts.append(f"relay {i} ({state}, {held[pid]} slots) last said: {lines[-1][:160]!r}")
        return "; ".join(parts)

    def _aim_consumer_kill(self, fleet: Fleet, index: int) -> tuple[int, bool]:
        """The consumer to kill, and whether it is between a batch's DB commit and its offset
        commit (the projector shows it with a file named after its pid).

        For up to ``CONSUMER_AIM_SECONDS`` (``FIRST_STRIKE_AIM_SECONDS`` until one kill has hit
        that window), look for the scheduled target, or else another live
        consumer of its fleet, inside that window: a target that owns no partition, or none
        with records, would never get there. Without such a moment the target is hit anyway.
        """
        alive = [i for i, m in enumerate(fleet.members) if m is not None and m.proc.poll() is None]
        candidates = sorted(alive, key=lambda i: i != index)
        aim = CONSUMER_AIM_SECONDS if self.consumer_kills_in_window else FIRST_STRIKE_AIM_SECONDS
        deadline = time.monotonic() + aim
        while candidates:
            for i in candidates:
                member = fleet.members[i]
                if member is not None and (self.window_dir / str(member.proc.pid)).exists():
                    return i, True
            if time.monotonic() >= deadline:
                break
            time.sleep(0.01)  # polling for the moment to strike, bounded by the aim
        if index not in alive and alive:
            return alive[0], False  # the target is down (killed in another's place): a live one
        return index, False

    def _do(self, action: Action, svc: Services, at: float) -> None:
        done = True
        match action.step:
            case Step.KILL_RELAY:
                fleet, index = self._target("relay", action.target)
                victim, moment = self._aim_relay_kill(fleet, index)
                done = fleet.kill(victim)
                self.mid_batch += int(done and moment != "")
                self.in_commit_window += int(done and moment == "commit")
                self.substitutes[action.target] = victim - index + action.target
            case Step.START_RELAY:
                target = self.substitutes.pop(action.target, action.target)
                fleet, index = self._target("relay", target)
                done = fleet.start(index)
            case Step.KILL_CONSUMER:
                fleet, index = self._target("consumer", action.target)
                victim, in_window = self._aim_consumer_kill(fleet, index)
                done = fleet.kill(victim)
                self.consumer_kills_in_window += int(done and in_window)
                self.consumer_substitutes[action.target] = victim - index + action.target
            case Step.START_CONSUMER:
                target = self.consumer_substitutes.pop(action.target, action.target)
                fleet, index = self._target("consumer", target)
                done = fleet.start(index)
            case Step.FREEZE_RELAY:
                done = self._freeze_relay(action.target)
            case Step.THAW_RELAY:
                done = self._thaw_relay()
            case Step.RESTART_POSTGRES:
                self.db_restarts.append(time.monotonic())
                svc.pg.restart(immediate=True)
            case Step.CUT_BROKER:
                svc.cut_broker()
                self.cut = True
            case Step.RESTORE_BROKER:
                done = self.cut
                svc.restore_broker()
                self.cut = False
        if done:
            if action.step.value in FAULT_KINDS:  # the step that injects a fault of its kind
                self.injected[action.step.value] += 1
            self.timeline.append(
                {"at": round(at, 3), "step": action.step.value, "target": action.target}
            )
            log.info("t=%6.2fs %s %s", at, action.step.value, action.target)

    def _slots_held(self) -> Counter[str]:
        rows = self.services[0].probe.query(RELAY_SLOTS_SQL) or []
        return Counter({str(pid): int(n) for pid, n in rows})

    def _freeze_relay(self, target: int) -> bool:
        """SIGSTOP the target relay, or else a live one of its fleet that holds slots (a relay
        without slots has nothing to take over)."""
        fleet, index = self._target("relay", target)
        deadline = time.monotonic() + FREEZE_AIM_SECONDS
        while True:
            held = self._slots_held()
            alive = [i for i, m in enumerate(fleet.members) if m and m.proc.poll() is None]
            order = sorted(alive, key=lambda i: i != index)
            owners = [i for i in order if held[fleet.pid(i)] > 0]
            if owners or time.monotonic() >= deadline:
                break
            time.sleep(0.1)  # polling for a relay that holds slots, bounded by the aim
        if not (owners or order):
            return False
        victim = (owners or order)[0]
        member = fleet.members[victim]
        assert member is not None
        member.proc.send_signal(signal.SIGSTOP)
        self.frozen = (fleet, victim, fleet.pid(victim), held[fleet.pid(victim)])
        return True

    def _thaw_relay(self) -> bool:
        """SIGCONT the frozen relay; the freeze struck if its slots were taken over meanwhile:
        it holds none now (I12)."""
        if self.frozen is None:
            return False
        fleet, index, pid, held = self.frozen
        self.frozen = None
        member = fleet.members[index]
        if member is None or str(member.proc.pid) != pid or member.proc.poll() is not None:
            return True  # killed while frozen: its slots went with it, proving nothing
        if held > 0 and self._slots_held()[pid] == 0:
            self.freezes_taken_over += 1
        member.proc.send_signal(signal.SIGCONT)
        return True

    def _progress(self, at: float) -> None:
        """Log each outbox's progress."""
        for service in self.services:
            rows = service.probe.query(PROGRESS_SQL)
            if not rows:
                log.info("t=%6.1fs (database unavailable)", at)
                return
            committed, pending, effects, unapplied = (int(v) for v in rows[0])
            log.info(
                "t=%6.1fs outbox %s committed=%d pending=%d effects=%d unapplied=%d attempted=%d",
                at,
                service.spec.name,
                committed,
                pending,
                effects,
                unapplied,
                service.ledger.attempted,
            )

    def _settle(self, svc: Services) -> bool:
        """No more faults: wait (deadline-bounded) until everything committed is applied."""
        config = self.config
        svc.restore_broker(wait=True)
        (self.window_dir / FAULTS_OVER).touch()  # the consumers stop widening their window
        t0 = time.monotonic()
        deadline = t0 + config.settle_timeout
        last_progress = 0.0
        settled = False
        while time.monotonic() < deadline:
            self._supervise()
            writing = any(w.is_alive() for s in self.services for w in s.writers)
            done = not writing
            for service in self.services:
                rows = service.probe.query(PROGRESS_SQL)
                if not rows:
                    done = False
                    continue
                _committed, pending, _effects, unapplied = (int(v) for v in rows[0])
                done = done and pending == 0 and unapplied == 0
            if done:
                settled = True
                break
            if time.monotonic() - last_progress >= 5.0:
                last_progress = time.monotonic()
                self._progress(config.seconds + time.monotonic() - t0)
            time.sleep(0.25)  # polling interval of a deadline-bounded wait
        self.phases["settle"] = time.monotonic() - t0
        log.info("settled=%s after %.1fs", settled, self.phases["settle"])
        return settled

    def _summary(self, reports: dict[str, Report], started: float, log_dir: Path) -> Summary:
        config = self.config
        failures = [f"outbox {name}: {f}" for name, r in reports.items() for f in r.failures]
        failures += self.failures
        fleets = [f for s in self.services for f in (s.relays, s.consumers)]
        exits = [asdict(e) for fleet in fleets for e in fleet.exits]
        crashes = [e for e in exits if not e["refused_start_during_db_restart"]]
        logs = scan_logs(log_dir)
        struck = {
            **logs,
            "relay_kills_mid_batch": self.mid_batch,
            "relay_freezes_taken_over": self.freezes_taken_over,
            **self.injected,
        }
        missed = aim_failures(self.aims, struck, dict(self.reaimed), config.aim_extension)
        if self.relay_misses and any(FaultKind.KILL_RELAY.value in m for m in missed):
            missed.append(f"the last relay kill that found no batch: {self.relay_misses[-1]}")
        if config.missing_topic_share:
            for name, meaning in MISSING_TOPIC_STRUCK:
                if not struck[name]:
                    failures.append(f"{name}=0: {meaning}")
        if config.strict and crashes:
            failures.append(f"{len(crashes)} processes exited on their own (--strict)")
        if config.strict and logs["tracebacks"]:
            failures.append(f"{logs['tracebacks']} tracebacks in the process logs (--strict)")
        attempted = sum(s.ledger.attempted for s in self.services)
        reasons: Counter[str] = Counter()
        for r in reports.values():
            reasons.update(r.excluded_reasons)

        def total(name: str) -> int:
            return sum(int(getattr(r, name)) for r in reports.values())

        return Summary(
            seed=config.seed,
            ok=not failures and not missed,
            events_attempted=attempted,
            events_committed=total("committed"),
            events_rolled_back=total("rolled_back"),
            events_failed_before_commit=total("failed_before_commit"),
            events_commit_unknown=total("ambiguous"),
            events_excluded=total("excluded"),
            excluded_reasons=dict(reasons),
            faults={k: self.injected.get(k, 0) for k in count_by_kind(self.faults)},
            faults_scheduled=count_by_kind(self.faults),
            relay_kills_mid_batch=self.mid_batch,
            relay_kills_in_commit_window=self.in_commit_window,
            consumer_kills_in_window=self.consumer_kills_in_window,
            effects_applied=total("effects_applied"),
            duplicate_effects=total("duplicate_effects"),
            lost=total("lost"),
            phantoms=total("phantoms"),
            order_violations=total("order_violations"),
            topic_records=total("topic_records"),
            topic_duplicates=total("topic_duplicates"),
            topic_duplicates_note=KAFKA_NOTE if self.config.broker == "kafka" else TANSU_NOTE,
            elapsed_seconds=round(time.monotonic() - started, 1),
            phases={k: round(v, 1) for k, v in self.phases.items()},
            config={
                "outboxes": [asdict(o) for o in self.specs],
                "seconds": config.seconds,
                "keys_per_writer": config.keys_per_writer,
                "rollback_ratio": config.rollback_ratio,
                "offset_commit_delay": config.offset_commit_delay,
                "relay_commit_delay": config.relay_commit_delay,
                "relay_producer_settings": RELAY_PRODUCER_SETTINGS,
                "guarantee": config.guarantee,
                "outage_seconds": config.rates.outage_seconds,
                "missing_topic_share": config.missing_topic_share,
                "postgresql": DURABLE_SETTINGS,
            },
            failures=failures,
            aim_failures=missed,
            faults_reaimed=dict(self.reaimed),
            unexpected_exits=exits,
            process_logs=logs,
            outboxes={name: r.as_dict() for name, r in reports.items()},
            log_dir=str(log_dir),
            verify=self.verify,
        )


def run_chaos(config: ChaosConfig, cluster: KafkaCluster | None = None) -> Summary:
    """Run the whole chaos scenario for ``config`` and return its summary (never raises on a
    broken invariant: ``summary.ok`` is False and ``summary.failures`` says why).

    ``cluster``: with ``config.broker == "kafka"``, a running cluster to use (the test
    session's) instead of starting one; every node runs again when the run ends."""
    return Run(config, cluster).execute()
