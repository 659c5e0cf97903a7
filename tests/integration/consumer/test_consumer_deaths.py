"""I10: a record that kills the consumer process cannot stall its partition forever.

``outbox consume`` runs in a subprocess; its handler ends the process on the spot
(``os._exit``, as the OOM killer or a crash in a C extension would) for one record.
The test starts it again each time it dies: the attempts written before each
handler run survive, and after ``RetryPolicy.attempts`` deaths on that record it is
dead-lettered (``dlt-reason: consumer-died``) while the records around it are applied
once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

from confluent_kafka import Producer
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from consumer import Event, IdempotentConsumer, RetryPolicy
from tests.support import consume_command, wait_for

REPO = Path(__file__).resolve().parents[3]
ATTEMPTS = 2


class KilledBy(IdempotentConsumer):
    """Run by the subprocess: ``{"kill": true}`` ends the process inside the handler."""

    topics: ClassVar[list[str]] = ["given-on-the-command-line"]
    group_id = "given-on-the-command-line"
    retry = RetryPolicy(attempts=ATTEMPTS, initial_backoff=0.01, max_backoff=0.05)

    def handle(self, session: Session, event: Event) -> None:
        session.execute(
            text("INSERT INTO effects (position) VALUES (:p)"),
            {"p": f"{event.topic}/{event.partition}/{event.offset}"},
        )
        if event.value.get("kill"):
            session.flush()  # the effect is written, uncommitted: it dies with the process
            os._exit(9)


def _launch(database_url: str, bootstrap_servers: str, topic: str, group: str, log: Path) -> Any:
    with log.open("ab") as out:
        return subprocess.Popen(
            consume_command(f"{__name__}:KilledBy", database_url, bootstrap_servers, topic, group),
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def _effects(engine: Engine) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(conn.execute(text("SELECT position FROM effects")).scalars())


def _dead_letters(engine: Engine, topic: str) -> list[dict[str, bytes]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT header_names, header_values FROM outbox_events WHERE topic = :t"),
            {"t": f"{topic}.DLT"},
        ).all()
    return [dict(zip(names, [bytes(v) for v in values], strict=True)) for names, values in rows]


def test_i10_a_record_that_kills_the_process_is_dead_lettered_after_n_deaths(
    engine: Engine, database_url: str, bootstrap_servers: str, topic: str, tmp_path: Path
) -> None:
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE effects (position text NOT NULL)"))
    producer = Producer({"bootstrap.servers": bootstrap_servers})
    for value in ({"n": 1}, {"kill": True}, {"n": 2}):
        producer.produce(
            topic,
            value=json.dumps(value).encode(),
            partition=0,
            headers=[("content-type", b"application/json")],
        )
    assert producer.flush(30) == 0
    group = f"deaths-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "consumer.log"

    def settled() -> bool:
        return len(_dead_letters(engine, topic)) == 1 and f"{topic}/0/2" in _effects(engine)

    deaths = 0
    proc = None
    for _ in range(ATTEMPTS + 3):
        proc = _launch(database_url, bootstrap_servers, topic, group, log)

        def died_or_settled(p: Any = proc) -> bool:
            return p.poll() is not None or settled()

        wait_for(
            died_or_settled,
            timeout=90,
            what="the consumer to die or to get past the killer record",
        )
        if proc.poll() is None:
            break
        assert proc.returncode == 9, log.read_text()
        deaths += 1
    assert proc is not None
    assert proc.poll() is None, log.read_text()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0, log.read_text()

    # One death in the batch (no attempt charged: it is not known which record did it),
    # then ATTEMPTS deaths on the record itself, one record at a time.
    assert deaths == 1 + ATTEMPTS, log.read_text()
    assert _effects(engine) == {f"{topic}/0/0": 1, f"{topic}/0/2": 1}
    (letter,) = _dead_letters(engine, topic)
    assert letter["dlt-reason"] == b"consumer-died"
    assert letter["dlt-original-offset"] == b"1"
    assert letter["dlt-attempts"] == str(ATTEMPTS).encode()
    assert letter["dlt-error-type"] == b"consumer.outcomes.ConsumerDied"
    assert "were being handled when a consumer stopped" in log.read_text()
