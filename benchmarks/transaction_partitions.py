"""What a Kafka transaction costs by the partitions it spans, on the broker alone.

``python -m benchmarks.transaction_partitions [--broker kafka|tansu] [--transactions 60]``
runs back-to-back transactions of one producer with the relay's settings (idempotent,
``acks=all``, ``linger.ms=5``) on a cluster nothing else uses, in four shapes, two rounds
each: one record on one partition (the latency floor's shape), the same plus a record on a
second topic's partition (the relay's marker), three records on three partitions plus the
marker (a relay batch of three keys), and three records on one partition. Per shape it
prints the time to the last acknowledgement (``flush``), the commit, and both, p50 / p95.
Set against ``latency_stages``, it tells what a relay transaction costs the broker from
what waiting for a core costs on a busy machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

SHAPES: dict[str, list[tuple[str, int]]] = {
    "1 record, 1 partition": [("events", 0)],
    "1 record + marker partition": [("events", 0), ("markers", 0)],
    "3 partitions + marker": [("events", 0), ("events", 1), ("events", 2), ("markers", 0)],
    "3 records, 1 partition": [("events", 0)] * 3,
}


def percentiles(samples: Sequence[float]) -> str:
    """``p50/p95`` in milliseconds."""
    ordered = sorted(samples)
    return f"{statistics.median(ordered):6.1f}/{ordered[int(len(ordered) * 0.95)]:6.1f}"


@contextmanager
def broker(name: str) -> Iterator[str]:
    """Bootstrap servers of a fresh broker of this kind, stopped afterwards."""
    if name == "kafka":
        from outbox.embedded.kafka_cluster import KafkaCluster

        with KafkaCluster() as cluster:
            yield cluster.bootstrap_servers
    else:
        from outbox.embedded.servers import EmbeddedBroker

        with EmbeddedBroker() as tansu:
            yield tansu.bootstrap_servers


def run(bootstrap_servers: str, transactions: int) -> list[str]:
    """One line per shape and round."""
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    replicas = min(3, len(admin.list_topics(timeout=30).brokers))
    for future in admin.create_topics(
        [NewTopic("events", 6, replicas), NewTopic("markers", 1, replicas)]
    ).values():
        future.result()
    producer = Producer(
        {
            "bootstrap.servers": bootstrap_servers,
            "transactional.id": f"bench-partitions-{uuid.uuid4().hex[:8]}",
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
        }
    )
    producer.init_transactions(60)
    lines = []
    for round_ in range(2):
        for shape, targets in SHAPES.items():
            acked, committed, total = [], [], []
            for _ in range(transactions):
                start = time.perf_counter()
                producer.begin_transaction()
                for topic, partition in targets:
                    producer.produce(topic, b"x" * 100, partition=partition)
                producer.flush(30)
                flushed = time.perf_counter()
                producer.commit_transaction(30)
                done = time.perf_counter()
                acked.append((flushed - start) * 1000)
                committed.append((done - flushed) * 1000)
                total.append((done - start) * 1000)
            lines.append(
                f"round {round_} {shape:28s} acked {percentiles(acked)}  "
                f"commit {percentiles(committed)}  both {percentiles(total)} ms (p50/p95)"
            )
            print(lines[-1], flush=True)
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.transaction_partitions")
    parser.add_argument("--broker", choices=["kafka", "tansu"], default="kafka")
    parser.add_argument("--transactions", type=int, default=60, help="per shape and round")
    args = parser.parse_args(argv)
    with broker(args.broker) as servers:
        run(servers, args.transactions)


if __name__ == "__main__":
    main()
