"""I11 at the user's class: the loop lives in a runner apart from it, so a name the user gives
an attribute or method of their own (``config``, ``stats``, ``engine``, ``stop``, ``_process``,
...) never reaches the loop; every record is still applied once."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
from confluent_kafka import Producer
from sqlalchemy import Engine, text
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from consumer import ConsumerStats, Event, IdempotentConsumer, consume, runner_of
from consumer.handling import HandlerMisdeclared
from tests.integration.consumer.test_consumer_effects import GROUP_SETTINGS
from tests.support import InThread, wait_for

RECORDS = 6


class Positions(IdempotentConsumer):
    """One effect row per applied record, named by its position."""

    topics: ClassVar[list[str]] = ["set-per-test"]
    group_id = "set-per-test"

    def handle(self, session: Session, event: Event) -> None:
        position = f"{event.topic}/{event.partition}/{event.offset}"
        session.execute(text("INSERT INTO effects (position) VALUES (:p)"), {"p": position})


class OwnConfig(Positions):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.config = {"greeting": "hello"}  # the application's own settings


class OwnStats(Positions):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.stats: Counter[str] = Counter()

    def handle(self, session: Session, event: Event) -> None:
        self.stats["seen"] += 1
        super().handle(session, event)


class OwnEngine(Positions):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.engine = "the search engine's name"


class OwnStop(Positions):
    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.stop = False  # the application's own flag


class OwnProcess(Positions):
    def _process(self, position: str) -> str:
        """A helper of the user's, called from handle."""
        return position.upper()

    def handle(self, session: Session, event: Event) -> None:
        assert self._process("a/0/1") == "A/0/1"
        super().handle(session, event)


class Background:
    """``consumer.run()`` in a thread, stopped through the Event given to its constructor."""

    def __init__(self, consumer: IdempotentConsumer, stop: threading.Event) -> None:
        self.consumer = consumer
        self.stop = stop

    def run(self) -> ConsumerStats:
        return self.consumer.run()


@pytest.mark.parametrize(
    "cls",
    [OwnConfig, OwnStats, OwnEngine, OwnStop, OwnProcess],
    ids=["config", "stats", "engine", "stop", "_process"],
)
def test_i11_a_users_own_attribute_named_like_the_loops_does_not_break_the_consumer(
    effects: Engine, database_url: str, bootstrap_servers: str, topic: str, cls: type[Positions]
) -> None:
    producer = Producer({"bootstrap.servers": bootstrap_servers})
    for i in range(RECORDS):
        producer.produce(topic, value=json.dumps({"i": i}).encode(), partition=0)
    assert producer.flush(30) == 0

    stop = threading.Event()
    consumer = cls(
        database_url,
        bootstrap_servers,
        topics=[topic],
        group_id=f"g-{cls.__name__}-{topic}",
        settings=GROUP_SETTINGS,
        stop=stop,
    )
    running = InThread(Background(consumer, stop), what="consumer")
    running.thread.start()

    def applied() -> Counter[str]:
        with effects.connect() as conn:
            return Counter(conn.execute(text("SELECT position FROM effects")).scalars())

    wait_for(
        lambda: running.error is not None or len(applied()) == RECORDS,
        timeout=60,
        what="every record applied (or the consumer failed)",
    )
    stats = running.stop()  # re-raises what run() raised
    assert set(applied().values()) == {1}, applied()  # each once
    assert len(applied()) == RECORDS
    assert stats.applied == RECORDS
    if isinstance(consumer, OwnStats):
        assert consumer.stats["seen"] == RECORDS  # the user's own counter, untouched by the loop


def test_i11_the_runner_never_reads_a_users_view_names(database_url: str) -> None:
    """The consumer's views (``stats``, ``config``, ...) show the runner's state; an instance
    attribute of the same name is the user's alone."""
    plain = Positions(database_url, "broker.invalid:9092", topics=["t"], group_id="g")
    own = OwnConfig(database_url, "broker.invalid:9092", topics=["t"], group_id="g")
    try:
        assert plain.config.group_id == "g"
        assert plain.stats == ConsumerStats()
        assert own.config == {"greeting": "hello"}
        assert own.lag() == {}  # the delegates still reach the runner
        assert own.readiness() == (False, "joining the consumer group")
    finally:
        plain.close()
        own.close()


def insert_position(session: Session, event: Event) -> None:
    position = f"{event.topic}/{event.partition}/{event.offset}"
    session.execute(text("INSERT INTO effects (position) VALUES (:p)"), {"p": position})


async def insert_position_async(session: AsyncSession, event: Event) -> None:
    position = f"{event.topic}/{event.partition}/{event.offset}"
    await session.execute(text("INSERT INTO effects (position) VALUES (:p)"), {"p": position})


@pytest.mark.parametrize("handle", [insert_position, insert_position_async], ids=["def", "async"])
def test_i5_a_plain_function_as_handler_applies_every_record_once(
    effects: Engine,
    database_url: str,
    bootstrap_servers: str,
    topic: str,
    handle: Callable[[Any, Event], Any],
) -> None:
    producer = Producer({"bootstrap.servers": bootstrap_servers})
    for i in range(RECORDS):
        producer.produce(topic, value=json.dumps({"i": i}).encode(), partition=0)
    assert producer.flush(30) == 0
    consumer = consume(
        handle,
        database_url,
        bootstrap_servers,
        topics=[topic],
        group_id=f"g-fn-{topic}",
        settings=GROUP_SETTINGS,
    )
    assert type(consumer).__qualname__ == handle.__qualname__  # named after it in errors
    running = InThread(runner_of(consumer), what="consumer")
    running.thread.start()

    def applied() -> Counter[str]:
        with effects.connect() as conn:
            return Counter(conn.execute(text("SELECT position FROM effects")).scalars())

    wait_for(
        lambda: running.error is not None or len(applied()) == RECORDS,
        timeout=60,
        what="every record applied (or the consumer failed)",
    )
    stats = running.stop()
    assert set(applied().values()) == {1}, applied()
    assert stats.applied == RECORDS


def test_i11_a_generator_function_as_handler_is_refused_with_the_fix(database_url: str) -> None:
    def handle(session: Session, event: Event) -> Iterator[None]:
        yield None

    with pytest.raises(HandlerMisdeclared, match="generator function"):
        consume(handle, database_url, "broker.invalid:9092", topics=["t"], group_id="g")
