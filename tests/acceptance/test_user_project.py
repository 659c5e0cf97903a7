"""The library as a user's own project sees it: installed, typed, checked by their tools."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

USER_MODULE = '''
"""A user's app module: publishes in its own transaction, projects with a consumer."""

from __future__ import annotations

import uuid

from sqlalchemy.orm import Session

from consumer import Event, IdempotentConsumer
from outbox import publish
from outbox.testing import PublishedEvent, published


def place_order(session: Session, customer: str) -> uuid.UUID:
    return publish(session, topic="orders.v1", key=customer, value={"customer": customer})


class Projector(IdempotentConsumer):
    topics = ["orders.v1"]
    group_id = "projector"

    def handle(self, session: Session, event: Event) -> None:
        session.info["last"] = event.id


def first(session: Session) -> PublishedEvent:
    return published(session, topic="orders.v1")[0]


def run(db: str, servers: str) -> int:
    return Projector(db, servers).run().applied
'''


def test_a_user_module_that_publishes_and_subclasses_the_consumer_is_clean_under_mypy_strict(
    tmp_path: Path,
) -> None:
    """The packages ship ``py.typed``: mypy checks a user's code against their types.

    Run outside the checkout (no project configuration), against the installed package.
    """
    (tmp_path / "app.py").write_text(textwrap.dedent(USER_MODULE))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--config-file=",
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            "app.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stdout
