"""The relay's sessions are UTF8 (``outbox.db.connect``) whatever the database's encoding. A
SQL_ASCII database stores any bytes in text columns: a row whose topic is not valid UTF-8
cannot be sent to a UTF8 session, so the server would refuse the statement that reads it. That
row is poison (I6): it is moved aside with its error, and the rest of its slot is published; it
must not make the slot retry its claim for ever."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import psycopg
import pytest
from prometheus_client import generate_latest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from outbox import publish, sql
from outbox.cli import app
from outbox.db import connect
from outbox.migrate import upgrade
from outbox.relay import Relay, RelayConfig
from outbox.relay.rows import record_defect
from outbox.relay.slot_session import PsycopgSlotSession
from tests.conftest import (
    RelayHandle,
    Services,
    _libpq,
    create_database,
    drop_database,
    wait_for,
)
from tests.support import KafkaReader


def _encoded_database(services: Services, encoding: str) -> Iterator[str]:
    """A migrated database of ``encoding`` (migrated, and published to, from UTF8 sessions)."""
    url = create_database(services, f"outbox_{encoding.lower()}", encoding=encoding)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PGCLIENTENCODING", "UTF8")  # SQLAlchemy's own session, for the migration
        upgrade(url)
    yield url
    drop_database(services, url)


@pytest.fixture
def sql_ascii_url(services: Services) -> Iterator[str]:
    """A migrated SQL_ASCII database."""
    yield from _encoded_database(services, "SQL_ASCII")


@pytest.fixture
def latin1_url(services: Services) -> Iterator[str]:
    """A migrated LATIN1 database: the server converts its text to the UTF8 session's."""
    yield from _encoded_database(services, "LATIN1")


def _count(url: str, query: str) -> int:
    with psycopg.connect(_libpq(url), autocommit=True, client_encoding="UTF8") as conn:
        row = conn.execute(query).fetchone()
    return int(row[0]) if row else -1


@pytest.mark.parametrize("slots", [1, 2])  # one claim of every shard; claims of some shards
def test_i6_text_not_in_utf8_in_a_sql_ascii_database_is_buried_not_retried_for_ever(
    sql_ascii_url: str,
    topic: str,
    start_relay: Callable[..., RelayHandle],
    kafka: KafkaReader,
    slots: int,
) -> None:
    """A topic and a header name with a byte no UTF-8 text has: each row is buried with an
    error naming the column, and the rows around them are published."""
    engine = create_engine(sql_ascii_url, connect_args={"client_encoding": "UTF8"})
    try:
        with Session(engine) as session, session.begin():
            for i in range(5):
                publish(session, topic=topic, key=f"k{i}", value={"i": i}, headers={"h": "v"})
    finally:
        engine.dispose()
    with psycopg.connect(_libpq(sql_ascii_url), autocommit=True) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM outbox_events ORDER BY id")]
        conn.execute(  # bytes a SQL_ASCII database lets a writer store
            "UPDATE outbox_events SET topic = topic || E'\\xff' WHERE id = %s", (ids[1],)
        )
        conn.execute(
            "UPDATE outbox_events SET header_names[1] = E'h\\xc3\\x28' WHERE id = %s",
            (ids[3],),
        )
    start_relay(dsn=sql_ascii_url, slots=slots)
    wait_for(
        lambda: _count(sql_ascii_url, "SELECT count(*) FROM outbox_events") == 0,
        timeout=60,
        what="the outbox drained (the bad rows moved aside, the others published)",
    )
    assert sorted(r.key or b"" for r in kafka.read(topic, 3)) == [b"k0", b"k2", b"k4"]
    with psycopg.connect(_libpq(sql_ascii_url), autocommit=True, client_encoding="UTF8") as conn:
        dead = conn.execute("SELECT id, error FROM outbox_dead_events ORDER BY id").fetchall()
    assert [d[0] for d in dead] == [ids[1], ids[3]]
    assert "topic is not UTF-8 text (b'test." in dead[0][1], dead[0][1]
    assert "\\xff'" in dead[0][1], dead[0][1]
    assert "header_names[1] is not UTF-8 text (b'h\\xc3('" in dead[1][1], dead[1][1]


def test_outbox_migrate_runs_on_a_sql_ascii_database(services: Services) -> None:
    """``outbox migrate`` (SQLAlchemy on psycopg) in a UTF8 session like the relay's: under
    SQL_ASCII psycopg returns text as bytes and SQLAlchemy's first connection failed with
    "cannot use a string pattern on a bytes-like object" (exit 1)."""
    url = create_database(services, "outbox_ascii", encoding="SQL_ASCII")
    try:
        result = CliRunner().invoke(app, ["migrate", "--db", url])
        assert result.exit_code == 0, result.output
        with psycopg.connect(_libpq(url), autocommit=True) as conn:
            assert conn.execute("SELECT to_regclass('outbox_deliveries')").fetchone() != (None,)
    finally:
        drop_database(services, url)


