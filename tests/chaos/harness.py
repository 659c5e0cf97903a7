"""The chaos run: real services, real ``outbox`` processes, a seeded fault injector, a verdict.

Layout of one run (``run_chaos``):

- PostgreSQL (``EmbeddedPostgres``, ``synchronous_commit=on`` so an immediate
  restart never loses an acknowledged commit) and the Tansu broker, which
  advertises a ``TcpProxy``: every Kafka connection of every client, bootstrap
  and broker alike, goes through the proxy, so cutting it cuts them all.
- Application writers (threads here) insert a ``chaos_orders`` row and
  ``publish()`` its event in ONE transaction; some roll back on purpose. Each
  writer owns its keys and numbers their events, so per-key order is defined.
- ``outbox relay`` and ``outbox consume tests.chaos.projector:ChaosProjector``
  run as subprocesses, as in production.
- The main thread plays the fault schedule (``faults.schedule(seed)``): SIGKILL
  a relay or a consumer and start a replacement, restart PostgreSQL
  (immediate), cut the broker link for a few seconds.
- Then nothing fails any more: the run waits (on a condition, with a
  deadline) until the outbox is empty and every committed event has an effect,
  stops every process with SIGTERM, reads the topic back with an independent
  client and hands everything to ``checker.check``.
"""

from __future__ import annotations

import contextlib
import ctypes
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
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import psycopg
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]
from sqlalchemy import Engine, create_engine, text
from sqlalchemy import exc as sa_exc

from outbox import publish
from outbox.embedded import EmbeddedBroker, EmbeddedPostgres, EmbeddedServiceError, free_port
from outbox.kafka import message_headers
from outbox.migrate import upgrade
from tests.chaos.checker import Effect, Observations, Report, TopicRecord, Written, check
from tests.chaos.faults import Action, Rates, Step, actions, count_by_kind, schedule
from tests.chaos.projector import OFFSET_COMMIT_DELAY_ENV, TABLES
from tests.support import TcpProxy

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
    offset_commit_delay: float = 0.05
    """Seconds each consumer waits between a batch's DB commit and its offset commit, so
    that consumer kills land in that window and the dedup path is exercised."""
    strict: bool = False
    """Also fail on processes that crashed and on tracebacks in their logs."""
    rates: Rates = field(default_factory=Rates)

    def __post_init__(self) -> None:
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

    def record(self, ids: list[str], outcome: Outcome) -> None:
        with self.lock:
            self.attempted += len(ids)
            self.by_outcome[outcome].update(ids)


_INSERT_ORDER = text("INSERT INTO chaos_orders (event_id, key, seq) VALUES (:event_id, :key, :seq)")


def write_transaction(
    engine: Engine, topic: str, batch: list[tuple[uuid.UUID, str, int]], rollback: bool
) -> Outcome:
    """One application transaction: business rows and their events, committed or rolled back.

    A database error before the commit was sent means nothing committed; an error
    during the commit (PostgreSQL restarted under it) leaves the outcome unknown
    until the database is read back.
    """
    committing = False
    try:
        with engine.connect() as conn:
            tx = conn.begin()
            for event_id, key, seq in batch:
                conn.execute(_INSERT_ORDER, {"event_id": event_id, "key": key, "seq": seq})
                value = {"key": key, "seq": seq}
                publish(conn, topic=topic, key=key, value=value, event_id=event_id)
            if rollback:
                tx.rollback()
                return Outcome.ROLLED_BACK
            committing = True
            tx.commit()
            return Outcome.COMMITTED
    except (sa_exc.DBAPIError, sa_exc.InvalidRequestError, psycopg.Error):
        if rollback:
            return Outcome.ROLLED_BACK
        return Outcome.AMBIGUOUS if committing else Outcome.FAILED


