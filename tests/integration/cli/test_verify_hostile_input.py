"""``outbox verify`` / ``outbox trace`` against hostile input and a
hostile environment.

- A topic name no Kafka client can even build a topic object for, or client settings
  librdkafka refuses when the consumer is made (a SASL mechanism it lacks, a CA file that is
  not there): a usage error naming what is wrong (exit 2), never a traceback with exit 1 (the
  code for findings), and never the SASL password.
- A second outbox (another database) publishing to the same topic: its records are "not in
  the record", never duplicates, lost or out of order, from either side.
- A session whose client encoding is SQL_ASCII (PGCLIENTENCODING, or a SQL_ASCII database):
  psycopg hands text columns over as bytes there.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator

import pytest
from confluent_kafka.admin import AdminClient
from sqlalchemy import Engine, create_engine
from typer.testing import CliRunner, Result

from outbox.cli import app
from outbox.relay import Relay
from tests.conftest import Services, own_outbox
from tests.integration.delivery_record import login_role
from tests.integration.delivery_record import published as _published
from tests.integration.delivery_record import verify_json as _verify_json

NOWHERE = "127.0.0.1:1"  # no broker: each case fails before any request is answered


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def test_i8_verify_of_a_topic_name_no_client_can_hold_is_a_usage_error(
    database_url: str,
) -> None:
    topic = "t" * 600  # librdkafka cannot make a topic object of it (RuntimeError)
    result = _invoke(
        "verify", "--db", database_url, "--bootstrap-servers", NOWHERE, "--topic", topic
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code == 2, result.output
    assert "--topic" in result.output


@pytest.mark.parametrize(
    "settings",
    [
        ["security.protocol=SASL_PLAINTEXT", "sasl.mechanism=BOGUS"],
        ["security.protocol=SSL", "ssl.ca.location=/nonexistent/ca.pem"],
        ["socket.timeout.ms=soon"],
    ],
    ids=["sasl-mechanism", "ca-file", "socket-timeout"],
)
def test_i8_verify_with_client_settings_librdkafka_refuses_is_a_usage_error_without_secrets(
    database_url: str, settings: list[str]
) -> None:
    secret = ["sasl.username=app", "sasl.password=hunter2-s3cret"]
    x_args = [a for s in [*settings, *secret] for a in ("-X", s)]
    result = _invoke(
        "verify",
        "--db",
        database_url,
        "--bootstrap-servers",
        NOWHERE,
        "--topic",
        "orders",
        *x_args,
    )
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code == 2, result.output
    assert "hunter2-s3cret" not in result.output


@pytest.fixture
def other_outbox(services: Services, template_db: str) -> Iterator[str]:
    """A second outbox: another database, its own identity."""
    yield from own_outbox(services, template_db, "outbox_other")


@pytest.mark.both_brokers  # Apache Kafka hides aborted copies, Tansu shows them
def test_a_second_outboxs_records_on_the_same_topic_are_not_this_outboxs_findings(
    engine: Engine,
    database_url: str,
    other_outbox: str,
    bootstrap_servers: str,
    topic: str,
    drain: Callable[..., Relay],
) -> None:
    mine = _published(engine, topic, 12)
    other_engine = create_engine(other_outbox)
    try:
        theirs = _published(other_engine, topic, 7)  # the same keys, too
    finally:
        other_engine.dispose()
    drain()
    drain(dsn=other_outbox)
    mine += _published(engine, topic, 5)  # interleaved on the partitions
    drain()
    for db, own, foreign in ((database_url, mine, theirs), (other_outbox, theirs, mine)):
        code, report = _verify_json(db, bootstrap_servers, topic)
        assert code == 0, report
        assert (report["recorded"], report["read"]) == (len(own), len(own) + len(foreign))
        assert report["unrecorded"] == len(foreign)
        assert (report["lost"], report["duplicates"], report["order_violations"]) == ([], {}, [])


def test_verify_and_trace_under_a_sql_ascii_client_encoding(
    engine: Engine,
    database_url: str,
    bootstrap_servers: str,
    topic: str,
    drain: Callable[..., Relay],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """libpq reads PGCLIENTENCODING; with SQL_ASCII psycopg returns text as bytes. verify must
    still match the record's event ids with the topic's headers, and trace print names."""
    ids = _published(engine, topic, 6)
    drain()
    monkeypatch.setenv("PGCLIENTENCODING", "SQL_ASCII")
    code, report = _verify_json(database_url, bootstrap_servers, topic)
    assert (code, report["clean"], len(report["lost"])) == (0, True, 0), report["lost"][:2]
    result = _invoke("trace", ids[0], "--db", database_url, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["deliveries"][0]["topic"] == topic


def test_the_relay_publishes_under_a_sql_ascii_client_encoding(
    engine: Engine,
    database_url: str,
    topic: str,
    drain: Callable[..., Relay],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same environment for the relay: its claimed rows' topics come as bytes."""
    _published(engine, topic, 4)
    monkeypatch.setenv("PGCLIENTENCODING", "SQL_ASCII")
    relay = drain(slots=1)
    assert (relay.stats.published, relay.stats.dead) == (4, 0)


