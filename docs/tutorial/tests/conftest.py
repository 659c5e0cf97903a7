"""The shop's fixtures, on the outbox plugin's: a fresh migrated database per test."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.config import Config


@pytest.fixture
def db_url(outbox_database_url: str) -> str:
    """The shop's Alembic history applied on the plugin's database (outbox tables included)."""
    config = Config("alembic.ini")
    config.set_main_option("sqlalchemy.url", outbox_database_url)
    command.upgrade(config, "head")
    return outbox_database_url
