"""The examples are tested the way a user's app is: with the fixtures of ``outbox.pytest_plugin``.

Its servers are pointed at the suite's own (one PostgreSQL, the broker of the ``broker``
parameter), so no second set starts; its databases and helpers are the plugin's own.
"""

from __future__ import annotations

from typing import Any

import pytest


@pytest.fixture(scope="session")
def outbox_postgres_url(services: Any) -> str:
    """The suite's PostgreSQL server (``services`` of tests/conftest.py)."""
    return str(services.admin_url)


@pytest.fixture
def outbox_bootstrap_servers(bootstrap_servers: str) -> str:
    return bootstrap_servers
