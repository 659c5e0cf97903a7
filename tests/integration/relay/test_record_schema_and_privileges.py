"""The record on a database behind on its migrations, with a relay role that may not run DDL,
and turned off.

- Migrated only to 0006 (no outbox_deliveries): the relay publishes and records nothing;
  ``trace``/``verify`` say "not migrated" (exit 4).
- Migrated to 0007 but not 0008 (no BRIN/partial btree indexes): the relay records, trace
  finds; with --delivery-retention 0 it records nothing and trace says unknown.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable, Iterator

import psycopg
import pytest
from sqlalchemy import Engine, make_url
from typer.testing import CliRunner

from outbox.cli import app
from outbox.relay import Relay, deliveries
from tests.conftest import _libpq
from tests.integration.delivery_record import downgrade, login_role, published


def _pending(database_url: str) -> int:
    with psycopg.connect(_libpq(database_url), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM outbox_events").fetchone()
    return int(row[0]) if row else -1


def test_i8_a_database_at_0006_is_relayed_without_a_record_and_trace_says_not_migrated(
    engine: Engine,
    database_url: str,
    bootstrap_servers: str,
    topic: str,
    drain: Callable[..., Relay],
) -> None:
    downgrade(database_url, "0006")
    ids = published(engine, topic, 5, keys=5)
    relay = drain(slots=1)
    assert relay.stats.published == 5
    assert _pending(database_url) == 0
    runner = CliRunner()
    traced = runner.invoke(app, ["trace", ids[0], "--db", database_url])
    assert traced.exit_code == 4, traced.output
    assert "migrate" in traced.output
    verified = runner.invoke(
        app,
        [
            "verify",
            "--db",
            database_url,
            "--bootstrap-servers",
            bootstrap_servers,
            "--topic",
            topic,
        ],
    )
    assert verified.exit_code == 4, verified.output


@pytest.mark.parametrize("retention", [0, 7])
def test_i2_a_database_at_0007_records_and_trace_finds_or_the_record_is_off(
    retention: int,
    engine: Engine,
    database_url: str,
    topic: str,
    drain: Callable[..., Relay],
) -> None:
    downgrade(database_url, "0007")
    ids = published(engine, topic, 5, keys=5)
    drain(slots=1, delivery_retention=retention)
    assert _pending(database_url) == 0
    result = CliRunner().invoke(app, ["trace", ids[-1], "--db", database_url, "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    if retention:
        assert found["state"] == "published"
        assert found["deliveries"][0]["partition"] is not None
    else:
        assert (found["state"], found["deliveries"]) == ("unknown", [])


@pytest.fixture
def dml_role_url(database_url: str) -> Iterator[str]:
    """The relay's database user as least privilege has it: DML on the outbox's tables (those
    of migration 0007 included), no DDL; the migrations ran as the tables' owner."""
    grants = [
        "GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public",
        "GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public",
    ]
    with login_role(database_url, "relay", "pw", grants) as url:
        yield url


def test_i2_the_record_expires_past_its_retention_when_the_relays_role_may_not_run_ddl(
    database_url: str, dml_role_url: str
) -> None:
    """Upkeep creates and drops partitions (DDL, for the tables' owner). A relay whose role
    may not do that has its records land in the default partition; the retention window
    must still hold there, not let the record grow for ever."""
    now = dt.datetime.now(dt.UTC)
    with psycopg.connect(_libpq(database_url), autocommit=True) as owner:
        owner.execute(
            "INSERT INTO outbox_deliveries (published_at, event_id, id, topic) VALUES "
            "(%(old)s, gen_random_uuid(), 1, 't'), (%(now)s, gen_random_uuid(), 2, 't')",
            {"old": now - dt.timedelta(days=9), "now": now},
        )
    with psycopg.connect(_libpq(dml_role_url), autocommit=True) as relay:
        deliveries.maintain(relay, retention_days=7, now=now)
    with psycopg.connect(_libpq(database_url), autocommit=True) as owner:
        ids = [r[0] for r in owner.execute("SELECT id FROM outbox_deliveries ORDER BY id")]
    assert ids == [2], "a record 9 days old outlived a 7-day retention"


