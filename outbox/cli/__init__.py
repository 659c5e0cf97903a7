"""Operations: the ``outbox`` command and what it shows and serves.

- ``commands``: ``main`` (the console script), every command module registered on ``app``;
- ``app``: the typer applications and ``command``, which registers a command with its errors
  reported by ``errors`` (exit codes, one line each); ``options``: the options commands share;
- the commands: ``schema`` (migrate, sql), ``relay``, ``consume``, ``reports`` (status, trace,
  verify), ``dead`` (dead rows, identity renew), ``demo`` (demo, dev); ``daemon``: what the
  two daemons share;
- ``views``: ``status`` and the dead-row views and actions; ``delivery``: trace and verify;
- ``health``: the health and ``/metrics`` HTTP server.

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
