"""I10 against the real consumer, PostgreSQL and broker: no record stops a consumer.

Records come from "another producer" with whatever bytes and headers it likes; each
must end applied once (an effect row, by its position) or dead-lettered once (a
``<topic>.DLT`` row in the outbox, naming its position and its reason), and the
consumer thread must still be running afterwards.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest
from confluent_kafka import Producer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from consumer import Event, IdempotentConsumer, RetryPolicy
from outbox.embedded.kafka_cluster import create_topic
from tests.integration.consumer.test_consumer_effects import GROUP_SETTINGS, Running
from tests.support import stop_all, wait_for

ENCODED_HEADER_PREFIX = "dlt-header-b64:"
"""How a dead letter carries a header whose name cannot be stored (spelt out: the test
must be able to run against the code before it existed)."""


def original_header_name(stored: str) -> str | None:
    if not stored.startswith(ENCODED_HEADER_PREFIX):
        return None
    return base64.urlsafe_b64decode(stored[len(ENCODED_HEADER_PREFIX) :]).decode(
        "utf-8", "surrogateescape"
    )


FAST_RETRY = RetryPolicy(attempts=2, initial_backoff=0.01, max_backoff=0.02, jitter=0)
Headers = list[tuple[str, bytes]]


class PositionProjector(IdempotentConsumer):
    """One effect row per applied record, named by its position (topic/partition/offset)."""

    topics: ClassVar[list[str]] = ["set-per-test"]
    group_id = "set-per-test"

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.calls: Counter[str] = Counter()

    def handle(self, session: Session, event: Event) -> None:
        position = f"{event.topic}/{event.partition}/{event.offset}"
        self.calls[position] += 1
        session.execute(text("INSERT INTO effects (position) VALUES (:p)"), {"p": position})


@dataclass
class Env:
    engine: Engine
    bootstrap_servers: str
    topic: str
    producer: Producer

    def produce(self, records: list[tuple[bytes | None, Headers]]) -> list[str]:
        """Produce to partition 0, in order; returns the records' positions."""
        positions: list[str] = []

        def delivered(err: Any, msg: Any) -> None:
            assert err is None, err
            positions.append(f"{msg.topic()}/{msg.partition()}/{msg.offset()}")

        for value, headers in records:
            self.producer.produce(
                self.topic,
                value=value,
                partition=0,
                headers=list[tuple[str, str | bytes | None]](headers),
                on_delivery=delivered,
            )
        assert self.producer.flush(30) == 0
        assert len(positions) == len(records)
        return positions

    def effects(self) -> Counter[str]:
        with self.engine.connect() as conn:
            return Counter(conn.execute(text("SELECT position FROM effects")).scalars())

    def dead_letters(self) -> dict[str, list[dict[str, Any]]]:
        """The dead letters waiting in the outbox (no relay runs), by original position."""
        out: dict[str, list[dict[str, Any]]] = {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT value, header_names, header_values FROM outbox_events WHERE topic = :t"
                ),
                {"t": f"{self.topic}.DLT"},
            )
            for value, names, values in rows:
                headers = list(zip(names, [bytes(v) for v in values], strict=True))
                meta = {n: v.decode() for n, v in headers if n.startswith("dlt-original-")}
                position = "/".join(
                    meta[f"dlt-original-{part}"] for part in ("topic", "partition", "offset")
                )
                out.setdefault(position, []).append(
                    {"value": bytes(value) if value is not None else None, "headers": headers}
                )
        return out


@pytest.fixture
def env(engine: Engine, bootstrap_servers: str, topic: str) -> Iterator[Env]:
    # On Tansu too: a consumer that subscribes before its topic exists sees it only at its
    # next metadata refresh (minutes), and the property test starts its consumer first.
    create_topic(bootstrap_servers, topic)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE effects (position text NOT NULL)"))
    producer = Producer({"bootstrap.servers": bootstrap_servers, "linger.ms": 0})
    yield Env(engine, bootstrap_servers, topic, producer)
    producer.flush(10)


@pytest.fixture
def start(env: Env) -> Iterator[Callable[..., Running]]:
    running: list[Running] = []

    def run(**kw: Any) -> Running:
        kw.setdefault("topics", [env.topic])
        kw.setdefault("group_id", f"g-{uuid.uuid4().hex[:8]}")
        kw.setdefault("settings", GROUP_SETTINGS)
        kw.setdefault("retry", FAST_RETRY)
        handle = Running(PositionProjector(env.engine, env.bootstrap_servers, **kw))  # type: ignore[arg-type]
        running.append(handle)
        return handle

    yield run
    stop_all(running)


def _settled(env: Env, running: Running, positions: list[str]) -> bool:
    assert running.thread.is_alive(), f"the consumer stopped: {running.error!r}"
    effects, letters = env.effects(), env.dead_letters()
    return all(p in effects or p in letters for p in positions)


