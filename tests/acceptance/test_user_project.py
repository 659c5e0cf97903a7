"""The library as a user's own project sees it: installed, typed, checked by their tools."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
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


USER_TESTS = """
from __future__ import annotations

import sys
import threading
import time
import uuid

from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from consumer import Event, IdempotentConsumer
from outbox import apublish, publish
from outbox.testing import drain, published


def test_no_fixture_starts_no_server() -> None:
    assert "outbox.embedded" not in sys.modules


class Projector(IdempotentConsumer):
    group_id = "user-projector"

    def handle(self, session: Session, event: Event) -> None:
        session.execute(text("INSERT INTO seen VALUES (:id)"), {"id": event.id})


def test_an_event_goes_from_the_app_through_the_broker_to_a_consumer_once(
    outbox_database_url: str,
    outbox_bootstrap_servers: str,
    outbox_consumer_settings: dict[str, str],
) -> None:
    topic = f"orders.{uuid.uuid4().hex[:8]}"
    engine = create_engine(outbox_database_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE seen (id text PRIMARY KEY)"))
    with Session(engine) as session, session.begin():
        publish(session, topic=topic, key="alice", value={"total": 1})
        [event] = published(session, topic=topic)
    assert drain(outbox_database_url, outbox_bootstrap_servers).published == 1
    projector = Projector(
        outbox_database_url, outbox_bootstrap_servers, topics=[topic],
        group_id=f"g-{topic}", settings=outbox_consumer_settings,
    )
    started = time.monotonic()
    thread = threading.Thread(target=projector.run)
    thread.start()
    try:
        deadline = started + 60
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                if conn.execute(text("SELECT id FROM seen")).scalars().all():
                    break
            time.sleep(0.05)
        took = time.monotonic() - started
    finally:
        projector.stop.set()
        thread.join(30)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT id FROM seen")).scalars().all() == [str(event.event_id)]
    print(f"JOINED_AND_APPLIED_IN {took:.2f}")
    engine.dispose()


def test_each_test_gets_its_own_database(outbox_database_url: str) -> None:
    engine = create_async_engine(outbox_database_url)

    async def scenario() -> int:
        async with AsyncSession(engine) as session, session.begin():
            await apublish(session, topic="t", key=None, value={})
            return len(await published(session))

    import asyncio

    assert asyncio.run(scenario()) == 1  # nothing left over from the other test
    asyncio.run(engine.dispose())
"""


DOCS = Path(__file__).resolve().parents[2] / "docs"


def code_blocks_marked_tested(page: Path) -> dict[str, str]:
    """The code blocks of a docs page marked ``<!-- tested: FILE -->``, by file name."""
    blocks: dict[str, str] = {}
    for part in page.read_text().split("<!-- tested: ")[1:]:
        name, _, rest = part.partition(" -->")
        blocks[name] = rest.split("```python\n", 1)[1].split("\n```", 1)[0] + "\n"
    return blocks


def test_the_pytest_plugin_gives_a_users_tests_a_database_and_a_broker_in_seconds(
    tmp_path: Path,
) -> None:
    """A user's test files, run by pytest outside the checkout, with only the plugin's fixtures:
    a fresh migrated database per test, a running broker, and a consumer group that joins in
    seconds without settings copied from anywhere. The complete example of docs/testing.md
    is among them, as the page shows it."""
    blocks = code_blocks_marked_tested(DOCS / "testing.md")
    assert set(blocks) == {"shop.py", "test_shop.py"}
    for name, code in blocks.items():
        (tmp_path / name).write_text(code)
    (tmp_path / "test_app.py").write_text(textwrap.dedent(USER_TESTS))
    started = time.monotonic()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-s",
            "-p",
            "no:cacheprovider",
            "test_app.py",
            "test_shop.py",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    took = time.monotonic() - started
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "6 passed" in result.stdout
    [line] = [ln for ln in result.stdout.splitlines() if "JOINED_AND_APPLIED_IN" in ln]
    joined = float(line.split("JOINED_AND_APPLIED_IN")[1].split()[0])
    print(f"user test run {took:.1f}s; consumer joined and applied in {joined:.2f}s")
    assert joined < 20, f"a fresh group took {joined:.1f}s to join and apply (Tansu: ~3 s)"
