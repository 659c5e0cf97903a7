"""Alembic environment for the outbox tables, shipped inside the wheel.

It runs on a connection handed in by ``outbox.migrate`` (online) or prints SQL
(offline, ``outbox sql``), and keeps its own version table so it never touches
the application's Alembic history.
"""

from __future__ import annotations

from alembic import context

from outbox.locks import MIGRATION_LOCK
from outbox.schema import VERSION_TABLE, metadata

config = context.config


def run_offline() -> None:
    context.configure(
        url="postgresql+psycopg://",
        target_metadata=metadata,
        literal_binds=True,
        version_table=VERSION_TABLE,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    connection = config.attributes["connection"]
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        # One migrator at a time, even with several relays starting together.
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
