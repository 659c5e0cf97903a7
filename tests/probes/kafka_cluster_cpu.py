"""How much CPU does the embedded 3-node Apache Kafka cluster burn, and with which JVM options?

``python -m tests.probes.kafka_cluster_cpu [JVM OPTION ...]`` starts the cluster with
``DEFAULT_JVM_OPTIONS`` plus the options given, and prints the CPU seconds its three JVMs
spent starting, idling for 30 s, and on 300 transactions of 3 records (acks=all). Given
``-XX:TieredStopAtLevel=1`` (C1 only), it chose ``TEST_JVM_OPTIONS``: the suite's machine has
two cores, and what the JVMs do not burn, the tests get. Run each variant a few times: the
wall times are noisy.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

from confluent_kafka import Producer

from outbox.embedded.kafka_cluster import DEFAULT_JVM_OPTIONS, KafkaCluster, create_topic


def _cpu_seconds(pids: Sequence[int]) -> float:
    """User plus system time of ``pids`` (fields 14 and 15 of /proc/PID/stat)."""
    ticks = 0
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _jvms() -> list[int]:
    """The pids of java processes on this machine that are children of this one."""
    me = str(os.getpid())
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        parent = text.rsplit(")", 1)[1].split()[1]
        if name == "java" and parent == me:
            found.append(int(stat.parent.name))
    return found


def main(extra: Sequence[str]) -> None:
    began = time.monotonic()
    with KafkaCluster(jvm_options=(*DEFAULT_JVM_OPTIONS, *extra)) as cluster:
        started = time.monotonic() - began
        pids = _jvms()
        at_start = _cpu_seconds(pids)
        time.sleep(30)  # the measured idle period itself, not a synchronisation
        after_idle = _cpu_seconds(pids)
        topic = f"cpu-{uuid.uuid4().hex[:8]}"
        create_topic(cluster.bootstrap_servers, topic, partitions=3)
        producer = Producer(
            {
                "bootstrap.servers": cluster.bootstrap_servers,
                "transactional.id": f"{topic}-probe",
                "acks": "all",
            }
        )
        producer.init_transactions(60)
        began = time.monotonic()
        for _ in range(300):
            producer.begin_transaction()
            for key in ("a", "b", "c"):
                producer.produce(topic, b"v" * 100, key=key)
            producer.commit_transaction(60)
        worked = time.monotonic() - began
        after_work = _cpu_seconds(pids)
    print(
        f"options {list(extra)}, {len(pids)} JVMs: "
        f"started in {started:.1f} s using {at_start:.1f} CPU-s; "
        f"30 s idle {after_idle - at_start:.1f} CPU-s; "
        f"300 transactions in {worked:.1f} s using {after_work - after_idle:.1f} CPU-s"
    )


if __name__ == "__main__":
    main(sys.argv[1:])
