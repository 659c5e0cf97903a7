"""What a failure means for a slot: a batch's outcome turned into a plan. Pure, no I/O.

The worker hands in what happened (per-row errors from produce() and the delivery reports, and
the Kafka transaction's own error, if any) and executes the plan it gets back: which rows to
bury, which topics to hold back, where to narrow down to one row per batch, and which failure
ends the batch. The precedence across a batch is written once, in ``plan_batch``:

    fenced > configuration > fatal > topic/poison > request > transient

A fenced, refused or fatal producer ends the batch before anything is buried: a fenced or
fatal producer can send nothing more, so no record can be blamed, and a refused setting fails
every record alike. Topic holds, poison rows and a request-wide refusal are then all acted on;
a transient error among them still retries the batch. ``classify`` reads each error; this
module decides what the set of them means.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field, replace
from typing import Any

from confluent_kafka import KafkaError

from outbox.relay.classify import Verdict, classify, config_fix


class Act(enum.Enum):
    """How a batch (or a producer) failed, so what the worker does next."""

    FENCED = "fenced"  # another relay owns the transactional.id: give the slot up (SlotLost)
    REFUSE = "refuse"  # a setting or an ACL: stop the relay, naming the fix (ConfigError)
    REBUILD = "rebuild"  # the producer is unusable: drop it, retry with a new one
    RETRY = "retry"  # transient: retry the batch with backoff
    GIVE_UP = "give up"  # the producer cannot start now: give the slot up, take it again later


@dataclass(frozen=True)
class Failure:
    act: Act
    message: str


@dataclass(frozen=True)
class Hold:
    """A missing or unwritable topic: its rows are left out of claims for a while (I6)."""

    topic: str
    error: str


@dataclass(frozen=True)
class Narrow:
    """A request-wide refusal: send one row per batch up to ``until`` to find the one at
    fault, so only it is buried, in id order (I3, I6)."""

    until: int
    refused: int
    error: str


@dataclass(frozen=True)
class BatchPlan:
    """What the worker does about a batch that did not fully succeed."""

    failure: Failure | None = None  # raised once the rest is done
    bury: Mapping[int, str] = field(default_factory=dict)  # row id -> the reason it is dead
    hold: tuple[Hold, ...] = ()  # topics held back for now
    released: tuple[str, ...] = ()  # topics whose hold ran out: their rows are in ``bury``
    narrow: Narrow | None = None

    @property
    def drops_producer(self) -> bool:
        return self.failure is not None and self.failure.act is Act.REBUILD


STOPPERS: tuple[tuple[Verdict, Act], ...] = (
    (Verdict.FENCED, Act.FENCED),
    (Verdict.CONFIG, Act.REFUSE),
    (Verdict.FATAL, Act.REBUILD),
)
"""Verdicts that end a batch before any row is blamed, in precedence order."""

_TIMED_OUT = KafkaError._MSG_TIMED_OUT


def _text(err: Any) -> str:
    return f"{err.name()}: {err.str()}"


def timed_out_topics(rows: Sequence[tuple[int, str]], failures: Mapping[int, Any]) -> set[str]:
    """Topics whose records timed out: the worker asks the cluster's metadata whether they
    exist (a timeout for a missing topic is about the topic, not the network)."""
    topic = dict(rows)
    return {topic[i] for i, err in failures.items() if int(err.code()) == _TIMED_OUT}


def _stopper(verdict: Verdict, err: Any, tid: str) -> Failure:
    if verdict is Verdict.FENCED:
        return Failure(Act.FENCED, f"fenced: another relay took transactional.id {tid}")
    if verdict is Verdict.CONFIG:
        return Failure(Act.REFUSE, f"Kafka refused the relay: {config_fix(err)}")
    return Failure(Act.REBUILD, f"fatal producer error ({err}); building a new producer")


def plan_batch(
    rows: Sequence[tuple[int, str]],
    failures: Mapping[int, Any],
    *,
    missing: Set[str] = frozenset(),
    expired: Set[str] = frozenset(),
    hold_timeout: float = 0.0,
    batch_error: Any = None,
    tid: str = "",
) -> BatchPlan:
    """The plan for a batch: ``rows`` are its (id, topic) in id order, ``failures`` the
    per-row errors, ``missing`` the topics the cluster says are missing, ``expired`` the
    topics whose hold (``hold_timeout`` seconds, for the dead rows' reason) is up, and
    ``batch_error`` the error of the Kafka transaction itself, if it failed; ``tid`` the
    slot's transactional.id, named when it was fenced."""
    if batch_error is not None:
        verdict = classify(batch_error)
        if verdict in (Verdict.FENCED, Verdict.CONFIG):
            return BatchPlan(_stopper(verdict, batch_error, tid))
    topic_of = dict(rows)
    verdicts = {
        i: classify(e, alone=len(rows) == 1, topic_missing=topic_of[i] in missing)
        for i, e in failures.items()
    }
    first = {v: i for i, v in sorted(verdicts.items(), reverse=True)}  # verdict -> lowest id
    for verdict, _act in STOPPERS:
        if verdict in first:
            return BatchPlan(_stopper(verdict, failures[first[verdict]], tid))
    bury: dict[int, str] = {}
    holds: list[Hold] = []
    released: list[str] = []
    for topic in sorted({topic_of[i] for i, v in verdicts.items() if v is Verdict.TOPIC}):
        ids = [i for i, v in verdicts.items() if v is Verdict.TOPIC and topic_of[i] == topic]
        if topic in expired:
            released.append(topic)
            for i in ids:
                bury[i] = (
                    f"{_text(failures[i])}; topic {topic!r} was missing or not writable for "
                    f"--missing-topic-timeout={hold_timeout:g}s"
                )
        else:
            holds.append(Hold(topic, str(failures[ids[0]])))
    for i, v in verdicts.items():
        if v is Verdict.POISON:
            bury[i] = _text(failures[i])
    narrow = None
    if Verdict.REQUEST in first:
        refused = [i for i, v in verdicts.items() if v is Verdict.REQUEST]
        narrow = Narrow(max(refused), len(refused), str(failures[refused[0]]))
    failure = None
    if Verdict.TRANSIENT in first:
        transient = sum(v is Verdict.TRANSIENT for v in verdicts.values())
        failure = Failure(
            Act.RETRY, f"{transient} records failed: {failures[first[Verdict.TRANSIENT]]}"
        )
    plan = BatchPlan(failure, bury, tuple(holds), tuple(released), narrow)
    if batch_error is not None and failure is None:
        return replace(plan, failure=Failure(Act.RETRY, f"Kafka transaction failed: {batch_error}"))
    return plan


def plan_producer_error(err: Any, *, tid: str) -> Failure:
    """A fatal error librdkafka reported for the producer as a whole (``error_cb``)."""
    if classify(err) is Verdict.FENCED:
        return Failure(Act.FENCED, f"fenced: another relay took transactional.id {tid} ({err})")
    return Failure(Act.REBUILD, f"producer failed ({err}); building a new one")


def plan_start_error(err: Any, *, stopping: bool) -> Failure:
    """init_transactions failed: a setting is refused, the wait is retried, or the slot is
    given up (the relay is stopping, or the error will not pass by retrying)."""
    if classify(err) is Verdict.CONFIG:
        return Failure(Act.REFUSE, f"init_transactions: {config_fix(err)}")
    if stopping or not (err.retriable() or err.code() == KafkaError._TIMED_OUT):
        return Failure(Act.GIVE_UP, f"init_transactions failed: {err}")
    return Failure(Act.RETRY, f"init_transactions: {err}")


def plan_abort_error(err: Any) -> Failure:
    """abort_transaction failed: the producer goes either way; a fence loses the slot."""
    if classify(err) is Verdict.FENCED:
        return Failure(Act.FENCED, f"fenced while aborting: {err}")
    return Failure(Act.REBUILD, f"abort failed ({err})")
