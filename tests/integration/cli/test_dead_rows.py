"""``outbox dead``: what an operator sees of poison rows, on the real database and broker."""

from __future__ import annotations

import json
from collections.abc import Callable

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session
from typer.testing import CliRunner, Result

from outbox import publish
from outbox.cli import app
from outbox.relay import Relay

SMALL = {"message.max.bytes": "2000"}
"""A relay limit the poison row exceeds (a batch's recovery marker must fit it too)."""


def _outbox(*args: str) -> str:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_i6_a_row_that_comes_back_dead_again_after_each_requeue_counts_every_return(
    engine: Engine, database_url: str, drain: Callable[..., Relay], topic: str
) -> None:
    with Session(engine) as session, session.begin():
        publish(session, topic=topic, key="k", value=b"x" * 5000)
    for returns in (1, 2, 3):
        drain(producer_overrides=SMALL, batch_size=50)
        [row] = json.loads(_outbox("dead", "list", "--db", database_url, "--json"))
        assert row["attempts"] == returns
        if returns < 3:
            _outbox("dead", "requeue", "--db", database_url, "--all")
    assert "3" in _outbox("dead", "show", str(row["id"]), "--db", database_url)


def test_dead_show_cuts_a_large_value_to_a_few_kb_unless_full(
    engine: Engine, database_url: str, drain: Callable[..., Relay], topic: str
) -> None:
    value = "".join(f"line {i:06d}\n" for i in range(20_000))  # 240 kB of text
    with Session(engine) as session, session.begin():
        publish(session, topic=topic, key="k", value=value)
    drain(producer_overrides=SMALL, batch_size=50)
    [row] = json.loads(_outbox("dead", "list", "--db", database_url, "--json"))
    row_id = str(row["id"])

    shown = _outbox("dead", "show", row_id, "--db", database_url)
    assert len(shown) < 8_000
    assert "--full" in shown  # says how to see the rest
    assert "line 000000" in shown
    assert "line 019999" not in shown
    as_json = json.loads(_outbox("dead", "show", row_id, "--db", database_url, "--json"))
    assert len(as_json["value"]["data"]) < 8_000
    assert as_json["value"]["cut"] is True
    assert as_json["value"]["bytes"] == len(value)

    full = _outbox("dead", "show", row_id, "--db", database_url, "--full")
    assert value in full
    full_json = json.loads(
        _outbox("dead", "show", row_id, "--db", database_url, "--json", "--full")
    )
    assert full_json["value"]["data"] == value
    assert full_json["value"]["cut"] is False


