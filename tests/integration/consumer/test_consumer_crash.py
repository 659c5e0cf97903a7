"""I5 across real crashes: ``outbox consume`` in a subprocess, killed with SIGKILL mid-flight.

The consumer class below is what the subprocess runs (``outbox consume
tests.integration.consumer.test_consumer_crash:CrashingProjector``). It writes one
effect row per event and publishes one downstream event through the outbox,
and, when told to by ``CONSUMER_TEST_CRASH``, parks itself at the crash point
after touching a flag file; the test then SIGKILLs it there:

- ``after-db-commit``: in ``on_committed``, i.e. after the DB transaction
  committed and before the Kafka offsets are committed;
- ``in-handler``: inside ``handle``, after the writes, before the DB commit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
from confluent_kafka import Consumer, TopicPartition
from sqlalchemy import Engine, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from consumer import Event, IdempotentConsumer
from outbox import apublish, publish
from tests.support import KafkaReader, consume_command, wait_for

REPO = Path(__file__).resolve().parents[3]
EVENTS = 5


class CrashingProjector(IdempotentConsumer):
    """Run by the subprocess; configured through CONSUMER_TEST_* variables (test code only)."""

    topics: ClassVar[list[str]] = ["given-on-the-command-line"]
    group_id = "given-on-the-command-line"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.crash = os.environ.get("CONSUMER_TEST_CRASH", "")
        self.flag = Path(os.environ.get("CONSUMER_TEST_FLAG", "/nonexistent"))
        self.downstream = os.environ["CONSUMER_TEST_DOWNSTREAM"]

    def handle(self, session: Session, event: Event) -> None:
        session.execute(
            text("INSERT INTO effects (event_id, pid) VALUES (:e, :pid)"),
            {"e": event.id, "pid": os.getpid()},
        )
        publish(session, topic=self.downstream, key=event.key, value={"source": event.id})
        if self.crash == "in-handler":
            self._park()

    def on_committed(self, events: Sequence[Event]) -> None:
        if self.crash == "after-db-commit":
            self._park()

    def _park(self) -> None:
        """Wait here for the test's SIGKILL (and give up on our own if it never comes)."""
        self.flag.write_text(str(os.getpid()))
        threading.Event().wait(120)
        os._exit(3)


class AsyncCrashingProjector(CrashingProjector):
    """The same projector with an ``async def handle`` (an AsyncSession, ``apublish``)."""

    async def handle(self, session: AsyncSession, event: Event) -> None:  # type: ignore[override]
        await session.execute(
            text("INSERT INTO effects (event_id, pid) VALUES (:e, :pid)"),
            {"e": event.id, "pid": os.getpid()},
        )
        await apublish(session, topic=self.downstream, key=event.key, value={"source": event.id})
        if self.crash == "in-handler":
            self._park()


class Subprocess:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    def output(self) -> str:
        return self.log.read_text()


