"""``outbox dev``: throwaway PostgreSQL and Tansu for local development, and how to reach them.

Never for production: the data lives in a temporary directory and is gone when it stops.
"""

from __future__ import annotations

import shlex
import socket
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from outbox.embedded.client_settings import consumer_settings, write_settings_file
from outbox.embedded.servers import EmbeddedBroker, EmbeddedPostgres
from outbox.migrate import upgrade


@dataclass(frozen=True, slots=True)
class DevServers:
    """Where the development servers listen, as the ``outbox`` commands' variables name it."""

    db: str
    bootstrap_servers: str
    consumer_config: Path
    """``key=value`` consumer settings for a quick group join on Tansu (``outbox consume``)."""

    def environment(self) -> dict[str, str]:
        return {
            "OUTBOX_DB": self.db,
            "OUTBOX_BOOTSTRAP_SERVERS": self.bootstrap_servers,
            "OUTBOX_CONSUMER_CONFIG": str(self.consumer_config),
        }

    def assignments(self) -> list[str]:
        """``export NAME=value`` lines, quoted for ``eval``/``source`` in a POSIX shell."""
        return [f"export {name}={shlex.quote(value)}" for name, value in self.environment().items()]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether another process listens on ``host:port``, where a dev server would bind: checked
    before starting anything, since Tansu reports a taken port only by a panic in its log."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


@contextmanager
def dev_servers(
    *, db_port: int | None = None, broker_port: int | None = None, database: str = "outbox"
) -> Iterator[DevServers]:
    """Start PostgreSQL (with the outbox tables) and Tansu; stop both, files removed, on exit."""
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="outbox-dev-")))
        pg = stack.enter_context(EmbeddedPostgres(database=database, port=db_port))
        broker = stack.enter_context(EmbeddedBroker(port=broker_port))
        upgrade(pg.sqlalchemy_url)
        config = write_settings_file(workdir / "consumer.properties", consumer_settings(tansu=True))
        yield DevServers(pg.sqlalchemy_url, broker.bootstrap_servers, config)
