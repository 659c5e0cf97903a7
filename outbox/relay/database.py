"""The relay's PostgreSQL sessions: what the coordinator needs of one, and how it opens them.

``ControlSession`` is the seam: the slot layout and identity checks run through it, so they
are tested with a scripted session; a psycopg connection (``Connector.session``) is the real
one. ``Connector`` opens the relay's connections with its keepalives and has the server bound
them (I12).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

import psycopg
from psycopg.conninfo import conninfo_to_dict

from outbox import sql
from outbox.db import connect, libpq_dsn, redact
from outbox.relay.backoff import backoff
from outbox.relay.sessions import client_settings, server_settings

log = logging.getLogger("outbox.relay")

Connection = psycopg.Connection[dict[str, Any]]


class Rows(Protocol):
    """A statement's result (a psycopg cursor with ``dict_row``)."""

    def fetchone(self) -> dict[str, Any] | None: ...

    def fetchall(self) -> list[dict[str, Any]]: ...


class ControlSession(Protocol):
    """What the coordinator's checks use of a database session: run a named statement of
    ``outbox.sql``, and group statements in a transaction."""

    def execute(self, query: Any, params: Mapping[str, Any] | None = None, /) -> Rows: ...

    def transaction(self) -> AbstractContextManager[Any]: ...


def line(exc: BaseException) -> str:
    """A database error on one line, credentials redacted."""
    return " ".join(redact(str(exc)).split())


class Connector:
    """Opens the relay's connections: keepalives on the client, a silence bound on the server."""

    def __init__(self, dsn: str, takeover_timeout: float, *, once: bool) -> None:
        self.dsn = dsn
        self.takeover_timeout = takeover_timeout
        self.once = once
        self._keepalives = client_settings(takeover_timeout, conninfo_to_dict(libpq_dsn(dsn)))
        self._bounds_refused: set[str] = set()  # session settings this server does not know

    def session(self, application_name: str) -> Connection:
        """A connection with the relay's keepalives: a relay cut off from its database
        notices within --takeover-timeout."""
        return connect(self.dsn, application_name=application_name, params=self._keepalives)

    def first(self, application_name: str, stop: threading.Event) -> Connection:
        """A daemon waits for its database (it may start first); ``--once`` fails at once."""
        attempt = 0
        while True:
            try:
                return self.session(application_name)
            except ConnectionError as exc:
                if self.once or stop.is_set():
                    raise
                attempt += 1
                delay = backoff(attempt)
                log.warning("%s; retrying in %.0f s", exc, delay)
                stop.wait(delay)

    def bound(self, conn: Connection) -> None:
        """Have the server end this session once it has been silent for --takeover-timeout
        (frozen or cut off), freeing its slot and its announcement for another relay (I12)."""
        wanted = server_settings(self.takeover_timeout)
        settings = {k: v for k, v in wanted.items() if k not in self._bounds_refused}
        try:
            conn.execute(
                sql.SET_SESSION, {"names": list(settings), "settings": list(settings.values())}
            )
        except psycopg.errors.UndefinedObject as exc:  # idle_session_timeout: PostgreSQL < 14
            if "idle_session_timeout" in self._bounds_refused:
                raise
            self._bounds_refused.add("idle_session_timeout")
            log.warning(
                "this PostgreSQL has no idle_session_timeout (%s; it came in 14): a frozen "
                "relay's slots are freed only by TCP keepalives, which its kernel still answers",
                line(exc),
            )
            self.bound(conn)
