"""Alembic environment of the shop: its own tables and, in one revision, the outbox's."""

from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine

from outbox.migrate import include_object
from shop.models import Base

url = context.config.get_main_option("sqlalchemy.url") or os.environ["OUTBOX_DB"]
engine = create_engine(url)
with engine.connect() as connection:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        include_object=include_object,  # --autogenerate leaves the outbox tables alone
    )
    with context.begin_transaction():
        context.run_migrations()
engine.dispose()
