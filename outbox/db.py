"""The small seam between the relay and the PostgreSQL driver.

Accepts a SQLAlchemy URL (``postgresql+psycopg://``) or a libpq DSN, and never
lets a password reach a log line or an error message.
"""

from __future__ import annotations

import re

import psycopg
from psycopg.rows import dict_row
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from outbox.errors import ConfigError

_PASSWORD_IN_URL = re.compile(r"(://[^:/@]*:)[^@]*@")
_PASSWORD_KV = re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE)


def redact(text: str) -> str:
    """Hide passwords in anything that may hold a DSN (URLs and key=value strings)."""
    return _PASSWORD_KV.sub(r"\1***", _PASSWORD_IN_URL.sub(r"\1***@", text))


def libpq_dsn(db: str) -> str:
    """A DSN psycopg understands, from a SQLAlchemy URL or a libpq string."""
    db = db.strip()
    if not db:
        raise ConfigError("--db is empty: pass postgresql+psycopg://user@host/dbname")
    if "://" not in db:
        return db
    try:
        url = make_url(db)
    except ArgumentError:
        raise ConfigError(f"--db {redact(db)!r} is not a database URL") from None
    if url.get_backend_name() != "postgresql":
        raise ConfigError(
            f"--db {redact(db)!r} is not PostgreSQL; the outbox needs postgresql+psycopg://..."
        )
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def sqlalchemy_url(db: str) -> str:
    """A SQLAlchemy URL on psycopg 3, from either form the CLI accepts."""
    if "://" not in db:
        raise ConfigError(
            "--db must be a URL (postgresql+psycopg://user@host/dbname) for this command"
        )
    url = make_url(db.strip())
    if url.get_backend_name() != "postgresql":
        raise ConfigError(f"--db {redact(db)!r} is not PostgreSQL")
    return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def connect(db: str, *, application_name: str, autocommit: bool = True) -> psycopg.Connection[dict[str, object]]:
    """A dedicated session: advisory locks and LISTEN need one (not a transaction pooler)."""
    try:
        return psycopg.connect(
            libpq_dsn(db),
            autocommit=autocommit,
            application_name=application_name,
            row_factory=dict_row,
            connect_timeout=10,
        )
    except psycopg.OperationalError as exc:
        raise ConnectionError(f"cannot connect to PostgreSQL: {redact(str(exc))}") from None
