"""A throwaway 3-node Apache Kafka 4.x cluster (KRaft) on 127.0.0.1, for tests and benchmarks.

Tansu (outbox.embedded) speaks the Kafka protocol but is not Apache Kafka: it shows records of
aborted transactions to read_committed readers, creates every topic on first use and has no
record size limit. The properties this project sells (no duplicate on the topic after a relay
crash, fencing, read_committed) are Kafka's, so they are tested on Kafka itself.

No Docker and no download from apache.org: the broker's jars come from Maven Central through
`mvn dependency:copy-dependencies` on the small pom shipped beside this module (the single
version pin), into a cache outside the repository, under a file lock so parallel sessions
share one download. The cluster runs three combined broker+controller JVMs: three processes
instead of six on a 2-core machine, and killing one node still leaves a controller quorum
and an in-sync majority (replication factor 3, min.insync.replicas=2).
"""

from __future__ import annotations

import base64
import fcntl
import logging
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Self

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from outbox.embedded.process import ProcessGroup, Service, Watchdog
from outbox.embedded.servers import (
    _QUIET_LOGGER,
    EmbeddedServiceError,
    _log_tail,
    _sleep_until_next_poll,
    free_port,
)

__all__ = [
    "KafkaCluster",
    "KafkaUnavailableError",
    "create_topic",
    "default_cache_dir",
    "fetch_kafka",
    "kafka_unavailable_reason",
    "pinned_kafka_version",
]

log = logging.getLogger(__name__)

_POM = "kafka_broker.pom.xml"
_POM_NS = "{http://maven.apache.org/POM/4.0.0}"
_COMPLETE = ".complete"
_MAIN = "kafka.Kafka"
_STORAGE_TOOL = "kafka.tools.StorageTool"
SCRAM_MECHANISMS = ("SCRAM-SHA-256", "SCRAM-SHA-512")

# Small heaps, one GC thread: three JVMs share two cores with the tests.
DEFAULT_JVM_OPTIONS = (
    "-Xms96m",
    "-Xmx384m",
    "-XX:+UseSerialGC",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)

TEST_JVM_OPTIONS = (*DEFAULT_JVM_OPTIONS, "-XX:TieredStopAtLevel=1")
"""For a test session's cluster: C1 only (no C2 compiles) burns about half the CPU (start-up
15-17 CPU-s instead of 27-30, 300 transactions 21-27 instead of 45-48, idle 3.5 a half-minute
instead of 6; `python -m tests.probes.kafka_cluster_cpu`), CPU a two-core machine gives the
tests. Benchmarks and the demo keep the default: C2 is what a production broker runs."""

_LOG4J2 = """\
status = error
appender.file.type = File
appender.file.name = FILE
appender.file.fileName = {log_file}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = WARN
rootLogger.appenderRef.file.ref = FILE
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = INFO
"""


class KafkaUnavailableError(EmbeddedServiceError):
    """Apache Kafka cannot be fetched or run here (no java/mvn, Maven Central unreachable)."""


def pinned_kafka_version() -> str:
    """The Kafka version the shipped pom pins (its `kafka.version` property)."""
    # The pom ships inside this package: trusted input.
    root = ET.fromstring(resources.files("outbox.embedded").joinpath(_POM).read_bytes())  # noqa: S314
    node = root.find(f"{_POM_NS}properties/{_POM_NS}kafka.version")
    if node is None or not (node.text or "").strip():
        raise KafkaUnavailableError(f"outbox/{_POM} has no <kafka.version> property")
    return (node.text or "").strip()


def default_cache_dir() -> Path:
    """Where fetched jars live: outside any checkout, shared by every worktree and session."""
    return Path.home() / ".cache" / "kafka-outbox"


def _libs_dir(cache_dir: Path, version: str) -> Path:
    return cache_dir / f"kafka-{version}" / "libs"


def kafka_unavailable_reason(
    cache_dir: Path | None = None, *, java: str = "java", mvn: str = "mvn"
) -> str | None:
    """Why Apache Kafka cannot run here, or None. Maven is only needed for the first fetch."""
    if shutil.which(java) is None:
        return f"no `{java}` on PATH (Apache Kafka needs a JDK 17+)"
    libs = _libs_dir(cache_dir or default_cache_dir(), pinned_kafka_version())
    if not (libs / _COMPLETE).exists() and shutil.which(mvn) is None:
        return f"no `{mvn}` on PATH to fetch the Kafka jars from Maven Central into {libs}"
    return None