@pytest.fixture
def reader_url(database_url: str) -> Iterator[str]:
    """A monitoring role granted SELECT on every table there was before migration 0007 (a
    grant made before the upgrade does not cover the delivery record)."""
    grant = "GRANT SELECT ON outbox_events, outbox_dead_events, outbox_processed_events"
    with login_role(database_url, "reader", "hunter2-s3cret", [grant]) as url:
        yield url


def test_i8_trace_and_verify_with_a_role_that_may_not_read_the_record_fail_in_one_line(
    reader_url: str,
) -> None:
    """Not a traceback (and for verify not exit 1, its code for findings): one line naming
    the table and the fix (grant SELECT on outbox_deliveries), without the password."""
    traced = _invoke("trace", str(uuid.uuid4()), "--db", reader_url)
    verified = _invoke(
        "verify", "--db", reader_url, "--bootstrap-servers", NOWHERE, "--topic", "orders"
    )
    for result in (traced, verified):
        assert isinstance(result.exception, SystemExit), repr(result.exception)
        assert result.exit_code not in (0, 1), result.output
        assert "outbox_deliveries" in result.output
        assert "hunter2-s3cret" not in result.output


def test_i8_verify_of_a_topic_that_does_not_exist_is_a_usage_error_and_creates_nothing(
    database_url: str, bootstrap_servers: str
) -> None:
    """verify is read-only: asking about a misspelt topic must not create it (a broker that
    creates unknown topics on a metadata request would, unless the client says not to)."""
    topic = f"never-made-{uuid.uuid4().hex[:8]}"
    result = _invoke(
        "verify", "--db", database_url, "--bootstrap-servers", bootstrap_servers, "--topic", topic
    )
    assert result.exit_code == 2, result.output
    assert topic in result.output
    admin = AdminClient({"bootstrap.servers": bootstrap_servers})
    assert topic not in admin.list_topics(timeout=15).topics


def test_i8_verify_of_an_empty_group_name_is_a_usage_error_not_an_aborted_process(
    engine: Engine,
    database_url: str,
    bootstrap_servers: str,
    topic: str,
    drain: Callable[..., Relay],
) -> None:
    """confluent-kafka's Consumer with group.id '' fails a C assertion and aborts the whole
    interpreter (SIGABRT, exit 134): verify must refuse the name before it makes one. Run in a
    process of its own, since on failure it takes the process with it."""
    _published(engine, topic, 2)
    drain()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "outbox",
            "verify",
            "--db",
            database_url,
            "--bootstrap-servers",
            bootstrap_servers,
            "--topic",
            topic,
            "--group",
            "",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, (done.returncode, done.stderr[-1500:])
    assert "--group" in done.stderr