def test_i6_the_operator_views_show_a_row_whose_text_is_not_utf8(
    sql_ascii_url: str, topic: str
) -> None:
    """`outbox status` and `outbox dead list/show` read such a row (pending, then buried) with
    its odd bytes as ``\\xNN``: they failed with a traceback, so the operator could not see
    the row the relay had moved aside, nor its error."""
    engine = create_engine(sql_ascii_url, connect_args={"client_encoding": "UTF8"})
    try:
        with Session(engine) as session, session.begin():
            publish(session, topic=topic, key="k", value={"i": 1}, headers={"h": "v"})
    finally:
        engine.dispose()
    with psycopg.connect(_libpq(sql_ascii_url), autocommit=True) as conn:
        conn.execute("UPDATE outbox_events SET topic = topic || E'\\xff'")
        conn.execute("UPDATE outbox_events SET header_names[1] = E'h\\xc3\\x28'")
    status = CliRunner().invoke(app, ["status", "--json", "--db", sql_ascii_url])
    assert status.exit_code == 0, status.output
    assert [t["topic"] for t in json.loads(status.output)["pending"]] == [f"{topic}\\xff"]
    with psycopg.connect(_libpq(sql_ascii_url), autocommit=True) as conn:
        [(row_id,)] = conn.execute("SELECT id FROM outbox_events").fetchall()
        conn.execute(sql.MOVE_TO_DEAD, {"id": row_id, "error": "topic is not UTF-8 text"})
    listed = CliRunner().invoke(app, ["dead", "list", "--json", "--db", sql_ascii_url])
    assert listed.exit_code == 0, listed.output
    assert [r["topic"] for r in json.loads(listed.output)] == [f"{topic}\\xff"]
    shown = CliRunner().invoke(app, ["dead", "show", str(row_id), "--db", sql_ascii_url])
    assert shown.exit_code == 0, shown.output
    assert "h\\xc3(" in shown.output


# Rows another writer (or a table from before migration 0006's constraints) can leave, as
# (header_names, header_values) SQL: each must be claimed from a SQL_ASCII database as it is
# from a UTF8 one, with the same defect or none.
_ODD_HEADERS = [
    "ARRAY['é-name', 'b'], ARRAY['\\x01', '\\x02']::bytea[]",  # UTF-8, not ASCII
    "'{}'::text[], '{}'::bytea[]",
    "NULL, NULL",
    "ARRAY['a', NULL], ARRAY['\\x01', '\\x02']::bytea[]",
    "'{{a,b},{c,d}}'::text[], ARRAY['\\x01', '\\x02', '\\x03', '\\x04']::bytea[]",
    "'{{a,b},{c,d}}'::text[], '{{\\\\x01,\\\\x02},{\\\\x03,\\\\x04}}'::bytea[]",
    "'{{a},{b}}'::text[], ARRAY['\\x01', '\\x02']::bytea[]",
    "'[0:1]={a,b}'::text[], ARRAY['\\x01', '\\x02']::bytea[]",
]


def _claim_odd_rows(url: str, topic: str) -> list[tuple[object, ...]]:
    """Write the odd rows, a row of a multi-byte topic and one of a held topic, and claim them
    as a relay's slot does."""
    with connect(url, application_name="test") as conn:
        conn.execute(
            "ALTER TABLE outbox_events DROP CONSTRAINT outbox_events_headers_paired, "
            "DROP CONSTRAINT outbox_events_headers_named, "
            "ALTER COLUMN header_names DROP NOT NULL, ALTER COLUMN header_values DROP NOT NULL"
        )
        for i, headers in enumerate(_ODD_HEADERS):
            conn.execute(
                "INSERT INTO outbox_events (event_id, topic, shard, key, value, header_names, "
                f"header_values) VALUES (gen_random_uuid(), %s, 0, %s, 'v', {headers})",
                (topic, f"k{i}".encode()),
            )
        for name in (f"{topic}-ördern", f"{topic}-held-é"):
            conn.execute(
                "INSERT INTO outbox_events (event_id, topic, shard, key, value, header_names, "
                "header_values) VALUES (gen_random_uuid(), %s, 1, 'k', 'v', ARRAY['h'], "
                "ARRAY['\\x01']::bytea[])",
                (name,),
            )
        rows = PsycopgSlotSession(conn).claim(
            range(32), limit=100, held=[f"{topic}-held-é"], max_value_bytes=2**20, max_bytes=2**30
        )
    # The names of a multidimensional array are never read: only its shape, for the defect.
    return [
        (r.topic, r.key, r.value, r.header_values, defect, r.header_names if not defect else None)
        for r in rows
        for defect in [record_defect(r)]
    ]