def test_i2_a_relay_whose_role_may_not_run_ddl_still_publishes_and_records(
    engine: Engine,
    database_url: str,
    dml_role_url: str,
    topic: str,
    drain: Callable[..., Relay],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What the relay does meanwhile: it publishes and records (into the default partition),
    and says why and what to do about it."""
    ids = published(engine, topic, 5, keys=5)
    relay = drain(slots=1, dsn=dml_role_url)
    assert relay.stats.published == 5
    with psycopg.connect(_libpq(database_url), autocommit=True) as owner:
        rows = owner.execute(
            "SELECT tableoid::regclass::text, event_id::text FROM outbox_deliveries"
        ).fetchall()
    assert sorted(r[1] for r in rows) == sorted(ids)
    assert {r[0] for r in rows} == {"outbox_deliveries_default"}
    said = [r.getMessage() for r in caplog.records if "may not create or drop" in r.getMessage()]
    assert said, "no warning names the refused upkeep"
    assert "OWNER TO" in said[0]


def test_i2_a_relay_role_given_the_record_as_the_warning_says_keeps_daily_partitions(
    database_url: str, dml_role_url: str
) -> None:
    """The warning's fix applied after the tables' owner kept the record (a relay run as the
    owner, then moved to its own role): ALTER TABLE ... OWNER TO does not pass ownership on to
    the partitions the owner made, so the new role may not drop those. That must not cost the
    partitions it may create: today's is made, the old days' rows still expire, and the
    warning names the partition refused."""
    now = dt.datetime.now(dt.UTC)
    role = make_url(dml_role_url).username
    with psycopg.connect(_libpq(database_url), autocommit=True) as owner:
        deliveries.maintain(owner, retention_days=7, now=now - dt.timedelta(days=10))
        owner.execute(
            "INSERT INTO outbox_deliveries (published_at, event_id, id, topic) "
            "VALUES (%(old)s, gen_random_uuid(), 1, 't')",
            {"old": now - dt.timedelta(days=10)},
        )
        owner.execute(f"ALTER TABLE outbox_deliveries OWNER TO {role}")
        owner.execute(f"GRANT CREATE ON SCHEMA public TO {role}")
    with psycopg.connect(_libpq(dml_role_url), autocommit=True) as relay:
        deliveries.maintain(relay, retention_days=7, now=now)
    with psycopg.connect(_libpq(database_url), autocommit=True) as owner:
        names = {
            str(r[0])
            for r in owner.execute(
                "SELECT inhrelid::regclass::text FROM pg_inherits "
                "WHERE inhparent = 'outbox_deliveries'::regclass"
            )
        }
        left = owner.execute("SELECT count(*) FROM outbox_deliveries").fetchone()
        owner.execute(f"REASSIGN OWNED BY {role} TO CURRENT_USER")
    assert deliveries.partition_name(now.date()) in names, "today's partition was not made"
    assert left == (0,), "a record 10 days old outlived a 7-day retention"


def test_i2_record_upkeep_judges_days_by_the_database_clock_not_the_relay_hosts(
    database_url: str,
) -> None:
    """The relay host's clock is 40 days ahead of the database's (here: the database's is
    set back, by a ``now()`` ahead of pg_catalog's on the session's search_path). Upkeep by
    the host's clock would create the host's days and, with a retention under 40 days,
    drop the partition of the day the database stamps on the rows (``published_at``)."""
    with psycopg.connect(_libpq(database_url), autocommit=True) as conn:
        conn.execute("CREATE SCHEMA clock_skew")
        conn.execute(
            "CREATE FUNCTION clock_skew.now() RETURNS timestamptz LANGUAGE sql "
            "AS $$ SELECT pg_catalog.now() - interval '40 days' $$"
        )
        conn.execute("SET search_path = clock_skew, pg_catalog, public")
        row = conn.execute("SELECT now()").fetchone()
        assert row is not None
        database_today = row[0].astimezone(dt.UTC).date()
        assert database_today < dt.datetime.now(dt.UTC).date() - dt.timedelta(days=30)
        plan = deliveries.maintain(conn, retention_days=7)
        assert plan is not None
        assert database_today in plan.create, plan
        again = deliveries.maintain(conn, retention_days=7)
        assert again is not None
        assert database_today not in again.drop, again
        days, _ = deliveries.existing_partitions(conn)
    assert database_today in days
