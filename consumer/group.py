"""The runner's membership of its consumer group: fetching, offsets, rebalances, waits (I5, I10).

Rebalance callbacks only run inside ``consume()``/``close()``: the revoke callback commits
what is still pending for the revoked partitions, and records of theirs fetched by an earlier
``consume()`` of the same batch are dropped before anything is applied (``owned``), so nothing
of a revoked partition is processed or committed after the revoke (I10).

Three seams, for tests and tools (never needed by a handler): ``fetch`` replaces how one batch
is fetched (it gets the librdkafka consumer and the default fetch), ``commit`` sends offsets
(one returning None stands for commits that never land, as when a rebalance refuses them),
and ``listeners`` are told after each assignment, revoke or loss, once the member's own
bookkeeping is done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from consumer.config import ConsumerConfig
from consumer.event import Record
from consumer.stats import ConsumerStats
from consumer.throttle import ThrottledLog
from outbox.db import redact
from outbox.errors import ConfigError

log = logging.getLogger("outbox.consumer")

_REFUSED_CREDENTIALS = frozenset(
    {KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED, KafkaError._SSL}
)
"""librdkafka errors that say the cluster refuses who we are: retrying cannot help."""


class Stopped(Exception):
    """Stop was requested while waiting; the record in hand is left for the next run."""


class RebalanceListener(Protocol):
    """Told after the member updated its assignment (inside ``consume()``, in its thread)."""

    def assigned(self, partitions: list[TopicPartition]) -> None: ...

    def revoked(self, partitions: list[TopicPartition]) -> None: ...


Fetch = Callable[[Any, Callable[[], list[Any]]], list[Any]]
"""``fetch(kafka, default)``: the messages of one batch; ``default()`` is the runner's own."""

Commit = Callable[[Any, list[TopicPartition]], "list[TopicPartition] | None"]
"""``commit(kafka, offsets)``: commit synchronously; the per-partition results, or None."""


def commit_now(kafka: Any, offsets: list[TopicPartition]) -> list[TopicPartition] | None:
    """The default ``commit``: librdkafka's synchronous commit."""
    result: list[TopicPartition] | None = kafka.commit(offsets=offsets, asynchronous=False)
    return result