def test_i6_a_sql_ascii_claim_reads_every_row_as_a_utf8_database_does(
    sql_ascii_url: str, database_url: str, topic: str
) -> None:
    """UTF-8 topics and header names that are not ASCII, empty and NULL header arrays, a NULL
    name, multidimensional and non-1-based arrays, a held topic: the same rows and the same
    defects in both (a multidimensional array must not be flattened into headers)."""
    utf8 = _claim_odd_rows(database_url, topic)
    assert len(utf8) == len(_ODD_HEADERS) + 1  # the held topic's row is left out
    assert utf8[0][4:] == (None, ["é-name", "b"])
    assert utf8[-1][0] == f"{topic}-ördern"
    assert utf8[-1][4] is None
    assert _claim_odd_rows(sql_ascii_url, topic) == utf8


def test_i6_a_latin1_claim_reads_every_row_as_a_utf8_database_does(
    latin1_url: str, database_url: str, topic: str
) -> None:
    """The other server encodings keep the claim that reads text: the same rows and defects
    as a UTF8 database, the names and topics that are not ASCII converted by the server."""
    assert _claim_odd_rows(latin1_url, topic) == _claim_odd_rows(database_url, topic)


def test_i6_the_relays_pending_rows_metric_counts_a_row_whose_topic_is_not_utf8(
    sql_ascii_url: str, topic: str, relay_config: Callable[..., RelayConfig]
) -> None:
    """Until the relay buries such a row (after a backlog, that can take a while), the outbox
    lag of every topic is still exported: the metric's query read it in a UTF8 session, was
    refused, and exported no topic at all."""
    engine = create_engine(sql_ascii_url, connect_args={"client_encoding": "UTF8"})
    try:
        with Session(engine) as session, session.begin():
            for i in range(3):
                publish(session, topic=topic, key=f"k{i}", value={"i": i})
    finally:
        engine.dispose()
    with psycopg.connect(_libpq(sql_ascii_url), autocommit=True) as conn:
        conn.execute(
            "UPDATE outbox_events SET topic = topic || E'\\xff' "
            "WHERE id = (SELECT min(id) FROM outbox_events)"
        )
    relay = Relay(relay_config(dsn=sql_ascii_url))
    body = generate_latest(relay.metrics.registry).decode()
    assert f'outbox_pending_rows{{topic="{topic}"}} 2.0' in body, body
    assert f'outbox_pending_rows{{topic="{topic}\\\\xff"}} 1.0' in body, body


def test_i6_a_sql_ascii_outbox_publishes_records_traces_and_requeues_a_fixed_row(
    sql_ascii_url: str,
    topic: str,
    start_relay: Callable[..., RelayHandle],
    kafka: KafkaReader,
    bootstrap_servers: str,
) -> None:
    """Header names in UTF-8 that are not ASCII reach Kafka as published; the delivery record
    of such a database serves `outbox trace` and `outbox verify`; a buried row whose topic an
    operator fixed goes back with `outbox dead requeue` and is published."""
    engine = create_engine(sql_ascii_url, connect_args={"client_encoding": "UTF8"})
    try:
        with Session(engine) as session, session.begin():
            ids = [
                str(
                    publish(session, topic=topic, key=f"k{i}", value={"i": i}, headers={"é-h": "v"})
                )
                for i in range(3)
            ]
    finally:
        engine.dispose()
    with psycopg.connect(_libpq(sql_ascii_url), autocommit=True) as conn:
        conn.execute(
            "UPDATE outbox_events SET topic = topic || E'\\xff' WHERE event_id = %s", (ids[0],)
        )
    relay = start_relay(dsn=sql_ascii_url)
    wait_for(
        lambda: _count(sql_ascii_url, "SELECT count(*) FROM outbox_events") == 0,
        timeout=60,
        what="the outbox drained",
    )
    records = kafka.read(topic, 2)
    assert sorted(r.event_id for r in records) == sorted(ids[1:])
    assert all(r.headers["é-h"] == b"v" for r in records)
    runner = CliRunner()
    traced = runner.invoke(app, ["trace", ids[1], "--json", "--db", sql_ascii_url])
    assert traced.exit_code == 0, traced.output
    assert str(records[0].partition) in traced.output or str(records[1].partition) in traced.output
    dead = runner.invoke(app, ["trace", ids[0], "--json", "--db", sql_ascii_url])
    assert dead.exit_code == 0, dead.output
    assert "topic is not UTF-8 text" in dead.output
    verified = runner.invoke(
        app, ["verify", "--topic", topic, "-b", bootstrap_servers, "--db", sql_ascii_url]
    )
    assert verified.exit_code == 0, verified.output
    with psycopg.connect(_libpq(sql_ascii_url), autocommit=True) as conn:
        conn.execute("UPDATE outbox_dead_events SET topic = %s", (topic,))
        [(dead_id,)] = conn.execute("SELECT id FROM outbox_dead_events").fetchall()
    requeued = runner.invoke(app, ["dead", "requeue", str(dead_id), "--db", sql_ascii_url])
    assert requeued.exit_code == 0, requeued.output
    assert sorted(r.event_id for r in kafka.read(topic, 3)) == sorted(ids)
    assert relay.relay.stats.dead == 1
