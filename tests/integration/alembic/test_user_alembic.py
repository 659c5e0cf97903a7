"""The outbox tables in an application's own Alembic history, on real PostgreSQL.

The user's Alembic environment is a real one in a temporary directory, run by the ``alembic``
command in a subprocess, as their project would run it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, Table, create_engine, text

import outbox
from outbox.migrate import head

OUTBOX = str(Path(sys.executable).parent / "outbox")

ENV_PY = """
from alembic import context
from sqlalchemy import create_engine

from app_models import metadata
from outbox.migrate import include_object

config = context.config
engine = create_engine(config.get_main_option("sqlalchemy.url"))
with engine.connect() as connection:
    context.configure(
        connection=connection, target_metadata=metadata, include_object=include_object
    )
    with context.begin_transaction():
        context.run_migrations()
"""

MODELS = """
from sqlalchemy import Column, Integer, MetaData, Table

metadata = MetaData()
orders = Table("orders", metadata, Column("id", Integer, primary_key=True))
after = Table("after_outbox", metadata, Column("id", Integer, primary_key=True))
"""

REVISION = '''
"""orders, the outbox tables, then a table after them

Revision ID: app0001
Revises:
"""
import sqlalchemy as sa
from alembic import op

import outbox.migrate

revision = "app0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table("orders", sa.Column("id", sa.Integer(), primary_key=True))
    outbox.migrate.upgrade(op.get_bind())
    op.create_table("after_outbox", sa.Column("id", sa.Integer(), primary_key=True))
    {fail}


def downgrade() -> None:
    pass
'''


def _user_project(root: Path, url: str, *, fail: bool = False) -> Path:
    (root / "migrations" / "versions").mkdir(parents=True)
    (root / "alembic.ini").write_text(
        f"[alembic]\nscript_location = migrations\nsqlalchemy.url = {url}\n"
    )
    (root / "migrations" / "env.py").write_text(ENV_PY)
    (root / "migrations" / "script.py.mako").write_text("")
    (root / "app_models.py").write_text(MODELS)
    body = 'raise RuntimeError("the rest of this revision failed")' if fail else "pass"
    (root / "migrations" / "versions" / "app0001.py").write_text(
        textwrap.dedent(REVISION).replace("{fail}", body)
    )
    return root


def _alembic(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alembic", *args],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "PYTHONPATH": str(root)},
    )


def _outbox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([OUTBOX, *args], capture_output=True, text=True, timeout=120, check=False)


def _tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"))
            return set(rows.scalars())
    finally:
        engine.dispose()


def _storage(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            options = conn.execute(
                text("SELECT reloptions FROM pg_class WHERE relname = 'outbox_events'")
            ).scalar_one()
            return set(options or [])
    finally:
        engine.dispose()


def test_i8_upgrade_in_a_users_revision_migrates_in_its_transaction_and_alembic_goes_on(
    tmp_path: Path, unmigrated_database_url: str
) -> None:
    """``outbox.migrate.upgrade(op.get_bind())`` inside the user's revision: the outbox tables,
    their storage parameters and version record, and the rest of the revision still runs."""
    root = _user_project(tmp_path, unmigrated_database_url)
    done = _alembic(root, "upgrade", "head")
    assert done.returncode == 0, done.stderr[-3000:]
    tables = _tables(unmigrated_database_url)
    assert {"orders", "after_outbox", "alembic_version"} <= tables
    assert set(outbox.metadata.tables) <= tables
    assert "autovacuum_vacuum_threshold=5000" in _storage(unmigrated_database_url)
    engine = create_engine(unmigrated_database_url)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "app0001"
        assert conn.execute(text("SELECT count(*) FROM outbox_identity")).scalar() == 1
    engine.dispose()

    migrated = _outbox("migrate", "--db", unmigrated_database_url)
    assert migrated.returncode == 0, migrated.stderr
    assert "already up to date" in migrated.stdout
    status = _outbox("status", "--db", unmigrated_database_url, "--check")
    assert status.returncode == 0, status.stdout + status.stderr
    assert _alembic(root, "current").stdout.split()[0] == "app0001"


def test_i1_a_user_revision_that_fails_after_upgrade_leaves_no_outbox_tables(
    tmp_path: Path, unmigrated_database_url: str
) -> None:
    """The outbox migration commits or rolls back with the user's revision."""
    root = _user_project(tmp_path, unmigrated_database_url, fail=True)
    done = _alembic(root, "upgrade", "head")
    assert done.returncode != 0
    assert "the rest of this revision failed" in done.stderr
    assert not _tables(unmigrated_database_url) & (set(outbox.metadata.tables) | {"orders"})


@pytest.mark.parametrize("with_outbox_metadata", [False, True], ids=["own", "merged"])
def test_include_object_keeps_autogenerate_from_creating_or_dropping_the_outbox_tables(
    database_url: str, with_outbox_metadata: bool
) -> None:
    from outbox.migrate import include_object

    user = MetaData()
    Table("orders", user, Column("id", Integer, primary_key=True))
    if with_outbox_metadata:
        for table in outbox.metadata.tables.values():
            table.to_metadata(user)
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            user.tables["orders"].create(conn)
            plain = compare_metadata(MigrationContext.configure(conn), user)
            context = MigrationContext.configure(conn, opts={"include_object": include_object})
            assert compare_metadata(context, user) == []
    finally:
        engine.dispose()
    assert plain, "without the hook autogenerate touches the outbox tables"


def test_i8_migrate_stamps_tables_made_from_outbox_metadata_and_sets_their_storage(
    unmigrated_database_url: str,
) -> None:
    engine = create_engine(unmigrated_database_url)
    outbox.metadata.create_all(engine)
    engine.dispose()
    done = _outbox("migrate", "--db", unmigrated_database_url)
    assert done.returncode == 0, done.stderr
    assert f"revision {head()}" in done.stdout
    assert "stamped" in done.stderr
    assert "autovacuum_vacuum_threshold=5000" in _storage(unmigrated_database_url)
    status = _outbox("status", "--db", unmigrated_database_url, "--check")
    assert status.returncode == 0, status.stdout + status.stderr


def test_i8_migrate_on_outbox_tables_that_differ_says_what_to_do_in_one_line(
    unmigrated_database_url: str,
) -> None:
    engine = create_engine(unmigrated_database_url)
    outbox.metadata.tables["outbox_events"].create(engine)
    engine.dispose()
    done = _outbox("migrate", "--db", unmigrated_database_url)
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: the outbox tables exist without an outbox_alembic_version")
    assert "docs/alembic.md" in line
    assert "Traceback" not in done.stderr
