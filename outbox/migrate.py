"""Running the shipped Alembic migrations: from an installed wheel or a checkout."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, create_engine
from sqlalchemy.exc import OperationalError

from outbox.db import redact, sqlalchemy_url
from outbox.errors import ConfigError
from outbox.schema import VERSION_TABLE

MIGRATION_LOCK = 1869968484
"""The advisory lock that lets one migrator at a time run (``migrations/env.py`` takes it too)."""


@dataclass(frozen=True, slots=True)
class Revision:
    """One migration, as ``outbox migrate`` reports it."""

    id: str
    title: str


def migrations_dir() -> Path:
    """``outbox/_migrations`` inside the wheel, else ``migrations/`` of the checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_migrations", here.parent / "migrations"):
        if (candidate / "env.py").exists():
            return candidate
    raise FileNotFoundError("the outbox migrations are missing from this installation")


def _config(stdout: io.StringIO | None = None) -> Config:
    cfg = Config(stdout=stdout) if stdout is not None else Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    return cfg


def _current(conn: Connection) -> str | None:
    ctx = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
    return ctx.get_current_revision()


def revisions_between(lower: str | None, upper: str) -> list[Revision]:
    """The migrations above ``lower`` (None: none applied) up to ``upper``, oldest first."""
    script = ScriptDirectory.from_config(_config())
    if lower == upper:
        return []
    found = script.iterate_revisions(upper, lower or "base")
    return [
        Revision(s.revision, (s.doc or "").strip().splitlines()[0] if s.doc else "")
        for s in reversed(list(found))
    ]


def head() -> str:
    """The newest revision this version of the library ships."""
    return str(ScriptDirectory.from_config(_config()).get_current_head())


def upgrade(db: str, revision: str = "head") -> list[Revision]:
    """Create or upgrade the outbox tables (safe to run from several processes at once).

    Returns the migrations this call applied, oldest first (empty when up to date).
    """
    engine = create_engine(sqlalchemy_url(db), poolclass=None)
    try:
        with engine.begin() as conn:
            # Held to the end of the transaction, so "before" is read by the one migrator.
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
            before = _current(conn)
            cfg = _config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
            after = _current(conn)
    except OperationalError as exc:
        raise ConnectionError(
            f"migrating the outbox tables at {redact(db)}: {redact(str(exc.orig))}"
        ) from None
    finally:
        engine.dispose()
    return revisions_between(before, after) if after is not None else []


def _check_revision(script: ScriptDirectory, option: str, revision: str) -> None:
    try:
        script.get_revision(revision)
    except CommandError:
        known = ", ".join(s.revision for s in reversed(list(script.walk_revisions())))
        raise ConfigError(
            f"{option} {revision!r} is not a revision of the outbox tables (known: {known}, "
            "or 'head')"
        ) from None


def print_sql(revision: str = "head", *, since: str | None = None) -> str:
    """The DDL from ``since`` (default: an empty database) to ``revision``, to apply by hand."""
    script = ScriptDirectory.from_config(_config())
    _check_revision(script, "--to", revision)
    if since is not None:
        _check_revision(script, "--from", since)
    buf = io.StringIO()
    cfg = _config(buf)
    cfg.output_buffer = buf
    try:
        command.upgrade(cfg, f"{since}:{revision}" if since else revision, sql=True)
    except CommandError as exc:
        raise ConfigError(f"--from {since!r} --to {revision!r}: {exc}") from None
    return buf.getvalue()
