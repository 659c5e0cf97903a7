"""Operations: the ``outbox`` command and what it shows and serves.

- ``commands``: the typer application (``main`` is the console script);
- ``views``: ``status`` and the dead-row views and actions;
- ``health``: the health and ``/metrics`` HTTP server; ``metrics``: the consumer's collector.

``main`` and ``app`` are re-exported here, where the old ``outbox.cli`` module had them."""

from outbox.cli.commands import (
    ExitCode,
    app,
    dead_app,
    exit_code_for,
    main,
    usage_message,
)

__all__ = [
    "ExitCode",
    "app",
    "dead_app",
    "exit_code_for",
    "main",
    "usage_message",
]
