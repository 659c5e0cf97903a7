"""Helpers of the delivery record's tests: events published through ``publish()``,
``outbox verify --json`` run in-process, a database taken down to a revision, and a login
role with only the grants a test gives it."""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from alembic import command
from sqlalchemy import Engine, create_engine, make_url
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from outbox import publish
from outbox.cli import app
from outbox.db import sqlalchemy_url
from outbox.migrate import _config, _current
from tests.conftest import _libpq


def verify_json(
    database_url: str, bootstrap_servers: str, topic: str, *args: str
) -> tuple[int, Any]:
    """``outbox verify --json`` of ``topic``: its exit code (0 clean, 1 findings; anything
    else fails the test) and its report."""
    command = ["verify", "--db", database_url, "--bootstrap-servers", bootstrap_servers]
    result = CliRunner().invoke(app, [*command, "--topic", topic, "--json", *args])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


def published(engine: Engine, topic: str, n: int, keys: int = 3) -> list[str]:
    """The ids of ``n`` events committed in one transaction, keyed ``k0`` to ``k<keys-1>``
    in turn."""
    with Session(engine) as session, session.begin():
        return [
            str(publish(session, topic=topic, key=f"k{i % keys}", value={"i": i})) for i in range(n)
        ]


def downgrade(database_url: str, revision: str) -> None:
    """Take the database's outbox tables down to ``revision``."""
    engine = create_engine(sqlalchemy_url(database_url))
    try:
        with engine.begin() as conn:
            cfg = _config()
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, revision)
            assert _current(conn) == revision
    finally:
        engine.dispose()


@contextlib.contextmanager
def login_role(
    database_url: str, prefix: str, password: str, grants: Sequence[str]
) -> Iterator[str]:
    """The database's URL as a new login role given ``grants`` (each ``GRANT ... TO`` the
    role, without the ``TO``); the role and what it owns are dropped afterwards."""
    role = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(_libpq(database_url), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        for grant in grants:
            conn.execute(f"{grant} TO {role}")
    try:
        yield (
            make_url(database_url)
            .set(username=role, password=password)
            .render_as_string(hide_password=False)
        )
    finally:
        with psycopg.connect(_libpq(database_url), autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")