class Writer(threading.Thread):
    """An application thread: owns its keys, numbers their events, paces itself over the run."""

    def __init__(
        self,
        index: int,
        config: ChaosConfig,
        engine: Engine,
        ledger: Ledger,
        quota: int,
        pace_seconds: float,
        stop: threading.Event,
    ) -> None:
        super().__init__(name=f"chaos-writer-{index}", daemon=True)
        self.config = config
        self.engine = engine
        self.ledger = ledger
        self.quota = quota
        self.pace_seconds = pace_seconds
        self.stop = stop
        self.rng = random.Random(f"{config.seed}-writer-{index}")
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
            outcome = write_transaction(self.engine, self.config.topic, batch, rollback)
            self.ledger.record([str(e) for e, _, _ in batch], outcome)
            written += n
            if outcome in (Outcome.FAILED, Outcome.AMBIGUOUS):
                self.stop.wait(0.2)  # the database is restarting: back off instead of spinning


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
                exit_ = Exit(
                    self.role,
                    index,
                    member.generation,
                    int(member.proc.returncode),
                    str(member.log_path),
                    _tail(member.log_path),
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

    def stop(self, timeout: float) -> None:
        """SIGTERM all, wait; a process still running after ``timeout`` is a hang: SIGKILL it."""
        running = [m for m in self.members if m is not None and m.proc.poll() is None]
        for m in running:
            m.killed = True  # stopping on purpose
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
    pg: EmbeddedPostgres
    broker: EmbeddedBroker
    proxy: TcpProxy

    @property
    def db_url(self) -> str:
        return self.pg.sqlalchemy_url

    @property
    def bootstrap(self) -> str:
        return self.broker.bootstrap_servers  # the proxy's address


@contextlib.contextmanager
def services(log_dir: Path) -> Iterator[Services]:
    """PostgreSQL and the broker behind a proxy that every Kafka client goes through.

    Both servers' logs end up in ``log_dir`` next to the processes' logs.
    """
    pg = EmbeddedPostgres(database="chaos", extra_settings={"synchronous_commit": "on"})
    broker: EmbeddedBroker | None = None
    proxy: TcpProxy | None = None
    try:
        pg.start()
        for attempt in range(3):
            broker_port, proxy_port = free_port(), free_port()
            try:
                proxy = TcpProxy(broker_port, proxy_port)
            except OSError:
                if attempt == 2:
                    raise
                continue
            broker = EmbeddedBroker(
                port=broker_port, advertised_port=proxy_port, log_path=log_dir / "tansu.log"
            )
            broker.start()
            break
        assert broker is not None
        assert proxy is not None
        yield Services(pg, broker, proxy)
    finally:
        if proxy is not None:
            proxy.close()
        if broker is not None:
            broker.stop()
        with contextlib.suppress(OSError, EmbeddedServiceError):
            shutil.copyfile(pg.log_path, log_dir / "postgresql.log")
        pg.stop()


def _prepare(svc: Services, topic: str) -> None:
    upgrade(svc.db_url)
    with psycopg.connect(svc.pg.dsn, autocommit=True) as conn:
        conn.execute(TABLES)  # a constant holding several statements
    admin = AdminClient({"bootstrap.servers": svc.bootstrap})
    for future in admin.create_topics([NewTopic(topic, PARTITIONS)], operation_timeout=30).values():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


def relay_command(svc: Services, config: ChaosConfig) -> list[str]:
    settings = [arg for k, v in RELAY_PRODUCER_SETTINGS.items() for arg in ("-X", f"{k}={v}")]
    return [
        sys.executable,
        "-m",
        "outbox.cli",
        "relay",
        "--db",
        svc.db_url,
        "-b",
        svc.bootstrap,
        "--slots",
        str(SLOTS),
        "--batch-size",
        "100",
        "--poll-interval",
        "0.5",
        "--transactional-id-prefix",
        f"chaos-{config.seed}",
        *settings,
        "--log-level",
        "INFO",
    ]


def consumer_command(svc: Services, config: ChaosConfig) -> list[str]:
    return [
        sys.executable,
        "-m",
        "outbox.cli",
        "consume",
        "tests.chaos.projector:ChaosProjector",
        "--db",
        svc.db_url,
        "-b",
        svc.bootstrap,
        "--topic",
        config.topic,
        "--group-id",
        f"chaos-{config.seed}",
        "--log-level",
        "INFO",
    ]


# --------------------------------------------------------------------------- reading back


class Probe:
    """A monitoring connection that survives PostgreSQL restarts (None while it is down)."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self._conn: psycopg.Connection[Any] | None = None

    def query(self, sql: str) -> list[tuple[Any, ...]] | None:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=3)
            return self._conn.execute(sql).fetchall()
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


def read_topic(bootstrap: str, topic: str, timeout: float = 60.0) -> tuple[list[TopicRecord], bool]:
    """Every record of ``topic`` (read_committed, from the start, to the end of each partition).

    Returns the records and whether every partition was read to its end in time.
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"chaos-checker-{uuid.uuid4().hex}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    records: list[TopicRecord] = []
    try:
        md = consumer.list_topics(topic, timeout=10)
        meta = md.topics.get(topic)
        if meta is None or meta.error is not None:
            return records, True
        partitions = sorted(meta.partitions)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        at_end: set[int] = set()
        deadline = time.monotonic() + timeout
        while len(at_end) < len(partitions) and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            err = msg.error()
            partition = int(msg.partition() or 0)
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    at_end.add(partition)
                else:
                    log.warning("reading %s: %s", topic, err)
                continue
            at_end.discard(partition)
            headers = message_headers(msg)
            raw = msg.value()
            value = json.loads(raw) if isinstance(raw, bytes) and raw else {}
            records.append(
                TopicRecord(
                    partition=partition,
                    offset=int(msg.offset() or 0),
                    event_id=headers.get("outbox-event-id", b"?").decode(),
                    key=str(value.get("key", "")) if isinstance(value, dict) else "",
                    seq=int(value.get("seq", -1)) if isinstance(value, dict) else -1,
                )
            )
        return records, len(at_end) == len(partitions)
    finally:
        consumer.close()


def collect(svc: Services, config: ChaosConfig, ledger: Ledger) -> tuple[Observations, bool]:
    with psycopg.connect(svc.pg.dsn, autocommit=True) as conn:
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
    topic, complete = read_topic(svc.bootstrap, config.topic)
    dead_letters, _ = read_topic(svc.bootstrap, f"{config.topic}.DLT", timeout=10)
    with ledger.lock:
        outcomes = {k: set(v) for k, v in ledger.by_outcome.items()}
    obs = Observations(
        committed=committed,
        acknowledged=outcomes[Outcome.COMMITTED],
        rolled_back=outcomes[Outcome.ROLLED_BACK],
        failed=outcomes[Outcome.FAILED],
        ambiguous=outcomes[Outcome.AMBIGUOUS],
        effects=effects,
        topic=topic,
        pending_outbox=int(pending[0]) if pending else -1,
        dead_rows=int(dead[0]) if dead else -1,
        dead_letters=len(dead_letters),
    )
    return obs, complete


# --------------------------------------------------------------------------- the run

LOG_PATTERNS = {
    "relay_recoveries": re.compile(r"rows of the last committed Kafka transaction were still"),
    "relay_fenced": re.compile(r"slot \d+ lost: fenced"),
    "relay_slots_lost": re.compile(r"slot \d+ lost: "),
    "relay_transaction_retries": re.compile(r"Kafka transaction failed"),
    "relay_worker_crashes": re.compile(r"worker failed; the slot is released"),
    "consumer_duplicates_skipped": re.compile(r"already processed; skipped"),
    "consumer_batch_fallbacks": re.compile(r"redoing it one record at a time"),
    "consumer_partitions_lost": re.compile(r"without a clean revoke"),
    "tracebacks": re.compile(r"^Traceback \(most recent call last\)"),
}
"""What the processes' own logs say they went through (proof the faults hit something)."""


def scan_logs(log_dir: Path) -> dict[str, int]:
    counts = dict.fromkeys(LOG_PATTERNS, 0)
    for path in sorted(log_dir.glob("*-*-*.log")):
        for line in path.read_text(errors="replace").splitlines():
            for name, pattern in LOG_PATTERNS.items():
                if pattern.search(line):
                    counts[name] += 1
    return counts


@dataclass
class Summary:
    """The JSON summary of a run (``--json``); ``ok`` says whether every invariant held."""

    seed: int
    ok: bool
    events_attempted: int
    events_committed: int
    events_rolled_back: int
    events_failed_before_commit: int
    events_commit_unknown: int
    faults: dict[str, int]
    faults_scheduled: dict[str, int]
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
    unexpected_exits: list[dict[str, Any]]
    process_logs: dict[str, int]
    report: dict[str, Any]
    log_dir: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


TANSU_NOTE = (
    "on the embedded Tansu broker, records of Kafka transactions aborted by a relay kill stay "
    "visible to read_committed readers; the deduplicating consumer absorbs them (Apache Kafka "
    "hides them: 0 expected there)"
)


class Run:
    """One chaos run; ``execute()`` returns its summary. Everything started is stopped."""

    def __init__(self, config: ChaosConfig) -> None:
        self.config = config
        self.faults = schedule(
            config.seed,
            config.seconds,
            relays=config.relays,
            consumers=config.consumers,
            rates=config.rates,
        )
        self.injected: Counter[str] = Counter()
        self.timeline: list[dict[str, Any]] = []
        self.ledger = Ledger()
        self.stop_writers = threading.Event()
        self.phases: dict[str, float] = {}
        self.failures: list[str] = []
        self.cut = False

    def execute(self) -> Summary:
        config = self.config
        started = time.monotonic()
        log_dir = config.log_dir or Path(tempfile.mkdtemp(prefix=f"outbox-chaos-{config.seed}-"))
        log_dir.mkdir(parents=True, exist_ok=True)
        log.info(
            "chaos run: seed=%d events=%d seconds=%.0f relays=%d consumers=%d logs=%s",
            config.seed,
            config.events,
            config.seconds,
            config.relays,
            config.consumers,
            log_dir,
        )
        report: Report | None = None
        with services(log_dir) as svc:
            _prepare(svc, config.topic)
            relays = Fleet("relay", config.relays, relay_command(svc, config), log_dir)
            consumers = Fleet(
                "consumer",
                config.consumers,
                consumer_command(svc, config),
                log_dir,
                env={OFFSET_COMMIT_DELAY_ENV: str(config.offset_commit_delay)},
            )
            engine = create_engine(
                svc.db_url,
                pool_pre_ping=True,
                pool_size=config.writers,
                max_overflow=2,
                connect_args={"connect_timeout": 5},
            )
            probe = Probe(svc.pg.dsn)
            writers: list[Writer] = []
            try:
                for fleet in (relays, consumers):
                    for i in range(len(fleet.members)):
                        fleet.start(i)
                self.phases["setup"] = time.monotonic() - started
                writers = self._start_writers(engine)
                self._fault_phase(svc, relays, consumers, probe)
                settled = self._settle(svc, relays, consumers, probe, writers)
                t = time.monotonic()
                consumers.stop(config.stop_timeout)
                relays.stop(config.stop_timeout)
                self.phases["stop"] = time.monotonic() - t
                t = time.monotonic()
                obs, complete = collect(svc, config, self.ledger)
                report = check(obs)
                self.phases["check"] = time.monotonic() - t
                if not settled:
                    self.failures.append(
                        f"not settled within {config.settle_timeout:.0f}s after the faults: "
                        "the outbox was not empty or committed events had no effect"
                    )
                if not complete:
                    self.failures.append("the topic could not be read to its end")
                for fleet in (relays, consumers):
                    if fleet.unclean_stops:
                        self.failures.append(
                            f"{fleet.role}s that did not stop cleanly on SIGTERM: "
                            + "; ".join(fleet.unclean_stops)
                        )
                if self.ledger.errors:
                    self.failures.append("writer errors: " + "; ".join(self.ledger.errors))
            finally:
                self.stop_writers.set()
                for w in writers:
                    w.join(10)
                consumers.kill_all()
                relays.kill_all()
                probe.close()
                engine.dispose()
        assert report is not None
        summary = self._summary(report, relays, consumers, started, log_dir)
        (log_dir / "summary.json").write_text(json.dumps(summary.as_dict(), indent=2))
        (log_dir / "timeline.json").write_text(
            json.dumps({"schedule": [asdict(f) for f in self.faults], "done": self.timeline})
        )
        if summary.ok and not config.keep_logs and config.log_dir is None:
            shutil.rmtree(log_dir, ignore_errors=True)
            summary.log_dir = None
        return summary

    def _start_writers(self, engine: Engine) -> list[Writer]:
        config = self.config
        pace = config.seconds * 0.85  # the last writes still meet a few faults
        quotas = [
            config.events // config.writers + (1 if i < config.events % config.writers else 0)
            for i in range(config.writers)
        ]
        writers = [
            Writer(i, config, engine, self.ledger, q, pace, self.stop_writers)
            for i, q in enumerate(quotas)
            if q > 0
        ]
        for w in writers:
            w.start()
        return writers

    def _fault_phase(self, svc: Services, relays: Fleet, consumers: Fleet, probe: Probe) -> None:
        """Play the schedule; between steps, restart crashed processes and log progress."""
        config = self.config
        t0 = time.monotonic()
        last_progress = 0.0
        for action in [*actions(self.faults), Action(config.seconds, Step.RESTORE_BROKER)]:
            while (now := time.monotonic()) < t0 + action.at:
                relays.supervise(restart=True)
                consumers.supervise(restart=True)
                if now - last_progress >= 5.0:
                    last_progress = now
                    self._progress(now - t0, probe)
                time.sleep(min(0.1, t0 + action.at - now))  # waiting for the schedule
            self._do(action, svc, relays, consumers, time.monotonic() - t0)
        self.phases["faults"] = time.monotonic() - t0

    def _do(
        self, action: Action, svc: Services, relays: Fleet, consumers: Fleet, at: float
    ) -> None:
        done = True
        match action.step:
            case Step.KILL_RELAY:
                done = relays.kill(action.target)
            case Step.START_RELAY:
                done = relays.start(action.target)
            case Step.KILL_CONSUMER:
                done = consumers.kill(action.target)
            case Step.START_CONSUMER:
                done = consumers.start(action.target)
            case Step.RESTART_POSTGRES:
                svc.pg.restart(immediate=True)
            case Step.CUT_BROKER:
                svc.proxy.cut()
                self.cut = True
            case Step.RESTORE_BROKER:
                done = self.cut
                svc.proxy.restore()
                self.cut = False
        if done:
            kind = {
                Step.KILL_RELAY: "kill-relay",
                Step.KILL_CONSUMER: "kill-consumer",
                Step.RESTART_POSTGRES: "restart-postgres",
                Step.CUT_BROKER: "cut-broker",
            }.get(action.step)
            if kind is not None:
                self.injected[kind] += 1
            self.timeline.append(
                {"at": round(at, 3), "step": action.step.value, "target": action.target}
            )
            log.info("t=%6.2fs %s %s", at, action.step.value, action.target)

    def _progress(self, at: float, probe: Probe) -> tuple[int, ...] | None:
        rows = probe.query(PROGRESS_SQL)
        if not rows:
            log.info("t=%6.1fs (database unavailable)", at)
            return None
        committed, pending, effects, unapplied = (int(v) for v in rows[0])
        log.info(
            "t=%6.1fs committed=%d pending=%d effects=%d unapplied=%d attempted=%d",
            at,
            committed,
            pending,
            effects,
            unapplied,
            self.ledger.attempted,
        )
        return committed, pending, effects, unapplied

    def _settle(
        self,
        svc: Services,
        relays: Fleet,
        consumers: Fleet,
        probe: Probe,
        writers: list[Writer],
    ) -> bool:
        """No more faults: wait (deadline-bounded) until everything committed is applied."""
        config = self.config
        svc.proxy.restore()
        t0 = time.monotonic()
        deadline = t0 + config.settle_timeout
        last_progress = 0.0
        settled = False
        while time.monotonic() < deadline:
            relays.supervise(restart=True)
            consumers.supervise(restart=True)
            writing = any(w.is_alive() for w in writers)
            rows = probe.query(PROGRESS_SQL)
            if rows and not writing:
                _committed, pending, _effects, unapplied = (int(v) for v in rows[0])
                if pending == 0 and unapplied == 0:
                    settled = True
                    break
            if time.monotonic() - last_progress >= 5.0:
                last_progress = time.monotonic()
                self._progress(config.seconds + time.monotonic() - t0, probe)
            time.sleep(0.25)  # polling interval of a deadline-bounded wait
        self.phases["settle"] = time.monotonic() - t0
        log.info("settled=%s after %.1fs", settled, self.phases["settle"])
        return settled

    def _summary(
        self, report: Report, relays: Fleet, consumers: Fleet, started: float, log_dir: Path
    ) -> Summary:
        config = self.config
        failures = [*report.failures, *self.failures]
        exits = [asdict(e) for e in (*relays.exits, *consumers.exits)]
        logs = scan_logs(log_dir)
        if config.strict and exits:
            failures.append(f"{len(exits)} processes exited on their own (--strict)")
        if config.strict and logs["tracebacks"]:
            failures.append(f"{logs['tracebacks']} tracebacks in the process logs (--strict)")
        with self.ledger.lock:
            attempted = self.ledger.attempted
        return Summary(
            seed=config.seed,
            ok=not failures,
            events_attempted=attempted,
            events_committed=report.committed,
            events_rolled_back=report.rolled_back,
            events_failed_before_commit=report.failed_before_commit,
            events_commit_unknown=report.ambiguous,
            faults={k: self.injected.get(k, 0) for k in count_by_kind(self.faults)},
            faults_scheduled=count_by_kind(self.faults),
            effects_applied=report.effects_applied,
            duplicate_effects=report.duplicate_effects,
            lost=report.lost,
            phantoms=report.phantoms,
            order_violations=report.order_violations,
            topic_records=report.topic_records,
            topic_duplicates=report.topic_duplicates,
            topic_duplicates_note=TANSU_NOTE,
            elapsed_seconds=round(time.monotonic() - started, 1),
            phases={k: round(v, 1) for k, v in self.phases.items()},
            config={
                "events": config.events,
                "seconds": config.seconds,
                "relays": config.relays,
                "consumers": config.consumers,
                "writers": config.writers,
                "keys": config.writers * config.keys_per_writer,
                "rollback_ratio": config.rollback_ratio,
                "offset_commit_delay": config.offset_commit_delay,
                "relay_producer_settings": RELAY_PRODUCER_SETTINGS,
            },
            failures=failures,
            unexpected_exits=exits,
            process_logs=logs,
            report=report.as_dict(),
            log_dir=str(log_dir),
        )


def run_chaos(config: ChaosConfig) -> Summary:
    """Run the whole chaos scenario for ``config`` and return its summary (never raises on a
    broken invariant: ``summary.ok`` is False and ``summary.failures`` says why)."""
    return Run(config).execute()