def assert_rule_one(env: Env, running: Running, positions: list[str], sent: list[Any]) -> None:
    """Every record applied once or dead-lettered once, with its reason; originals kept."""
    wait_for(lambda: _settled(env, running, positions), timeout=120, what="every record settled")
    effects, letters = env.effects(), env.dead_letters()
    for position, (value, headers) in zip(positions, sent, strict=True):
        outcome = (effects[position], len(letters.get(position, [])))
        assert outcome in {(1, 0), (0, 1)}, (position, outcome)
        if outcome == (0, 1):
            (letter,) = letters[position]
            stored = dict(letter["headers"])
            assert stored["dlt-reason"] in {b"undecodable", b"retries-exhausted"}
            assert stored["dlt-error-type"]
            assert letter["value"] == value
            _assert_originals_recoverable(headers, letter["headers"])
    assert running.thread.is_alive()


def _assert_originals_recoverable(sent: Headers, stored: list[tuple[str, bytes]]) -> None:
    recovered = [
        (n if original is None else original, v)
        for n, v in stored
        if (original := original_header_name(n)) is not None or not n.startswith("dlt-")
    ]
    ignored = ("content-type", "outbox-event-id")
    # librdkafka cuts a header name at its first NUL: that is what the broker received.
    expected = [
        (n.split("\x00")[0], v)
        for n, v in sent
        if not n.split("\x00")[0].lower().startswith("dlt-")
        and n.split("\x00")[0].lower() not in ignored
    ]
    assert [(n, v) for n, v in recovered if n.lower() not in ignored] == expected


GOOD = json.dumps({"ok": True}).encode()
JSON: Headers = [("content-type", b"application/json")]


# -- each case of the issue, a regression test of its own ----------------------------------------


def test_i10_5000_brackets_are_dead_lettered_and_the_33_records_around_them_applied(
    env: Env, start: Callable[..., Running]
) -> None:
    sent: list[Any] = [(GOOD, JSON)] * 16 + [(b"[" * 5000, JSON)] + [(GOOD, JSON)] * 17
    positions = env.produce(sent)
    running = start()
    assert_rule_one(env, running, positions, sent)
    stats = running.stop()
    assert (stats.applied, stats.dead_lettered) == (33, 1)
    (letter,) = env.dead_letters()[positions[16]]
    assert b"RecursionError" in dict(letter["headers"])["dlt-error-message"]


@pytest.mark.parametrize(
    ("value", "headers", "cause"),
    [
        (b"9" * 6000, JSON, b"ValueError"),
        (b"\xff\xfe", [("content-type", b"text/plain; charset=idna")], b"Unicode"),
        (b"xn--a", [("content-type", b"text/plain; charset=idna")], b"UnicodeError"),
        (b"abc", [("content-type", b"text/plain; charset=" + b"://a:" * 4000)], b"LookupError"),
    ],
    ids=["6000-digit-int", "idna-bytes", "idna-punycode", "20kb-charset"],
)
def test_i10_undecodable_values_are_dead_lettered_and_the_consumer_goes_on(
    env: Env, start: Callable[..., Running], value: bytes, headers: Headers, cause: bytes
) -> None:
    sent: list[Any] = [(value, headers), (GOOD, JSON)]
    positions = env.produce(sent)
    running = start()
    started = time.monotonic()
    assert_rule_one(env, running, positions, sent)
    assert time.monotonic() - started < 30  # the 20 KB charset took 3 s per redaction before
    assert positions[1] in env.effects()
    (letter,) = env.dead_letters()[positions[0]]
    stored = dict(letter["headers"])
    assert stored["dlt-reason"] == b"undecodable"
    assert cause in stored["dlt-error-message"]
    assert len(stored["dlt-error-message"]) <= 2000


@pytest.mark.parametrize("value", [GOOD, b"{broken"], ids=["applied", "dead-lettered"])
def test_i10_a_nul_in_the_event_id_is_hashed_into_a_storable_key(
    env: Env, start: Callable[..., Running], value: bytes
) -> None:
    event_id = b"abc\x00" + uuid.uuid4().hex.encode()
    sent: list[Any] = [(value, [*JSON, ("outbox-event-id", event_id)]), (GOOD, JSON)]
    positions = env.produce(sent)
    running = start()
    assert_rule_one(env, running, positions, sent)
    with env.engine.connect() as conn:
        keys = list(conn.execute(text("SELECT event_id FROM outbox_processed_events")).scalars())
    assert len(keys) == 2
    assert all("\x00" not in k for k in keys)
    assert any(k.startswith("sha256:") for k in keys)
    if value != GOOD:
        (letter,) = env.dead_letters()[positions[0]]
        stored = letter["headers"]
        original_id = ENCODED_HEADER_PREFIX + "b3V0Ym94LWV2ZW50LWlk"  # base64 "outbox-event-id"
        assert (original_id, event_id) in stored


