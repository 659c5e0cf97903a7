"""I8: --db in every form the CLI accepts, and no password in any message or log line."""

from __future__ import annotations

import re
from urllib.parse import quote

import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.engine import make_url

from outbox import sql
from outbox.codec import EncodedEvent
from outbox.db import connect, libpq_dsn, redact, sqlalchemy_url
from outbox.errors import ConfigError
from outbox.partitioner import shards_of_slot

# -- redact ----------------------------------------------------------------------------------

SECRET = "s3cr3t"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "postgresql+psycopg://app:s3cr3t@db:5432/orders",
            "postgresql+psycopg://app:***@db:5432/orders",
        ),
        (
            "postgres://app:s3cr3t@db/orders?sslmode=require",
            "postgres://app:***@db/orders?sslmode=require",
        ),
        ("postgresql://app:s3%40cr%3At@db/x", "postgresql://app:***@db/x"),
        ("postgresql://app:s3cr3t@@db/x", "postgresql://app:***@db/x"),
        ("postgresql://app:p@ss:s3cr3t@db/x", "postgresql://app:***@db/x"),
        ("postgresql://app:s3/cr3t@db/x", "postgresql://app:***@db/x"),
        ("postgresql://app:s3 cr3t@db/x", "postgresql://app:***@db/x"),
        ("postgresql://app@azure:s3cr3t@db/x", "postgresql://app@azure:***@db/x"),
        ("postgresql://:s3cr3t@db/x", "postgresql://:***@db/x"),
        ("host=db password=s3cr3t dbname=x", "host=db password=*** dbname=x"),
        ("host=db PASSWORD = s3cr3t", "host=db PASSWORD = ***"),
        ("host=db password='s3 cr3t' dbname=x", "host=db password=*** dbname=x"),
        (r"host=db password='it\'s s3cr3t' user=u", "host=db password=*** user=u"),
        ('{"user": "u", "password": "s3cr3t"}', '{"user": "u", "password": ***}'),
        ("{'password': 's3cr3t', 'host': 'db'}", "{'password': ***, 'host': 'db'}"),
        ("postgresql://db/x?password=s3cr3t", "postgresql://db/x?password=***"),
        ("sslpassword=s3cr3t", "sslpassword=***"),
        ("host=db password='s3cr3t", "host=db password=***"),
        (
            "no secrets here: postgresql://app@db:5432/x",
            "no secrets here: postgresql://app@db:5432/x",
        ),
    ],
)
def test_i8_redact_hides_passwords_in_urls_and_key_value_strings(text: str, expected: str) -> None:
    assert redact(text) == expected
    assert "s3cr3t" not in redact(text)
    assert "cr3t" not in redact(text)


def test_redact_hides_every_url_of_a_line_and_of_every_line() -> None:
    text = (
        "primary postgresql://a:s3cr3t@h1/db, replica postgresql://b:0th3r@h2/db\n"
        "retry: host=h3 password=thirdpw"
    )
    out = redact(text)
    for secret in ("s3cr3t", "0th3r", "thirdpw"):
        assert secret not in out
    assert out.endswith("retry: host=h3 password=***")


password = st.text(st.characters(codec="utf-8", exclude_characters="\n"), min_size=1)


@given(password)
def test_i8_redact_hides_any_raw_password_in_a_url(pw: str) -> None:
    text = f"--db 'postgresql+psycopg://relay:{pw}@db.internal:5432/app' failed"
    assert redact(text) == "--db 'postgresql+psycopg://relay:***@db.internal:5432/app' failed"


@given(password)
def test_i8_redact_hides_any_percent_encoded_password_in_a_url(pw: str) -> None:
    text = f"postgresql://relay:{quote(pw, safe='')}@db/app"
    assert redact(text) == "postgresql://relay:***@db/app"


@given(password)
def test_i8_redact_hides_any_quoted_password_in_a_libpq_dsn(pw: str) -> None:
    escaped = pw.replace("\\", "\\\\").replace("'", "\\'")
    text = f"host=db password='{escaped}' dbname=app"
    assert redact(text) == "host=db password=*** dbname=app"


# -- libpq_dsn ------------------------------------------------------------------------------


def test_libpq_dsn_turns_a_sqlalchemy_url_into_a_libpq_dsn() -> None:
    dsn = libpq_dsn(" postgresql+psycopg://app:pw@db:5433/orders?sslmode=require ")
    assert conninfo_to_dict(dsn) == {
        "user": "app",
        "password": "pw",
        "host": "db",
        "port": "5433",
        "dbname": "orders",
        "sslmode": "require",
    }


@pytest.mark.parametrize(
    "dsn",
    [
        "host=db dbname=orders user=app",
        "postgresql://app@db/orders",
        "postgres://app@db/orders",
        "postgresql://app@h1:5432,h2:5433/orders?target_session_attrs=read-write",
    ],
)
def test_libpq_dsn_passes_libpq_forms_through_untouched(dsn: str) -> None:
    assert libpq_dsn(dsn) == dsn


