"""What the two daemons (``outbox relay``, ``outbox consume``) share: the schema check before
they start, stopping on SIGTERM/SIGINT, and the per-process health and metrics endpoint."""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from typing import TYPE_CHECKING, Any

from outbox.errors import ConfigError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from outbox.cli.health import HealthServer


def stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: Any) -> None:
        logging.getLogger("outbox").info(
            "%s: finishing the current batch, then stopping", signal.Signals(signum).name
        )
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def check_schema(db: str) -> None:
    """Fail with "run outbox migrate" before a daemon starts on an unmigrated database."""
    from outbox.cli.views import check_schema as check

    with contextlib.suppress(ConnectionError):  # the daemon's own start-up retries that
        check(db)


def serve_health(
    host: str, port: int | None, runner: Any, registry: CollectorRegistry
) -> HealthServer | None:
    """The per-process HTTP endpoint, when a port is configured."""
    if port is None:
        return None
    from outbox.cli.health import HealthServer

    try:
        return HealthServer(
            host=host,
            port=port,
            registry=registry,
            live=runner.liveness,
            ready=runner.readiness,
        ).start()
    except OSError as exc:
        msg = f"--metrics-port={port}: cannot listen on {host}:{port}: {exc}"
        raise ConfigError(msg) from None