def fetch_kafka(cache_dir: Path | None = None, *, mvn: str = "mvn", timeout: float = 600) -> Path:
    """Return the directory holding the pinned broker's jars, fetching them once.

    Concurrent callers (parallel test sessions) serialise on a lock file; the jars are copied
    into a scratch directory and renamed into place, so a half-finished fetch is never used.
    """
    cache_dir = cache_dir or default_cache_dir()
    version = pinned_kafka_version()
    libs = _libs_dir(cache_dir, version)
    if (libs / _COMPLETE).exists():
        return libs
    libs.parent.mkdir(parents=True, exist_ok=True)
    with (libs.parent / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (libs / _COMPLETE).exists():
            return libs  # another session fetched it while we waited
        if shutil.which(mvn) is None:
            raise KafkaUnavailableError(
                f"cannot fetch Apache Kafka {version}: no `{mvn}` on PATH (install Maven, or "
                f"put the jars of org.apache.kafka:kafka_2.13:{version} into {libs} and create "
                f"{libs / _COMPLETE})"
            )
        scratch = Path(tempfile.mkdtemp(prefix="fetch-", dir=libs.parent))
        try:
            pom = scratch / "pom.xml"
            pom.write_bytes(resources.files("outbox.embedded").joinpath(_POM).read_bytes())
            started = time.monotonic()
            result = subprocess.run(
                [
                    mvn,
                    "-q",
                    "-B",
                    "-f",
                    str(pom),
                    "dependency:copy-dependencies",
                    "-DincludeScope=runtime",
                    f"-DoutputDirectory={scratch / 'libs'}",
                ],
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            if result.returncode != 0 or not any((scratch / "libs").glob("kafka_2.13-*.jar")):
                output = (result.stdout + result.stderr).strip().splitlines()[-30:]
                raise KafkaUnavailableError(
                    f"`mvn dependency:copy-dependencies` for Apache Kafka {version} failed "
                    f"(exit {result.returncode}); Maven Central must be reachable:\n"
                    + "\n".join(output)
                )
            (scratch / "libs" / _COMPLETE).write_text(version)
            shutil.rmtree(libs, ignore_errors=True)
            (scratch / "libs").rename(libs)
            log.info(
                "fetched Apache Kafka %s in %.1fs into %s",
                version,
                time.monotonic() - started,
                libs,
            )
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return libs


@dataclass
class _Node:
    node_id: int
    plaintext_port: int
    sasl_port: int
    controller_port: int
    dir: Path
    process: ProcessGroup | None = None
    starts: int = 0

    @property
    def config_path(self) -> Path:
        return self.dir / "server.properties"

    @property
    def log_path(self) -> Path:
        return self.dir / "server.log"

    @property
    def console_path(self) -> Path:
        return self.dir / "console.log"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running


@dataclass(frozen=True)
class ScramUser:
    username: str
    password: str = field(repr=False)


class KafkaCluster(Service):
    """A 3-node KRaft cluster of combined broker+controller JVMs on 127.0.0.1.

    Every node has a PLAINTEXT listener (`bootstrap_servers`) and a SASL_PLAINTEXT listener
    with SCRAM-SHA-256/512 (`sasl_bootstrap_servers`, `sasl_client_config()`). Data,
    __consumer_offsets and __transaction_state have replication factor 3 and
    min.insync.replicas 2; topics are never auto-created. Nodes keep their data across
    `stop_node`/`kill_node` and `start_node`, so a node can crash and come back.
    """

    def __init__(
        self,
        *,
        nodes: int = 3,
        cache_dir: str | Path | None = None,
        java: str = "java",
        mvn: str = "mvn",
        jvm_options: Iterable[str] = DEFAULT_JVM_OPTIONS,
        broker_config: Mapping[str, str] | None = None,
        keep_files: bool = False,
        startup_timeout: float = 180.0,
        stop_timeout: float = 30.0,
    ) -> None:
        if nodes < 1:
            raise ValueError(f"nodes={nodes}: a cluster needs at least one node")
        self.host = "127.0.0.1"
        self.node_count = nodes
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.java = java
        self.mvn = mvn
        self.jvm_options = tuple(jvm_options)
        self.broker_config = dict(broker_config or {})
        self.keep_files = keep_files
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.version = pinned_kafka_version()
        self.scram_user = ScramUser("outbox", secrets.token_hex(12))
        self.cluster_id: str | None = None
        self.startup_seconds: float | None = None
        self.base_dir: Path | None = None
        self._libs: Path | None = None
        self._nodes: dict[int, _Node] = {}
        self._dir_watchdog: Watchdog | None = None

    # -- addresses

    @property
    def node_ids(self) -> list[int]:
        return sorted(self._nodes)

    @property
    def bootstrap_servers(self) -> str:
        return ",".join(f"{self.host}:{n.plaintext_port}" for n in self._ordered())

    @property
    def sasl_bootstrap_servers(self) -> str:
        return ",".join(f"{self.host}:{n.sasl_port}" for n in self._ordered())

    def sasl_client_config(self, mechanism: str = "SCRAM-SHA-512") -> dict[str, str]:
        """librdkafka settings for the SASL listener as the SCRAM user made at format time."""
        if mechanism not in SCRAM_MECHANISMS:
            raise ValueError(f"mechanism={mechanism!r}: the cluster offers {SCRAM_MECHANISMS}")
        return {
            "bootstrap.servers": self.sasl_bootstrap_servers,
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": mechanism,
            "sasl.username": self.scram_user.username,
            "sasl.password": self.scram_user.password,
        }

    def node_bootstrap(self, node_id: int) -> str:
        return f"{self.host}:{self._nodes[node_id].plaintext_port}"

    def log_path(self, node_id: int) -> Path:
        return self._nodes[node_id].log_path

    def running_nodes(self) -> list[int]:
        return [n.node_id for n in self._ordered() if n.running]

    # -- lifecycle

    def start(self) -> Self:
        """Fetch (once), format and start every node; wait until all brokers are registered."""
        if self._nodes:
            self.start_all()
            return self
        started = time.monotonic()
        self._libs = fetch_kafka(self.cache_dir, mvn=self.mvn)
        self._register_atexit()
        try:
            for attempt in range(1, 4):
                self._layout()
                self._format()
                for node in self._ordered():
                    self._spawn(node)
                try:
                    self._wait_brokers(set(self._nodes), time.monotonic() + self.startup_timeout)
                    break
                except EmbeddedServiceError:
                    if attempt < 3 and self._lost_port_race():
                        self._kill_and_forget()
                        continue
                    raise
        except BaseException:
            self.close()
            raise
        self.startup_seconds = time.monotonic() - started
        log.info(
            "Apache Kafka %s: %d nodes ready in %.1fs on %s",
            self.version,
            self.node_count,
            self.startup_seconds,
            self.bootstrap_servers,
        )
        return self

    def close(self) -> None:
        """SIGKILL every node (the data is thrown away anyway) and remove the files."""
        self._kill_and_forget()
        self._unregister_atexit()

    def _shut_down(self) -> None:
        self.close()

    def stop_node(self, node_id: int) -> None:
        """SIGTERM: a clean shutdown, the node hands its partition leaderships over first."""
        self._signal(self._nodes[node_id], signal.SIGTERM)

    def kill_node(self, node_id: int) -> None:
        """SIGKILL, as in a crash: in-flight requests and unflushed page cache state are cut."""
        self._signal(self._nodes[node_id], signal.SIGKILL)

    def start_node(self, node_id: int, *, wait: bool = True) -> None:
        """Start a stopped node on its old ports and data; wait until it is a live broker again."""
        node = self._nodes[node_id]
        if not node.running:
            self._spawn(node)
        if wait:
            self._wait_brokers({node_id}, time.monotonic() + self.startup_timeout)

    def stop_all(self) -> None:
        """SIGTERM every node at once (one at a time, the last would wait for a lost quorum)."""
        self._signal_all(signal.SIGTERM)

    def kill_all(self) -> None:
        self._signal_all(signal.SIGKILL)

    def start_all(self) -> None:
        for node in self._ordered():
            if not node.running:
                self._spawn(node)
        self._wait_brokers(set(self._nodes), time.monotonic() + self.startup_timeout)

    # -- internals

    def _ordered(self) -> list[_Node]:
        return [self._nodes[i] for i in sorted(self._nodes)]

    def _layout(self) -> None:
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="kafka-outbox-kafka-"))
            if not self.keep_files:
                self._dir_watchdog = Watchdog(rmtree=self.base_dir)
        self.cluster_id = _cluster_id()
        self._nodes = {}
        for node_id in range(1, self.node_count + 1):
            node_dir = self.base_dir / f"node-{node_id}"
            shutil.rmtree(node_dir, ignore_errors=True)
            node_dir.mkdir(parents=True)
            self._nodes[node_id] = _Node(node_id, free_port(), free_port(), free_port(), node_dir)
        for node in self._ordered():
            node.config_path.write_text(self._properties(node))
            (node.dir / "log4j2.properties").write_text(_LOG4J2.format(log_file=node.log_path))

    def _properties(self, node: _Node) -> str:
        voters = ",".join(f"{n.node_id}@{self.host}:{n.controller_port}" for n in self._ordered())
        rf = str(min(3, self.node_count))
        isr = str(min(2, self.node_count))
        jaas = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        settings = {
            "process.roles": "broker,controller",
            "node.id": str(node.node_id),
            "controller.quorum.voters": voters,
            "listeners": (
                f"PLAINTEXT://{self.host}:{node.plaintext_port},"
                f"SASL_PLAINTEXT://{self.host}:{node.sasl_port},"
                f"CONTROLLER://{self.host}:{node.controller_port}"
            ),
            "advertised.listeners": (
                f"PLAINTEXT://{self.host}:{node.plaintext_port},"
                f"SASL_PLAINTEXT://{self.host}:{node.sasl_port}"
            ),
            "listener.security.protocol.map": (
                "PLAINTEXT:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT,CONTROLLER:PLAINTEXT"
            ),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "sasl.enabled.mechanisms": ",".join(SCRAM_MECHANISMS),
            **{
                f"listener.name.sasl_plaintext.{m.lower()}.sasl.jaas.config": jaas
                for m in SCRAM_MECHANISMS
            },
            "log.dirs": str(node.dir / "data"),
            "auto.create.topics.enable": "false",
            "default.replication.factor": rf,
            "min.insync.replicas": isr,
            "offsets.topic.replication.factor": rf,
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": isr,
            "share.coordinator.state.topic.replication.factor": rf,
            "share.coordinator.state.topic.min.isr": isr,
            # Fewer internal partitions and threads: three JVMs share two cores.
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.num.partitions": "10",
            "num.network.threads": "2",
            "num.io.threads": "4",
            "background.threads": "4",
            "log.cleaner.dedupe.buffer.size": str(16 * 1024 * 1024),
            "group.initial.rebalance.delay.ms": "0",
            **self.broker_config,
        }
        return "".join(f"{k}={v}\n" for k, v in settings.items())

    def _java(self, node: _Node, main: str, *args: str) -> list[str]:
        assert self._libs is not None
        return [
            self.java,
            *self.jvm_options,
            f"-Dlog4j2.configurationFile={node.dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={node.dir}",
            "-cp",
            f"{self._libs}/*",
            main,
            *args,
        ]

    def _format(self) -> None:
        """kafka-storage format on every node at once, with the SCRAM user for both mechanisms."""
        assert self.cluster_id is not None
        user = self.scram_user
        scram = [
            arg
            for m in SCRAM_MECHANISMS
            for arg in ("--add-scram", f"{m}=[name={user.username},password={user.password}]")
        ]
        procs = []
        for node in self._ordered():
            cmd = self._java(
                node,
                _STORAGE_TOOL,
                "format",
                "--cluster-id",
                self.cluster_id,
                "--config",
                str(node.config_path),
                *scram,
            )
            with (node.dir / "format.log").open("wb") as out:
                procs.append((node, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)))
        for node, proc in procs:
            try:
                code = proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                code = -9
            if code != 0:
                raise KafkaUnavailableError(
                    f"formatting node {node.node_id} failed (exit {code}), java={self.java!r}\n"
                    f"{_log_tail(node.dir / 'format.log')}"
                )

    def _spawn(self, node: _Node) -> None:
        if node.process is not None:  # exited on its own: close its console, disarm its watchdog
            node.process.reap(time.monotonic())
        node.starts += 1
        node.process = ProcessGroup(
            self._java(node, _MAIN, str(node.config_path)),
            output=node.console_path,
            banner=f"--- kafka-outbox: start #{node.starts}\n",
        )

    def _wait_brokers(self, node_ids: set[int], deadline: float) -> None:
        """Until each node answers metadata for this cluster and is listed as a live broker."""
        last = "no metadata yet"
        while time.monotonic() < deadline:
            for node_id in sorted(node_ids):
                node = self._nodes[node_id]
                if not node.running:
                    code = None if node.process is None else node.process.proc.returncode
                    raise EmbeddedServiceError(
                        f"Kafka node {node_id} exited with code {code} while starting\n"
                        f"{_log_tail(node.console_path)}\n{_log_tail(node.log_path)}"
                    )
            pending = set(node_ids)
            for node_id in sorted(node_ids):
                admin = AdminClient(
                    {"bootstrap.servers": self.node_bootstrap(node_id)}, logger=_QUIET_LOGGER
                )
                try:
                    md = admin.list_topics(timeout=max(0.2, min(2.0, deadline - time.monotonic())))
                except KafkaException as exc:
                    last = f"node {node_id}: {exc}"
                    continue
                if md.cluster_id != self.cluster_id:
                    last = f"node {node_id}: port served by cluster {md.cluster_id}"
                    continue
                live = set(md.brokers)
                if not node_ids <= live:
                    last = f"live brokers {sorted(live)}, waiting for {sorted(node_ids)}"
                    continue
                pending.discard(node_id)
            if not pending:
                return
            _sleep_until_next_poll(deadline, 0.25)
        raise EmbeddedServiceError(
            f"Kafka nodes {sorted(node_ids)} not ready within {self.startup_timeout:.0f}s "
            f"({last})\n"
            + "\n".join(_log_tail(self._nodes[i].log_path, 15) for i in sorted(node_ids))
        )

    def _lost_port_race(self) -> bool:
        return any(
            "address already in use" in _log_tail(n.log_path).lower()
            or "address already in use" in _log_tail(n.console_path).lower()
            for n in self._ordered()
        )

    def _signal(self, node: _Node, sig: signal.Signals) -> None:
        self._signal_all(sig, [node])

    def _signal_all(self, sig: signal.Signals, nodes: Iterable[_Node] | None = None) -> None:
        """Signal the nodes (all by default) at once, then reap them within `stop_timeout`."""
        processes = [n.process for n in (self._ordered() if nodes is None else nodes)]
        for process in processes:
            if process is not None:
                process.send(sig)
        deadline = time.monotonic() + self.stop_timeout
        for process in processes:
            if process is not None:
                process.reap(deadline)

    def _kill_and_forget(self) -> None:
        self._signal_all(signal.SIGKILL)
        self._nodes = {}
        if self.base_dir is not None and not self.keep_files:
            shutil.rmtree(self.base_dir, ignore_errors=True)
            self.base_dir = None
            if self._dir_watchdog is not None:
                self._dir_watchdog.disarm()
                self._dir_watchdog = None