def test_libpq_dsn_keeps_several_hosts_of_a_sqlalchemy_url() -> None:
    dsn = conninfo_to_dict(libpq_dsn("postgresql+psycopg://app@/orders?host=h1:5432&host=h2"))
    assert (dsn["host"], dsn["port"]) == ("h1,h2", "5432,")
    dsn = conninfo_to_dict(libpq_dsn("postgresql+psycopg://app@/orders?host=/run/pg&host=[::1]"))
    assert dsn["host"] == "/run/pg,::1"
    assert "port" not in dsn


@pytest.mark.parametrize("pw", [" ", "a b", " lead", "trail ", "+", "%", "#?/:@'\\", "é€"])
def test_i8_special_characters_in_a_url_password_survive_the_conversion_examples(pw: str) -> None:
    # Regression: SQLAlchemy renders spaces raw, and libpq read "a b" as "a".
    url = f"postgresql+psycopg://app:{quote(pw, safe='')}@db/orders"
    assert conninfo_to_dict(libpq_dsn(url))["password"] == pw
    assert make_url(sqlalchemy_url(url)).password == pw


@given(password.filter(lambda p: "\x00" not in p))
def test_i8_special_characters_in_a_url_password_survive_the_conversion(pw: str) -> None:
    url = f"postgresql+psycopg://app:{quote(pw, safe='')}@db/orders"
    assert conninfo_to_dict(libpq_dsn(url))["password"] == pw
    assert make_url(sqlalchemy_url(url)).password == pw


@pytest.mark.parametrize(
    ("db", "message"),
    [
        ("", "--db is empty"),
        ("   ", "--db is empty"),
        ("mysql+pymysql://app:s3cr3t@db/orders", "not PostgreSQL"),
        ("sqlite:///orders.db", "not PostgreSQL"),
        ("postgresql+psycopg://app:s3cr3t@db:port/orders", "not a database URL"),
        ("postgresql+psycopg://app:s3cr3t@[::1/orders", "not a database URL"),
        ("postgresql+psycopg://app:p@s3cr3t@db/orders", "percent-encode '@'"),
        ("postgresql://app:p@s3cr3t@db/orders", "percent-encode '@'"),
        ("host=db password=s3cr3t junk", "not a valid DSN"),
        ("host=db password=s3cr3t bogus=1", "not a valid DSN"),
        ("postgresql://app:s3%zzcr3t@db/orders", "not a valid DSN"),
    ],
)
def test_i8_bad_db_refused_without_showing_the_password(db: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        libpq_dsn(db)
    assert message in str(caught.value)
    assert "s3cr3t" not in str(caught.value)
    assert "cr3t" not in str(caught.value)


# -- sqlalchemy_url -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "db",
    [
        "postgresql://app:pw@db:5433/orders",
        "postgres://app:pw@db:5433/orders",
        "postgresql+psycopg2://app:pw@db:5433/orders",
        "host=db port=5433 dbname=orders user=app password=pw",
        "  postgresql+psycopg://app:pw@db:5433/orders  ",
    ],
)
def test_sqlalchemy_url_is_psycopg3_whatever_the_input(db: str) -> None:
    url = make_url(sqlalchemy_url(db))
    assert url.drivername == "postgresql+psycopg"
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "app",
        "pw",
        "db",
        5433,
        "orders",
    )


def test_sqlalchemy_url_keeps_libpq_options_of_a_key_value_dsn() -> None:
    url = make_url(sqlalchemy_url("host=db dbname=orders sslmode=require application_name=x"))
    assert dict(url.query) == {"sslmode": "require", "application_name": "x"}