def test_i10_an_empty_header_name_does_not_stop_the_dead_letter(
    env: Env, start: Callable[..., Running]
) -> None:
    sent: list[Any] = [(b"{broken", [*JSON, ("", b"empty name"), ("x", b"\xff")]), (GOOD, JSON)]
    positions = env.produce(sent)
    running = start()
    assert_rule_one(env, running, positions, sent)
    (letter,) = env.dead_letters()[positions[0]]
    assert (ENCODED_HEADER_PREFIX, b"empty name") in letter["headers"]
    assert ("x", b"\xff") in letter["headers"]


def test_i10_a_malformed_traceparent_is_ignored_and_the_event_applied(
    env: Env, start: Callable[..., Running]
) -> None:
    sent: list[Any] = [
        (GOOD, [*JSON, ("traceparent", b"\xff\xfe-not-a-trace")]),
        (GOOD, [*JSON, ("traceparent", b"00-zz-zz-zz"), ("tracestate", b"\x00")]),
    ]
    positions = env.produce(sent)
    running = start()
    assert_rule_one(env, running, positions, sent)
    stats = running.stop()
    assert (stats.applied, stats.dead_lettered, stats.retries) == (2, 0, 0)
    assert env.effects() == dict.fromkeys(positions, 1)


# -- the property: arbitrary records through the real consumer -----------------------------------

names = st.one_of(
    st.just(""),
    st.text(max_size=12),
    st.text(max_size=4).map(lambda s: s + "\x00" + s),
    st.sampled_from(["content-type", "traceparent", "tracestate", "event-type", "dlt-reason"]),
)
header_values = st.one_of(
    st.binary(max_size=40),
    st.just(b""),
    st.integers(1_000, 100_000).map(lambda n: b"\xff" * n),  # very long, not UTF-8
    st.sampled_from(
        [
            b"application/json",
            b"text/plain; charset=idna",
            b"text/plain; charset=utf-16",
            b"text/plain; charset=" + b"://a:" * 400,
            b"application/octet-stream",
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ]
    ),
)
values = st.one_of(
    st.none(),
    st.binary(max_size=64),
    st.just(GOOD),
    st.integers(1, 6000).map(lambda n: b"[" * n),
    st.integers(1, 8000).map(lambda n: b"7" * n),
    st.text(max_size=30).map(lambda s: json.dumps(s).encode()),
)


@st.composite
def hostile_record(draw: st.DrawFn) -> tuple[bytes | None, Headers]:
    headers: Headers = draw(st.lists(st.tuples(names, header_values), max_size=5))
    if draw(st.booleans()):
        # An event id, maybe with NUL or bytes that are not UTF-8, unique to this record.
        raw_id = draw(st.binary(max_size=12)) + uuid.uuid4().hex.encode()
        headers.append(("outbox-event-id", raw_id))
    return draw(values), headers


@settings(
    max_examples=30,
    deadline=None,
    # Every example crosses the real broker and database: no shrinking (minutes), the
    # failing batch is reported as generated.
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@given(batch=st.lists(hostile_record(), min_size=1, max_size=4))
def test_i10_any_record_ends_applied_once_or_dead_lettered_once(
    env: Env, consumer_for_property: Running, batch: list[tuple[bytes | None, Headers]]
) -> None:
    positions = env.produce(batch)
    assert_rule_one(env, consumer_for_property, positions, batch)


@pytest.fixture
def consumer_for_property(env: Env, start: Callable[..., Running]) -> Iterator[Running]:
    """One consumer for every example (a group join costs seconds)."""
    running = start(batch_size=3)
    wait_for(
        lambda: (env.topic, 0) in running.consumer.assignment,
        timeout=60,
        what="the consumer's assignment of partition 0",
    )
    yield running
    assert running.thread.is_alive()


@pytest.mark.both_brokers
def test_i10_a_record_too_large_to_dead_letter_whole_is_dead_lettered_without_its_payload(
    env: Env, start: Callable[..., Running]
) -> None:
    """A record just under the broker's limit gains the dead letter's headers and no longer
    fits publish()'s max_message_bytes: the consumer stopped on it (exit 1, a crash loop)."""
    big = b"{" + b"x" * 999_800  # fits the producer's message.max.bytes, not with the headers
    sent: list[Any] = [(big, JSON), (GOOD, JSON)]
    positions = env.produce(sent)
    running = start()
    wait_for(lambda: _settled(env, running, positions), timeout=120, what="both records settled")
    assert env.effects() == Counter({positions[1]: 1})
    (letter,) = env.dead_letters()[positions[0]]
    stored = dict(letter["headers"])
    assert letter["value"] is None
    assert stored["dlt-reason"] == b"undecodable"
    assert b"max_message_bytes" in stored["dlt-left-out"]
    assert running.thread.is_alive()
    assert (running.stop().dead_lettered, 1) == (1, 1)
