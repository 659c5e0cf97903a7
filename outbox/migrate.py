"""Running the shipped Alembic migrations: from an installed wheel, a checkout, or a revision
of the application's own Alembic history (``upgrade(op.get_bind())``, see docs/alembic.md)."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic import context as alembic_context
from alembic import op as alembic_op
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, create_engine, inspect
from sqlalchemy.exc import OperationalError

from outbox.db import SESSION_ENCODING, redact, sqlalchemy_url
from outbox.errors import ConfigError
from outbox.locks import MIGRATION_LOCK  # migrations/env.py takes it too
from outbox.schema import OUTBOX_STORAGE, VERSION_TABLE, metadata

log = logging.getLogger("outbox.migrate")


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


TABLE_PREFIX = "outbox_"
"""Every table the outbox migrations create (and its version table) is named ``outbox_...``."""


def include_object(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    """Alembic's ``include_object`` hook: leave the outbox's tables to ``outbox.migrate``.

    ``context.configure(..., include_object=include_object)`` in your env.py keeps
    ``alembic revision --autogenerate`` from creating the outbox tables (when your metadata
    includes ``outbox.metadata``) or dropping them (when it does not). Tables named
    ``outbox_*``, their columns, indexes and constraints are skipped.
    """
    table = name if type_ == "table" else getattr(getattr(obj, "table", None), "name", None)
    return not (isinstance(table, str) and table.startswith(TABLE_PREFIX))


@contextmanager
def _alembic_proxies_kept() -> Iterator[None]:
    """Run an Alembic command inside another one's revision without breaking the outer one.

    ``alembic.context`` and ``alembic.op`` are module-level proxies: a nested command installs
    its own and removes them on exit, which left the outer revision's ``op``/``context``
    without a target (``KeyError: 'config'``). The outer ones are put back.
    """
    outer = [getattr(module, "_proxy", None) for module in (alembic_context, alembic_op)]
    try:
        yield
    finally:
        for proxy in outer:
            if proxy is not None:
                proxy._install_proxy()


def _outbox_tables(conn: Connection) -> list[str]:
    return sorted(t for t in inspect(conn).get_table_names() if t in metadata.tables)


def _describe(diffs: list[Any]) -> str:
    """The first of Alembic's differences in a few words (``add_column outbox_events``)."""
    first = diffs[0][0] if isinstance(diffs[0], list) else diffs[0]
    words = [str(part) for part in first[:3] if isinstance(part, str)]
    return f"{len(diffs)} differences, e.g. {' '.join(words)}"


def _adopt(conn: Connection, script: ScriptDirectory) -> None:
    """Tables without a version record: stamp them when they are head's, else say what to do."""
    head_rev = str(script.get_current_head())
    context = MigrationContext.configure(
        conn,
        opts={
            "version_table": VERSION_TABLE,
            "include_object": lambda _o, name, type_, _r, _c: (
                type_ != "table" or name in metadata.tables
            ),
        },
    )
    missing = sorted(set(metadata.tables) - set(_outbox_tables(conn)))
    diffs = compare_metadata(context, metadata)
    if missing or diffs:
        found = f"missing {', '.join(missing)}" if missing else _describe(diffs)
        raise ConfigError(
            f"the outbox tables exist without an {VERSION_TABLE} record and differ from "
            f"revision {head_rev} ({found}): create them with `outbox migrate` (drop them "
            "first if they hold no events) or with outbox.migrate.upgrade(op.get_bind()) in "
            "your own Alembic history (docs/alembic.md), not from outbox.metadata"
        )
    storage = ", ".join(f"{k} = {v}" for k, v in OUTBOX_STORAGE.items())
    conn.exec_driver_sql(f"ALTER TABLE outbox_events SET ({storage})")
    conn.exec_driver_sql(
        "INSERT INTO outbox_identity (outbox_id) SELECT gen_random_uuid() "
        "WHERE NOT EXISTS (SELECT 1 FROM outbox_identity)"
    )
    context.stamp(script, head_rev)
    log.warning(
        "the outbox tables existed without a version record and match revision %s: stamped "
        "them, set the outbox_events storage parameters",
        head_rev,
    )


def _upgrade_on(conn: Connection, revision: str) -> tuple[str | None, str | None]:
    """Migrate in ``conn``'s transaction: (revision before, revision after)."""
    # Held to the end of the transaction, so "before" is read by the one migrator.
    conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
    before = _current(conn)
    cfg = _config()
    if before is None and _outbox_tables(conn):
        _adopt(conn, ScriptDirectory.from_config(cfg))
    cfg.attributes["connection"] = conn
    with _alembic_proxies_kept():
        command.upgrade(cfg, revision)
    return before, _current(conn)


def upgrade(db: str | Connection, revision: str = "head") -> list[Revision]:
    """Create or upgrade the outbox tables (safe to run from several processes at once).

    ``db``: a URL (migrated and committed here), or a SQLAlchemy Connection, e.g.
    ``op.get_bind()`` in a revision of your own Alembic history: migrated inside its
    transaction, which your migration commits. Tables that exist without the outbox's
    version record (made from ``outbox.metadata``) are stamped when they match, else
    refused with what to do. Returns the migrations this call applied, oldest first.
    """
    if isinstance(db, Connection):
        before, after = _upgrade_on(db, revision)
        return revisions_between(before, after) if after is not None else []
    engine = create_engine(
        sqlalchemy_url(db), poolclass=None, connect_args={"client_encoding": SESSION_ENCODING}
    )
    try:
        with engine.begin() as conn:
            before, after = _upgrade_on(conn, revision)
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