def _insert_raw(engine: Engine, topic: str, names: str, values: str, value: bytes) -> None:
    """A row as another writer (a SQL backfill, an old table) would insert it."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox_events "
                "(event_id, topic, shard, key, value, header_names, header_values) "
                f"VALUES (gen_random_uuid(), :topic, 0, 'k', :value, {names}, {values})"
            ),
            {"topic": topic, "value": value},
        )


_HEADER_CONSTRAINTS = {
    "outbox_events_headers_paired": "cardinality(header_names) = cardinality(header_values)",
    "outbox_events_headers_named": "array_position(header_names, NULL) IS NULL",
}


def _drop_header_constraints(engine: Engine) -> None:
    """An outbox table from before the header constraints (migration 0006)."""
    with engine.begin() as conn:
        for name in _HEADER_CONSTRAINTS:
            conn.execute(text(f"ALTER TABLE outbox_events DROP CONSTRAINT IF EXISTS {name}"))


def _add_header_constraints(engine: Engine, *names: str) -> None:
    """What the migration adds back, for new rows (NOT VALID: the rows there stay)."""
    adds = ", ".join(
        f"ADD CONSTRAINT {name} CHECK ({_HEADER_CONSTRAINTS[name]}) NOT VALID" for name in names
    )
    with engine.begin() as conn:
        conn.execute(text(f"ALTER TABLE outbox_events {adds}"))


def _one_line_refusal(result: Result) -> str:
    """The command failed with one line and no traceback; that line."""
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    message = result.output.strip()
    assert "\n" not in message, message
    return message


_TWO_BY_TWO = "'{{a,b},{c,d}}'::text[]"
_FOUR_VALUES = "ARRAY['\\x01', '\\x02', '\\x03', '\\x04']::bytea[]"
"""Header arrays of a table from before the constraints: the names multidimensional."""


def test_i6_dead_show_prints_every_row_the_relay_buries_whatever_its_headers_and_value(
    engine: Engine, database_url: str, drain: Callable[..., Relay], topic: str
) -> None:
    _drop_header_constraints(engine)
    json_header = "ARRAY['content-type']::text[]"
    _insert_raw(engine, topic, "ARRAY['a', 'b']::text[]", "ARRAY['\\x01'::bytea]", b"unpaired")
    _insert_raw(engine, topic, "ARRAY[NULL]::text[]", "ARRAY['\\x02'::bytea]", b"no name")
    _insert_raw(engine, topic, _TWO_BY_TWO, _FOUR_VALUES, b"multidimensional")
    _insert_raw(  # too large for the relay, labelled JSON but not JSON
        engine, topic, json_header, "ARRAY['application/json'::bytea]", b"{not json" * 500
    )
    _insert_raw(  # too large, its content type not UTF-8
        engine, topic, json_header, "ARRAY['\\xff'::bytea]", b"\xfe" * 5000
    )
    drain(producer_overrides=SMALL, batch_size=50)
    rows = json.loads(_outbox("dead", "list", "--db", database_url, "--json"))
    assert len(rows) == 5
    for row in rows:
        row_id = str(row["id"])
        shown = _outbox("dead", "show", row_id, "--db", database_url)
        assert row["error"].split()[0] in shown
        as_json = json.loads(_outbox("dead", "show", row_id, "--db", database_url, "--json"))
        assert as_json["id"] == row["id"]
        assert as_json["value"]["bytes"] > 0


def test_i6_requeueing_a_row_no_record_can_be_built_from_is_refused_in_one_line(
    engine: Engine, database_url: str, drain: Callable[..., Relay], topic: str
) -> None:
    _drop_header_constraints(engine)
    _insert_raw(engine, topic, "ARRAY['a', 'b']::text[]", "ARRAY['\\x01'::bytea]", b"unpaired")
    drain()
    _add_header_constraints(engine, "outbox_events_headers_paired")
    [row] = json.loads(_outbox("dead", "list", "--db", database_url, "--json"))
    result = CliRunner().invoke(app, ["dead", "requeue", str(row["id"]), "--db", database_url])
    message = _one_line_refusal(result)
    assert str(row["id"]) in message
    assert "discard" in message
    assert "unpaired" not in message  # the row's data stays out of the error
    assert json.loads(_outbox("dead", "list", "--db", database_url, "--json")) == [row]


def test_i6_requeueing_a_dead_row_whose_id_a_new_row_has_is_refused_in_one_line(
    engine: Engine, database_url: str, drain: Callable[..., Relay], topic: str
) -> None:
    """After TRUNCATE ... RESTART IDENTITY a new row can have a dead row's id: re-queueing that
    dead row (it keeps its id, hence its order) is refused, naming the row, and nothing moves."""
    with Session(engine) as session, session.begin():
        publish(session, topic=topic, key="k", value=b"x" * 5000)
    drain(producer_overrides=SMALL, batch_size=50)
    [row] = json.loads(_outbox("dead", "list", "--db", database_url, "--json"))
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE outbox_events RESTART IDENTITY"))
    with Session(engine) as session, session.begin():
        publish(session, topic=topic, key="k", value="a new event with the dead row's id")
    result = CliRunner().invoke(app, ["dead", "requeue", "--all", "--db", database_url])
    message = _one_line_refusal(result)
    assert str(row["id"]) in message
    assert json.loads(_outbox("dead", "list", "--db", database_url, "--json")) == [row]


def test_i6_requeueing_a_row_whose_header_names_are_multidimensional_is_refused_in_one_line(
    engine: Engine, database_url: str, drain: Callable[..., Relay], topic: str
) -> None:
    """The outbox table's constraints cannot even be checked on such a row (PostgreSQL's
    array_position() takes one dimension): the refusal names it and the fix, as for any row
    no record can be built from, and nothing is re-queued, the other named rows neither."""
    _drop_header_constraints(engine)
    _insert_raw(engine, topic, _TWO_BY_TWO, _FOUR_VALUES, b"multidimensional")
    _insert_raw(engine, topic, "ARRAY['a', 'b']::text[]", "ARRAY['\\x01'::bytea]", b"unpaired")
    drain()
    _add_header_constraints(engine, *_HEADER_CONSTRAINTS)
    rows = json.loads(_outbox("dead", "list", "--db", database_url, "--json"))
    ids = [str(i) for i in sorted(r["id"] for r in rows)]
    assert len(ids) == 2
    for args in (ids[:1], ["--all"]):
        result = CliRunner().invoke(app, ["dead", "requeue", *args, "--db", database_url])
        message = _one_line_refusal(result)
        assert ids[0] in message, message
        assert "discard" in message, message
        assert "multidimensional" in message, message
    assert len(json.loads(_outbox("dead", "list", "--db", database_url, "--json"))) == 2
