"""How the relay reads librdkafka's errors: pure classification and decisions, no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from confluent_kafka import KafkaError, KafkaException


class Verdict(Enum):
    TRANSIENT = "transient"  # retry the batch with backoff
    POISON = "poison"  # this record can never be delivered: move it aside (I6)
    REQUEST = "request"  # refused for a whole request: narrow down to the rows at fault first
    TOPIC = "topic"  # the topic is missing or not writable: hold it for a bounded time
    FATAL = "fatal"  # the producer is unusable: build a new one
    FENCED = "fenced"  # another relay owns the transactional.id now: give the slot up
    CONFIG = "config"  # no retry can help until an operator fixes a setting or an ACL


# The one table: every librdkafka/broker error the relay acts on; any other is transient.
TABLE: Mapping[int, Verdict] = {
    # The record itself is wrong: no retry can fix it.
    KafkaError.TOPIC_EXCEPTION: Verdict.POISON,  # invalid topic name
    KafkaError.INVALID_RECORD: Verdict.POISON,  # e.g. a null key for a compacted topic
    KafkaError.INVALID_MSG: Verdict.POISON,
    KafkaError.INVALID_TIMESTAMP: Verdict.POISON,  # created_at outside the topic's window
    KafkaError._INVALID_ARG: Verdict.POISON,  # produce() refused the record's arguments
    KafkaError.POLICY_VIOLATION: Verdict.POISON,
    KafkaError.UNSUPPORTED_FOR_MESSAGE_FORMAT: Verdict.POISON,  # headers on an old topic
    # The broker refuses the whole per-partition request: a topic's max.message.bytes
    # below the producer's refuses innocent records of the same request too.
    KafkaError.MSG_SIZE_TOO_LARGE: Verdict.REQUEST,
    KafkaError.RECORD_LIST_TOO_LARGE: Verdict.REQUEST,
    # Missing topic (auto-create off) or not writable yet (ACLs propagate): retried for
    # --missing-topic-timeout while the other topics flow, then its rows are dead rows.
    KafkaError.UNKNOWN_TOPIC_OR_PART: Verdict.TOPIC,
    KafkaError._UNKNOWN_TOPIC: Verdict.TOPIC,
    KafkaError._UNKNOWN_PARTITION: Verdict.TOPIC,
    KafkaError.UNKNOWN_TOPIC_ID: Verdict.TOPIC,
    KafkaError.TOPIC_AUTHORIZATION_FAILED: Verdict.TOPIC,
    # Another relay took the transactional.id (I4).
    KafkaError._FENCED: Verdict.FENCED,
    KafkaError.PRODUCER_FENCED: Verdict.FENCED,
    KafkaError.INVALID_PRODUCER_EPOCH: Verdict.FENCED,
    # Settings, credentials, ACLs or a broker without the needed feature.
    KafkaError._AUTHENTICATION: Verdict.CONFIG,
    KafkaError.SASL_AUTHENTICATION_FAILED: Verdict.CONFIG,
    KafkaError._SSL: Verdict.CONFIG,
    KafkaError.SECURITY_DISABLED: Verdict.CONFIG,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED: Verdict.CONFIG,  # idempotent write ACL
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED: Verdict.CONFIG,
    KafkaError.INVALID_TRANSACTION_TIMEOUT: Verdict.CONFIG,
    KafkaError.INVALID_REQUIRED_ACKS: Verdict.CONFIG,
    KafkaError.INVALID_CONFIG: Verdict.CONFIG,
    KafkaError.UNSUPPORTED_VERSION: Verdict.CONFIG,
    KafkaError._UNSUPPORTED_FEATURE: Verdict.CONFIG,
    KafkaError._NOT_CONFIGURED: Verdict.CONFIG,
}

# What to tell the operator for a CONFIG verdict.
CONFIG_FIXES: Mapping[int, str] = {
    KafkaError._AUTHENTICATION: "check sasl.*/ssl.* in --producer-config",
    KafkaError.SASL_AUTHENTICATION_FAILED: "check sasl.username/sasl.password/sasl.mechanism",
    KafkaError._SSL: "check ssl.* (CA, certificate, key) in --producer-config",
    KafkaError.CLUSTER_AUTHORIZATION_FAILED: "grant the relay's principal IdempotentWrite",
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED: (
        "grant the relay's principal Write on TransactionalId <prefix>-*"
    ),
    KafkaError.INVALID_TRANSACTION_TIMEOUT: (
        "lower -X transaction.timeout.ms below the broker's transaction.max.timeout.ms"
    ),
    KafkaError.UNSUPPORTED_VERSION: (
        "this broker lacks a needed feature (transactions?): try --guarantee at-least-once"
    ),
    KafkaError._UNSUPPORTED_FEATURE: (
        "this broker lacks a needed feature (transactions?): try --guarantee at-least-once"
    ),
}


def _error(err: Any) -> Any:
    if isinstance(err, KafkaException) and err.args:
        return err.args[0]
    return err


def classify(err: Any, *, alone: bool = False, topic_missing: bool = False) -> Verdict:
    """Map a ``KafkaError`` (or a ``KafkaException`` holding one) to the relay's next step.

    ``alone``: the error is about this record only (produce() raised it, or the
    record was sent in a request of its own), so a request-wide refusal is its own:
    poison. ``topic_missing``: the relay found the record's topic absent from the
    cluster's metadata, so a delivery timeout means the topic, not the network.

    Precedence: fenced, then configuration (a rebuilt producer would fail the
    same way), then fatal (a fatal producer can send nothing more, so no record
    can be blamed), then the table, then transient.
    """
    err = _error(err)
    code = err.code()
    verdict = TABLE.get(code, Verdict.TRANSIENT)
    if verdict in (Verdict.FENCED, Verdict.CONFIG):
        return verdict
    if err.fatal():
        return Verdict.FATAL
    if verdict is Verdict.REQUEST and alone:
        return Verdict.POISON
    if code == KafkaError._MSG_TIMED_OUT and topic_missing:
        return Verdict.TOPIC
    return verdict


def fenced(errors: Iterable[Any]) -> bool:
    """Whether any of ``errors`` says another producer took the transactional.id. Its
    transaction is then not this producer's to abort: the fencing init_transactions ended it,
    and an abort sent with the old epoch can go unanswered (Tansu 0.6 lets
    abort_transaction wait out its whole timeout)."""
    return any(classify(e) is Verdict.FENCED for e in errors)


def config_fix(err: Any) -> str:
    """One line for an operator: the error and what to change."""
    err = _error(err)
    fix = CONFIG_FIXES.get(err.code(), "check the relay's Kafka settings and ACLs")
    return f"{err.name()}: {err.str()}; {fix}"


def settled(rows: Iterable[tuple[int, str]], acked: Set[int], moved: Set[int]) -> list[int]:
    """Ids an at-least-once batch may delete: acknowledged by a delivery report, and no
    earlier row of the same topic is still to be sent again (per-key order, I3).

    ``rows`` are (id, topic) in id order; ``moved`` rows went to the dead table, so they
    hold nothing back. A row with neither report (the wait was cut short) holds its
    topic back like a failed one: its record may still be delivered, or not (I2).
    """
    blocked: set[str] = set()
    done: list[int] = []
    for row_id, topic in rows:
        if row_id in moved:
            continue
        if row_id in acked and topic not in blocked:
            done.append(row_id)
        elif row_id not in acked:
            blocked.add(topic)
    return done


@dataclass
class TopicHolds:
    """Topics that are missing or not writable, held back from the slot's claims.

    The rest of the slot keeps flowing: holding back every row of a topic keeps
    per-key order within it (I3), and rows of other topics share no partition with
    them. A held topic is tried again with backoff; once ``timeout`` seconds passed
    since its first failure, its failing rows become dead rows (I6). Pure: the caller
    passes the clock.
    """

    timeout: float
    first: dict[str, float] = field(default_factory=dict)
    until: dict[str, float] = field(default_factory=dict)
    tries: dict[str, int] = field(default_factory=dict)

    def failed(self, topic: str, now: float) -> bool:
        """Note a failure; True when the topic's time is up and its rows must be buried."""
        first = self.first.setdefault(topic, now)
        if now - first >= self.timeout:
            self.until.pop(topic, None)
            return True
        tries = self.tries[topic] = self.tries.get(topic, 0) + 1
        self.until[topic] = min(now + min(30.0, 0.25 * 2**tries), first + self.timeout)
        return False

    def due(self, topic: str, now: float) -> bool:
        """Whether a failure of ``topic`` now ends its hold: its failing rows are buried."""
        return now - self.first.get(topic, now) >= self.timeout

    def succeeded(self, topics: Iterable[str]) -> None:
        for topic in topics:
            if topic in self.first:
                self.first.pop(topic)
                self.until.pop(topic, None)
                self.tries.pop(topic, None)

    def held(self, now: float) -> list[str]:
        """Topics the next claim leaves out."""
        return sorted(t for t, until in self.until.items() if until > now)

    def next_try(self, now: float) -> float | None:
        """When the next held topic is tried again (``--once`` waits for it); None when none
        is held. A hold whose time is past holds nothing back and must not hide a live one."""
        return min((until for until in self.until.values() if until > now), default=None)


def reached(rows: Iterable[tuple[int, str]], acked: Set[int], failures: Set[int]) -> set[str]:
    """Topics the broker acknowledged a record of, in a batch that may have failed for other
    rows: they are there and writable, so their hold clocks start again (a hold timed from an
    older failure would bury their rows early, I6)."""
    failed = {topic for row_id, topic in rows if row_id in failures}
    return {topic for row_id, topic in rows if row_id in acked} - failed


def message_headers(msg: Any) -> dict[str, bytes]:
    """A consumed record's headers as ``{name: bytes}`` (the last value wins on repeats)."""
    raw = msg.headers() or []
    pairs: list[tuple[str, Any]] = list(raw.items() if isinstance(raw, dict) else raw)
    return {
        name: value if isinstance(value, bytes) else str(value or "").encode()
        for name, value in pairs
    }
