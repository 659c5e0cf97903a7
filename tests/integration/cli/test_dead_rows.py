"""``outbox dead``: what an operator sees of poison rows, on the real database and broker."""

from __future__ import annotations

import json
from collections.abc import Callable

from sqlalchemy import Engine
from sqlalchemy.orm import Session
from typer.testing import CliRunner

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