def create_topic(
    bootstrap_servers: str,
    name: str,
    partitions: int = 4,
    config: Mapping[str, str] | None = None,
    *,
    timeout: float = 30.0,
) -> str:
    """Create a topic at the cluster's default replication factor (an existing one is fine),
    then wait until every partition has a leader: with auto-create off, a client that asks
    a broker the new metadata has not reached yet would see UNKNOWN_TOPIC_OR_PART."""
    admin = AdminClient({"bootstrap.servers": bootstrap_servers}, logger=_QUIET_LOGGER)
    futures = admin.create_topics(
        [NewTopic(name, partitions, config=dict(config or {}))], operation_timeout=timeout
    )
    for future in futures.values():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
    deadline = time.monotonic() + timeout
    while True:
        md = admin.list_topics(name, timeout=5).topics.get(name)
        if (
            md is not None
            and md.error is None
            and len(md.partitions) == partitions
            and all(p.leader >= 0 for p in md.partitions.values())
        ):
            return name
        if time.monotonic() >= deadline:
            raise EmbeddedServiceError(f"topic {name!r} has no leader for every partition yet")
        _sleep_until_next_poll(deadline, 0.1)


def _cluster_id() -> str:
    """A KRaft cluster id: 16 random bytes, URL-safe base64 without padding (22 characters)."""
    return base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