@pytest.mark.parametrize(
    ("db", "message"),
    [
        ("mysql://app:s3cr3t@db/orders", "not PostgreSQL"),
        ("oracle+oracledb://app:s3cr3t@db/orders", "not PostgreSQL"),
        ("postgresql://app:s3cr3t@db:notaport/orders", "not a database URL"),
        ("://app:s3cr3t@db", "not a database URL"),
        ("host=db password=s3cr3t port=5432,5433", "port="),
        ("host=db password=s3cr3t junk", "not a valid DSN"),
        ("", "--db is empty"),
    ],
)
def test_i8_sqlalchemy_url_refuses_non_postgresql_without_the_password(
    db: str, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        sqlalchemy_url(db)
    assert message in str(caught.value)
    assert "s3cr3t" not in str(caught.value)


# -- connect ---------------------------------------------------------------------------------


def test_i8_connection_failure_is_a_connection_error_without_the_password() -> None:
    with pytest.raises(ConnectionError) as caught:
        connect("postgresql+psycopg://app:s3cr3t@127.0.0.1:1/orders", application_name="t")
    assert "cannot connect to PostgreSQL" in str(caught.value)
    assert "s3cr3t" not in str(caught.value)


def test_i8_connect_refuses_a_bad_dsn_before_connecting() -> None:
    with pytest.raises(ConfigError) as caught:
        connect("host=127.0.0.1 password=s3cr3t nonsense", application_name="t")
    assert "s3cr3t" not in str(caught.value)


# -- the SQL statements ----------------------------------------------------------------------

STATEMENTS = {
    name: value
    for name, value in vars(sql).items()
    if name.isupper() and not name.startswith("_")  # _CHANNEL is a name, not a statement
}
WRITE_PATH = {
    "INSERT_EVENT",
    "INSERT_EVENT_AND_NOTIFY",
    "INSERT_NEW_EVENT",
    "INSERT_NEW_EVENT_AND_NOTIFY",
}  # SQLAlchemy text(): ':name'
COLON_BIND = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")  # ':name', not '::int' casts
PYFORMAT = re.compile(r"%\((\w+)\)[sb]")  # %(name)b: a parameter sent in binary


def test_sql_module_has_the_statements_the_write_path_and_relay_use() -> None:
    assert WRITE_PATH | {"CLAIM_BATCH", "DELETE_EVENTS", "MOVE_TO_DEAD"} <= STATEMENTS.keys()


@pytest.mark.parametrize("name", sorted(STATEMENTS))
def test_sql_statements_use_one_placeholder_style(name: str) -> None:
    statement = STATEMENTS[name]
    assert isinstance(statement, str)
    assert statement.strip()
    if name in WRITE_PATH:
        assert "%" not in statement, "text() statements take :name only"
        assert COLON_BIND.findall(statement)
    else:
        assert not COLON_BIND.findall(statement), "psycopg statements take %(name)s only"
        # psycopg reads every other '%' as a placeholder: only %(name)s may appear.
        assert "%" not in PYFORMAT.sub("", statement)


def test_insert_event_binds_exactly_the_encoded_event_columns() -> None:
    columns = set(EncodedEvent.__dataclass_fields__) - {"size"}
    for name in ("INSERT_EVENT", "INSERT_NEW_EVENT"):
        assert set(COLON_BIND.findall(STATEMENTS[name])) == columns
        assert set(COLON_BIND.findall(STATEMENTS[f"{name}_AND_NOTIFY"])) == columns | {"channel"}


@pytest.mark.parametrize("slots", [1, 2, 3, 4, 5, 7, 32])
def test_a_slots_claim_scans_each_of_its_shards_and_merges_them_in_id_order(slots: int) -> None:
    for slot in range(slots):
        shards = shards_of_slot(slot, slots)
        claim = sql.claim_batch(shards)
        if slots == 1:  # one slot owns every shard: the primary key, no filter at all
            assert claim == sql.CLAIM_BATCH
            assert "shard" not in claim
            continue
        found = [int(s) for s in re.findall(r"WHERE shard = (\d+) AND", claim)]
        assert found == sorted(shards)
        assert claim.count("UNION ALL") == len(found) - 1
        assert "ORDER BY id LIMIT %(limit)s)" in claim  # each scan stops at the limit
        if len(found) > 1:  # one shard's scan is the claim, ordered and limited already
            assert "ORDER BY id\nLIMIT %(limit)s) AS claimed" in claim
        assert claim.count("ORDER BY id\nLIMIT") == (len(found) > 1)
        assert set(PYFORMAT.findall(claim)) == {"limit", "held", "max_value_bytes", "max_bytes"}


@pytest.mark.parametrize("slots", [1, 2, 32])
def test_i6_a_sql_ascii_claim_differs_only_in_how_it_reads_topic_and_header_names(
    slots: int,
) -> None:
    """Every other database keeps the claim it had, selecting the columns themselves; a
    SQL_ASCII one reads the same rows, with those two columns as stored bytes."""
    shards = shards_of_slot(0, slots)
    claim, stored = sql.claim_batch(shards), sql.claim_batch(shards, stored_bytes=True)
    assert "SELECT id, event_id, topic, key,\n" in claim
    assert "\n       header_names, header_values,\n" in claim
    assert "convert_to" not in claim
    assert "convert_to(topic, 'SQL_ASCII') AS topic, key," in stored
    assert "END AS header_names, header_values," in stored
    rows = "\nFROM (\n  SELECT sized.*"  # the claimed rows: the same in both
    assert stored[stored.index(rows) :] == claim[claim.index(rows) :]


def test_only_caller_given_event_ids_pay_for_on_conflict() -> None:
    assert "ON CONFLICT" in sql.INSERT_EVENT
    assert "ON CONFLICT" in sql.INSERT_EVENT_AND_NOTIFY
    assert "ON CONFLICT" not in sql.INSERT_NEW_EVENT + sql.INSERT_NEW_EVENT_AND_NOTIFY
