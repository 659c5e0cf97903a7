"""How long a relay that stopped answering keeps its slots (I12): pure, no I/O.

A slot is a session advisory lock, freed only when the server ends the session. A frozen
relay (SIGSTOP, a stuck VM) still answers TCP keepalives from its kernel, and a relay behind a
silent network partition answers nothing, but the server waits hours by default before it
notices. So the relay bounds its own sessions on the server: a slot or control session idle
(in a transaction or not) for ``--takeover-timeout`` is ended by the server, which frees its
locks, and another relay takes the slots over. A live relay never goes that long without a
word: each slot connection sends a heartbeat several times per timeout. The server's TCP
settings and the client's libpq keepalives bound a connection whose peer vanished mid-request.
"""

from __future__ import annotations

from collections.abc import Mapping

HEARTBEATS_PER_TIMEOUT = 4
"""A live slot connection speaks at least this often per takeover timeout."""
KEEPALIVE_PROBES = 3


def _keepalive_seconds(takeover: float) -> tuple[str, str]:
    """TCP keepalive idle time and probe interval (whole seconds, at least 1): a dead peer is
    noticed within about two thirds of the takeover timeout."""
    idle = max(1, int(takeover / 3))
    interval = max(1, int(takeover / (3 * KEEPALIVE_PROBES)))
    return str(idle), str(interval)


def server_settings(takeover: float) -> dict[str, str]:
    """Settings of a slot or control session (``SET``, any user may): the server ends it once
    it has been idle, or its peer silent, for ``takeover`` seconds."""
    ms = str(max(1, int(takeover * 1000)))
    idle, interval = _keepalive_seconds(takeover)
    return {
        "idle_session_timeout": ms,  # PostgreSQL 14+
        "idle_in_transaction_session_timeout": ms,
        "tcp_user_timeout": ms,
        "tcp_keepalives_idle": idle,
        "tcp_keepalives_interval": interval,
        "tcp_keepalives_count": str(KEEPALIVE_PROBES),
    }


def client_settings(takeover: float, given: Mapping[str, object]) -> dict[str, str]:
    """libpq keepalives for the relay's connections, so a relay cut off from its database
    notices within the takeover timeout; a value the DSN sets itself wins."""
    idle, interval = _keepalive_seconds(takeover)
    wanted = {
        "keepalives": "1",
        "keepalives_idle": idle,
        "keepalives_interval": interval,
        "keepalives_count": str(KEEPALIVE_PROBES),
        "tcp_user_timeout": str(max(1, int(takeover * 1000))),
    }
    return {name: value for name, value in wanted.items() if name not in given}


def heartbeat_interval(takeover: float) -> float:
    """Seconds between a slot connection's heartbeats."""
    return takeover / HEARTBEATS_PER_TIMEOUT