@pytest.fixture
def launch(
    database_url: str, bootstrap_servers: str, tmp_path: Path
) -> Iterator[Callable[..., Subprocess]]:
    started: list[Subprocess] = []

    def start(
        topic: str, group: str, downstream: str, crash: str = "", cls: str = "CrashingProjector"
    ) -> Subprocess:
        log = tmp_path / f"consumer-{len(started)}.log"
        env = os.environ | {
            "CONSUMER_TEST_CRASH": crash,
            "CONSUMER_TEST_FLAG": str(tmp_path / "parked"),
            "CONSUMER_TEST_DOWNSTREAM": downstream,
        }
        with log.open("wb") as out:
            proc = subprocess.Popen(
                consume_command(
                    f"{__name__}:{cls}",
                    database_url,
                    bootstrap_servers,
                    topic,
                    group,
                    "--log-level",
                    "INFO",
                ),
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        handle = Subprocess(proc, log)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        if handle.proc.poll() is None:
            handle.proc.kill()
            handle.proc.wait(10)


@pytest.fixture
def effects(engine: Engine) -> Engine:
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE effects (event_id text NOT NULL, pid int NOT NULL)"))
    return engine


def _effects(engine: Engine) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(conn.execute(text("SELECT event_id FROM effects")).scalars())


def _committed(bootstrap_servers: str, group: str, topic: str, partition: int) -> int:
    reader = Consumer({"bootstrap.servers": bootstrap_servers, "group.id": group})
    try:
        (tp,) = reader.committed([TopicPartition(topic, partition)], timeout=10)
        return int(tp.offset)
    finally:
        reader.close()


def _inputs(engine: Engine, topic: str, drain: Callable[..., Any], kafka: KafkaReader) -> list[Any]:
    with Session(engine) as session, session.begin():
        for i in range(EVENTS):
            publish(session, topic=topic, key="one-partition", value={"n": i})
    drain()
    records = kafka.read(topic, EVENTS)
    assert len(records) == EVENTS
    return records


def _kill_when_parked(proc: Subprocess, flag: Path) -> None:
    wait_for(
        lambda: flag.exists() or proc.proc.poll() is not None,
        timeout=60,
        what="the consumer to reach its crash point",
    )
    assert proc.proc.poll() is None, proc.output()
    proc.proc.send_signal(signal.SIGKILL)
    assert proc.proc.wait(10) == -signal.SIGKILL
    flag.unlink()


def _finish_gracefully(
    proc: Subprocess, bootstrap_servers: str, group: str, topic: str, records: list[Any]
) -> str:
    """Wait until the restarted consumer committed offsets past every input, then SIGTERM it."""
    last = records[-1]
    wait_for(
        lambda: (
            proc.proc.poll() is not None
            or _committed(bootstrap_servers, group, topic, last.partition) == last.offset + 1
        ),
        timeout=90,
        what="the restarted consumer to commit past every input",
    )
    assert proc.proc.poll() is None, proc.output()
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(30) == 0, proc.output()  # graceful shutdown on SIGTERM
    return proc.output()


def _downstream_sources(kafka: KafkaReader, downstream: str, expected: int) -> Counter[str]:
    import json

    records = kafka.read(downstream, expected, timeout=20)
    return Counter(json.loads(r.value or b"null")["source"] for r in records)


def test_i5_sigkill_after_db_commit_before_offset_commit_rereads_and_skips(
    effects: Engine,
    bootstrap_servers: str,
    topic: str,
    drain: Callable[..., Any],
    kafka: KafkaReader,
    launch: Callable[..., Subprocess],
    make_topic: Callable[..., str],
    tmp_path: Path,
) -> None:
    group = f"crash-{uuid.uuid4().hex[:8]}"
    downstream = make_topic(f"{topic}.out")
    records = _inputs(effects, topic, drain, kafka)
    inputs = [r.event_id for r in records]

    first = launch(topic, group, downstream, crash="after-db-commit")
    _kill_when_parked(first, tmp_path / "parked")
    applied = _effects(effects)
    assert applied  # the DB transaction committed ...
    assert set(applied.values()) == {1}
    assert _committed(bootstrap_servers, group, topic, records[0].partition) < 0  # ... no offset
    drain()  # the relay publishes what the crashed consumer committed

    second = launch(topic, group, downstream)
    log = _finish_gracefully(second, bootstrap_servers, group, topic, records)
    skipped = len(applied)
    assert (
        f"stopped: {EVENTS - skipped} applied, {skipped} duplicates skipped, 0 dead-lettered" in log
    ), log
    assert _effects(effects) == dict.fromkeys(inputs, 1)
    drain()
    assert _downstream_sources(kafka, downstream, EVENTS) == dict.fromkeys(inputs, 1)


def test_i5_sigkill_inside_the_handler_leaves_nothing_and_restart_publishes_once(
    effects: Engine,
    bootstrap_servers: str,
    topic: str,
    drain: Callable[..., Any],
    kafka: KafkaReader,
    launch: Callable[..., Subprocess],
    make_topic: Callable[..., str],
    tmp_path: Path,
) -> None:
    """A handler that publishes through the outbox: one downstream event per input, crash or not."""
    group = f"crash-{uuid.uuid4().hex[:8]}"
    downstream = make_topic(f"{topic}.out")
    records = _inputs(effects, topic, drain, kafka)
    inputs = [r.event_id for r in records]

    first = launch(topic, group, downstream, crash="in-handler")
    _kill_when_parked(first, tmp_path / "parked")
    assert _effects(effects) == {}  # the killed transaction rolled back: no effect, no outbox row
    with effects.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM outbox_events")).scalar_one() == 0

    second = launch(topic, group, downstream)
    log = _finish_gracefully(second, bootstrap_servers, group, topic, records)
    assert f"stopped: {EVENTS} applied, 0 duplicates skipped" in log, log
    assert _effects(effects) == dict.fromkeys(inputs, 1)
    drain()
    assert _downstream_sources(kafka, downstream, EVENTS) == dict.fromkeys(inputs, 1)


@pytest.mark.parametrize("crash", ["in-handler", "after-db-commit"])
def test_i11_an_async_projector_run_by_outbox_consume_applies_every_event_once_across_sigkill(
    effects: Engine,
    bootstrap_servers: str,
    topic: str,
    drain: Callable[..., Any],
    kafka: KafkaReader,
    launch: Callable[..., Subprocess],
    make_topic: Callable[..., str],
    tmp_path: Path,
    crash: str,
) -> None:
    group = f"crash-{uuid.uuid4().hex[:8]}"
    downstream = make_topic(f"{topic}.out")
    records = _inputs(effects, topic, drain, kafka)
    inputs = [r.event_id for r in records]

    first = launch(topic, group, downstream, crash=crash, cls="AsyncCrashingProjector")
    _kill_when_parked(first, tmp_path / "parked")
    drain()
    second = launch(topic, group, downstream, cls="AsyncCrashingProjector")
    _finish_gracefully(second, bootstrap_servers, group, topic, records)
    assert _effects(effects) == dict.fromkeys(inputs, 1)
    drain()
    assert _downstream_sources(kafka, downstream, EVENTS) == dict.fromkeys(inputs, 1)
