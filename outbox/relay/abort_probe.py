"""Does this broker hide aborted transactions from ``read_committed`` readers? (I2, I4)

Apache Kafka does; Tansu 0.6 shows them to every reader. The answer decides when a slot may
send its recovery marker: with the batch's records where aborts are hidden (an aborted marker
is then as invisible as the records it names), only after every record is acknowledged where
they are not (a visible marker must never name a record that did not land). On a 3-node
Apache Kafka cluster the second order costs each batch a replicated round trip after the flush
(benchmarks/latency_stages.py).

The probe is one aborted transaction holding one empty record under a key no marker uses,
read back ``read_committed``. Anything short of a clear answer counts as "not hidden" for
the marker's order (the safe one), and as "not known to be shown" for recovery, which reads
past a stable offset that never moves only where aborts are known to be shown (Tansu 0.6,
``marker_reader.HeldBack``).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from outbox.logs import librdkafka_logger
from outbox.relay.unmask import unmasked

PROBE_KEY_SUFFIX = b":abort-probe"
"""Appended to the slot's transactional id: never a marker's key, so recovery skips it and
compaction never lets it shadow a marker."""


UNSURE_FOR = 600.0
"""Seconds a cluster that gave no clear answer is not asked again: each new producer (every
takeover or restart of a slot) would otherwise wait out the probe's whole timeout, and the
safe order used meanwhile is correct on every broker."""

_ANSWERS: dict[str, bool] = {}
_UNSURE: dict[str, float] = {}  # cluster -> monotonic time until which it is not asked
_ANSWERS_LOCK = threading.Lock()


def aborts_hidden(
    producer: Any,
    connection: Mapping[str, str],
    topic: str,
    partition: int,
    key: bytes,
    *,
    timeout: float = 30.0,
    remember_as: str | None = None,
) -> bool | None:
    """Abort a transaction holding one empty record on ``topic``/``partition`` and read it back:
    True where aborted records are hidden, False where they are shown, None without a clear
    answer (which callers treat as shown for the marker's order, and as unknown otherwise).

    ``producer`` is a transactional producer with no transaction open (its
    ``init_transactions`` done); the probe's transaction is always aborted before this
    returns or raises (I12). Raises ``KafkaException`` when the broker refused the probe.
    With ``remember_as`` (the bootstrap servers), a clear answer is kept for the process, per
    cluster found there (its id, one metadata request): a slot taken over again starts
    without a probe.
    """
    if remember_as is not None:
        # The answer is the cluster's, not the address's: another cluster can answer behind
        # the same bootstrap servers (a DNS name or load balancer switched, a dev broker
        # restarted on the same port), and an answer kept from Apache Kafka would send the
        # marker with the records on a broker that shows aborted transactions (I2).
        remember_as = _cluster_key(producer, topic, remember_as, timeout)
    if remember_as is not None:
        with _ANSWERS_LOCK:
            if remember_as in _ANSWERS:
                return _ANSWERS[remember_as]
            if _UNSURE.get(remember_as, 0.0) > time.monotonic():
                return None
    hidden = _probe(producer, connection, topic, partition, key, timeout)
    if remember_as is not None:
        with _ANSWERS_LOCK:
            if hidden is None:
                _UNSURE[remember_as] = time.monotonic() + UNSURE_FOR
            else:
                _ANSWERS[remember_as] = hidden
    return hidden


def _cluster_key(producer: Any, topic: str, address: str, timeout: float) -> str | None:
    """``address`` and the id of the cluster the producer reaches there now; None (ask the
    broker, keep nothing) when its metadata cannot be had."""
    try:
        metadata = producer.list_topics(topic, timeout=timeout)
    except KafkaException:
        return None
    return f"{address} (cluster {getattr(metadata, 'cluster_id', None)})"


def _probe(
    producer: Any,
    connection: Mapping[str, str],
    topic: str,
    partition: int,
    key: bytes,
    timeout: float,
) -> bool | None:
    """True: hidden; False: shown; None: no clear answer."""
    offsets: list[int] = []

    def delivered(err: KafkaError | None, msg: Message) -> None:
        offset = msg.offset()
        if err is None and offset is not None and offset >= 0:  # < 0: no offset reported
            offsets.append(offset)

    producer.begin_transaction()
    try:
        producer.produce(
            topic, key=key + PROBE_KEY_SUFFIX, value=b"", partition=partition, on_delivery=delivered
        )
        with unmasked():
            producer.flush(timeout)
    finally:
        with unmasked():
            producer.abort_transaction(timeout)
    if not offsets:
        return None
    visible = _visible(connection, topic, partition, offsets[0], timeout)
    return None if visible is None else not visible


def _visible(
    connection: Mapping[str, str], topic: str, partition: int, offset: int, timeout: float
) -> bool | None:
    """Whether a ``read_committed`` reader gets the record at ``offset``; None if unsure.

    Hidden means the reader moved past it: the abort's control record is written after
    ``abort_transaction`` returns, and until then the reader only waits at ``offset``.
    """
    consumer = Consumer(
        {
            **connection,
            "group.id": f"outbox-abort-probe-{uuid.uuid4().hex}",
            "isolation.level": "read_committed",
            "enable.auto.commit": "false",
            "enable.partition.eof": "true",
            "fetch.wait.max.ms": "10",
            "logger": librdkafka_logger(),
        }
    )
    tp = TopicPartition(topic, partition, offset)
    try:
        consumer.assign([tp])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = consumer.poll(0.1)
            if msg is None:
                continue
            err = msg.error()
            if err is None:
                return int(msg.offset() or 0) <= offset
            if err.code() != KafkaError._PARTITION_EOF:
                return None
            [where] = consumer.position([TopicPartition(topic, partition)])
            if where.offset > offset:
                return False
        return None
    finally:
        consumer.close()