class GroupMember:
    """The librdkafka consumer of one runner and what it owns: assignment, pending offsets."""

    def __init__(self, config: ConsumerConfig, stop: threading.Event, stats: ConsumerStats) -> None:
        self.config = config
        self.stop = stop
        self.stats = stats
        self.kafka: Any = None
        self.assignment: frozenset[tuple[str, int]] = frozenset()
        self.joined = False
        self.pending: dict[tuple[str, int], int] = {}
        self.fetch: Fetch | None = None
        self.commit: Commit = commit_now
        self.listeners: list[RebalanceListener] = []
        self.refused: ConfigError | None = None  # credentials the cluster refuses (I8)
        self.waiting_since: float | None = None  # a record waits, its partitions paused
        # A broker outage: one line per backoff step, not one per failed connection.
        self.librdkafka_log = ThrottledLog(logging.getLogger("outbox.librdkafka"))
        self.kafka_errors = ThrottledLog(log)

    def subscribe(self) -> None:
        self.kafka.subscribe(
            list(self.config.topics),
            on_assign=self._on_assign,
            on_revoke=self._on_revoke,
            on_lost=self._on_lost,
        )

    def readiness(self) -> tuple[bool, str]:
        """Ready once it joined its group (a member may legitimately own no partition)."""
        if self.kafka is None or not self.joined:
            return False, "joining the consumer group"
        return True, f"assigned {len(self.assignment)} partitions"

    def lag(self) -> dict[tuple[str, int], int]:
        """Records behind per assigned partition, from librdkafka's cached watermarks."""
        kafka = self.kafka
        if kafka is None:
            return {}
        out: dict[tuple[str, int], int] = {}
        try:
            for tp in kafka.position([TopicPartition(t, p) for t, p in self.assignment]):
                _low, high = kafka.get_watermark_offsets(tp, cached=True)
                if tp.offset >= 0 and high >= 0:
                    out[(tp.topic, tp.partition)] = max(0, high - tp.offset)
        except Exception:
            return out
        return out

    # -- fetching ----------------------------------------------------------------------

    def next_records(self) -> list[Record]:
        """The next batch's records of partitions this member still owns."""
        if self.fetch is not None:
            messages = self.fetch(self.kafka, self._next_batch)
        else:
            messages = self._next_batch()
        return self._owned(self._records(messages))

    def _next_batch(self) -> list[Any]:
        """Up to batch_size records, waiting only for the first one.

        librdkafka's consume(n, timeout) waits until n records arrived or the timeout ran
        out: at a low rate every record would wait for a batch that never fills. The rest of
        the batch is what librdkafka already fetched; batches still grow by themselves when
        the handler falls behind (records queue while a batch is applied), so waiting for
        more would only delay the records in hand when the consumer keeps up.
        """
        size = self.config.batch_size
        messages: list[Any] = self.kafka.consume(num_messages=size, timeout=0)
        if not messages:
            messages = self.kafka.consume(num_messages=1, timeout=self.config.poll_timeout)
            if messages and size > 1:
                messages += self.kafka.consume(num_messages=size - 1, timeout=0)
        return messages

    def _records(self, messages: Sequence[Any]) -> list[Record]:
        records = []
        for msg in messages:
            err = msg.error()
            if err is None:
                records.append(Record.from_kafka(msg))
            elif err.fatal():
                raise KafkaException(err)
            elif err.code() != KafkaError._PARTITION_EOF:
                self.kafka_errors.log(logging.WARNING, "kafka: %s", redact(str(err)))
        return records

    def _owned(self, records: list[Record]) -> list[Record]:
        """Only records of partitions still assigned: a revoke during one of the batch's
        consume() calls hands the others to another member, whose offsets ours would move
        backwards (I10). They are delivered again to whoever owns them now."""
        owned = [r for r in records if (r.topic, r.partition) in self.assignment]
        if len(owned) < len(records):
            log.info(
                "dropped %d fetched records of partitions revoked meanwhile",
                len(records) - len(owned),
            )
        return owned

    # -- waiting -----------------------------------------------------------------------

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise Stopped()

    def sleep(self, seconds: float) -> None:
        """Wait, polling Kafka with every assigned partition paused: the member keeps its
        place in the group (max.poll.interval.ms) however long a record waits (I10).

        A rebalance during the wait changes what "every assigned partition" is: partitions
        assigned meanwhile are paused by ``_on_assign`` and resumed here with the rest;
        partitions revoked or lost meanwhile are resumed by ``_forget``, since librdkafka
        keeps a pause across an unassign and would never fetch them again once assigned
        back."""
        kafka = self.kafka
        if kafka is None:
            if self.stop.wait(seconds):
                raise Stopped()
            return
        deadline = time.monotonic() + seconds
        self.waiting_since = self.waiting_since or time.monotonic()
        kafka.pause([TopicPartition(t, p) for t, p in self.assignment])
        try:
            while True:
                if self.stop.is_set():
                    raise Stopped()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                for msg in kafka.consume(num_messages=100, timeout=min(remaining, 0.5)):
                    if msg.error() is None:  # a partition assigned meanwhile: read it later
                        self._rewind(msg)
        finally:
            self.waiting_since = None
            if self.kafka is not None:
                self.kafka.resume([TopicPartition(t, p) for t, p in self.assignment])

    def _rewind(self, msg: Any) -> None:
        """A record fetched during a wait (of a partition assigned before ``_on_assign`` could
        pause it): read it again after the wait. Not one of a partition gone meanwhile: its
        pause would outlive the assignment."""
        if (msg.topic(), msg.partition()) not in self.assignment:
            return
        tp = TopicPartition(msg.topic(), msg.partition(), msg.offset())
        try:
            self.kafka.seek(tp)
            self.kafka.pause([tp])
        except KafkaException as exc:
            log.warning("cannot rewind %s/%d: %s", msg.topic(), msg.partition(), exc)

    # -- offsets and rebalances -----------------------------------------------------------

    def settled(self, record: Record) -> None:
        """The record's DB transaction committed: its offset is due (unless revoked: the new
        owner commits its own offsets)."""
        tp = (record.topic, record.partition)
        if tp in self.assignment:
            self.pending[tp] = max(self.pending.get(tp, 0), record.offset + 1)

    def commit_offsets(self, only: Sequence[Any] | None = None) -> None:
        """Commit the offsets of DB-committed records, synchronously (I5: after the DB commit)."""
        if self.kafka is None:
            return
        wanted = None if only is None else {(tp.topic, tp.partition) for tp in only}
        pending = {
            tp: offset for tp, offset in self.pending.items() if wanted is None or tp in wanted
        }
        if not pending:
            return
        offsets = [TopicPartition(t, p, o) for (t, p), o in pending.items()]
        try:
            result = self.commit(self.kafka, offsets)
        except KafkaException as exc:
            log.warning(
                "offset commit failed (%s); the events are recorded as processed, "
                "so a re-read skips them",
                exc.args[0],
            )
            return
        if result is None:
            return
        self.stats.offset_commits += 1
        for tp in result:
            key = (tp.topic, tp.partition)
            if tp.error is not None:
                log.warning("offset commit for %s/%d failed: %s", tp.topic, tp.partition, tp.error)
            elif self.pending.get(key) == tp.offset:
                del self.pending[key]

    def _on_assign(self, _consumer: Any, partitions: list[Any]) -> None:
        self.joined = True
        self.assignment = self.assignment | {(tp.topic, tp.partition) for tp in partitions}
        self._fetch_from(partitions)
        if self.assignment:
            log.info("assigned %s", _names(partitions))
        else:
            log.info(
                "assigned no partition (more members than partitions?); waiting for an assignment"
            )
        for listener in self.listeners:
            listener.assigned(partitions)

    def _on_revoke(self, _consumer: Any, partitions: list[Any]) -> None:
        """Commit what was applied of these partitions; fetched records of theirs still in
        hand are dropped by ``_owned`` (callbacks run inside consume())."""
        self.commit_offsets(only=partitions)
        self._forget(partitions)
        log.info("revoked %s", _names(partitions))
        for listener in self.listeners:
            listener.revoked(partitions)

    def _on_lost(self, _consumer: Any, partitions: list[Any]) -> None:
        """Someone else owns these now: their pending offsets cannot be committed (dedup covers)."""
        self._forget(partitions)
        log.warning("lost %s without a clean revoke", _names(partitions))
        for listener in self.listeners:
            listener.revoked(partitions)

    def _forget(self, partitions: list[Any]) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        self.assignment = self.assignment - gone
        for tp in gone:
            self.pending.pop(tp, None)
        if self.waiting_since is not None:  # sleep() paused them; its finally no longer sees them
            self._pause_resume(partitions, pause=False)

    def _fetch_from(self, partitions: list[Any]) -> None:
        """Newly assigned partitions are fetched, whatever pause librdkafka kept on them from
        an earlier assignment (it keeps the application's pause across unassign/assign);
        paused again while a record waits, so that ``sleep()`` resumes them with the rest."""
        self._pause_resume(partitions, pause=False)
        if self.waiting_since is not None:
            self._pause_resume(partitions, pause=True)

    def _pause_resume(self, partitions: list[Any], *, pause: bool) -> None:
        if self.kafka is None or not partitions:
            return
        tps = [TopicPartition(tp.topic, tp.partition) for tp in partitions]
        try:
            if pause:
                self.kafka.pause(tps)
            else:
                self.kafka.resume(tps)
        except KafkaException as exc:
            log.warning("cannot %s %s: %s", "pause" if pause else "resume", _names(partitions), exc)

    def on_kafka_error(self, err: Any) -> None:
        self.kafka_errors.log(logging.WARNING, "kafka: %s", redact(str(err)))
        if err.code() in _REFUSED_CREDENTIALS:  # no retry can help: stop, naming the fix
            self.refused = ConfigError(
                f"Kafka refused the consumer's credentials ({redact(err.str())}): check "
                "sasl.*/ssl.* in --consumer-config or -X"
            )


def _names(partitions: list[Any]) -> str:
    return ", ".join(f"{tp.topic}/{tp.partition}" for tp in partitions) or "nothing"
