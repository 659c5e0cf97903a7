"""Does Tansu's last stable offset stick below committed transactions?

``python -m tests.probes.tansu_stable_offset [PRODUCERS] [TRANSACTIONS] [RUNS]`` starts an
embedded Tansu, lets PRODUCERS plain confluent-kafka transactional producers commit
TRANSACTIONS transactions of 4 records each to one 4-partition topic at once, and then reads the
topic read_committed and read_uncommitted. A record every commit_transaction acknowledged but
a read_committed reader cannot reach (read again for 30 s) sits past a stuck last stable
offset. ``KafkaReader.read_every`` (tests/support.py) reads read_uncommitted on Tansu for this.
"""

from __future__ import annotations

import sys
import threading
import uuid

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from outbox.embedded import EmbeddedBroker
from tests.support import TopicReadError, read_topic


def _commit_all(bootstrap: str, topic: str, producer: int, transactions: int) -> list[bytes]:
    p = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"{topic}-{producer}"})
    p.init_transactions(30)
    values = []
    for t in range(transactions):
        p.begin_transaction()
        batch = [f"{producer}-{t}-{k}".encode() for k in range(4)]
        for k, value in enumerate(batch):
            p.produce(topic, value, key=f"{producer}-{t}-{k}".encode())
        p.commit_transaction(30)
        values += batch
    return values


def _unreadable(bootstrap: str, topic: str, committed: set[bytes], isolation: str) -> int:
    try:
        records = read_topic(
            bootstrap, topic, expected=len(committed), timeout=30, isolation_level=isolation
        )
    except TopicReadError:  # a partition not read to its end: count what was read
        return len(committed)
    return len(committed - {r.value for r in records})


def probe(bootstrap: str, producers: int, transactions: int) -> tuple[int, int, int]:
    """(committed, unreadable read_committed, unreadable read_uncommitted)."""
    topic = f"probe-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, 4, 1)])[topic].result(30)
    committed: set[bytes] = set()
    lock = threading.Lock()

    def run(i: int) -> None:
        values = _commit_all(bootstrap, topic, i, transactions)
        with lock:
            committed.update(values)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(producers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return (
        len(committed),
        _unreadable(bootstrap, topic, committed, "read_committed"),
        _unreadable(bootstrap, topic, committed, "read_uncommitted"),
    )


def main(argv: list[str]) -> int:
    producers, transactions, runs = (int(a) for a in (argv + ["17", "3", "6"][len(argv) :]))
    stuck = 0
    with EmbeddedBroker() as broker:
        for run in range(runs):
            committed, hidden, lost = probe(broker.bootstrap_servers, producers, transactions)
            stuck += hidden > 0
            print(
                f"run {run + 1}: {committed} records committed by {producers} producers; "
                f"unreadable read_committed: {hidden}, read_uncommitted: {lost}",
                flush=True,
            )
    print(f"{stuck} of {runs} runs left committed records past the last stable offset")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1 : 3 + 1]))
