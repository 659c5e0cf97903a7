"""The ``outbox`` command: every command module registered on one typer application, and
``main``, the console script.

Each command lives in a module named after what it does (``schema``, ``relay``, ``consume``,
``reports``, ``dead``, ``demo``); the options they share are declared once in ``options``;
every failure is reported in one line with a documented exit code by ``errors``.
"""

from __future__ import annotations

import os
import sys

import typer

# The command modules register their commands on import, in the order `outbox -h` lists them.
# isort: off
from outbox.cli import schema, relay, reports, dead, demo, consume

# isort: on
from outbox.cli.app import app, dead_app, identity_app
from outbox.cli.errors import (
    ENV_SOURCED,
    ExitCode,
    UsageError,
    env_sourced_flags,
    exit_code_for,
    name_sources,
    report,
    usage_message,
)

COMMAND_MODULES = (schema, relay, reports, dead, demo, consume)
"""The modules of the commands (registered on ``app`` when imported above)."""

__all__ = [
    "ExitCode",
    "app",
    "dead_app",
    "env_sourced_flags",
    "exit_code_for",
    "identity_app",
    "main",
    "name_sources",
    "usage_message",
]


def main(args: list[str] | None = None) -> None:
    """Run the command; usage errors in one line with exit code 2, never a traceback."""
    command = typer.main.get_command(app)
    argv = sys.argv[1:] if args is None else args
    ENV_SOURCED.clear()
    ENV_SOURCED.update(env_sourced_flags(command, argv, os.environ))
    try:
        code = command.main(args=argv, prog_name="outbox", standalone_mode=False)
    except typer.Abort:
        code = 130
    except Exception as exc:
        if not isinstance(exc, UsageError):
            raise
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError":  # bare `outbox` or `outbox dead`: help
            typer.echo(ctx.get_help() if ctx is not None else exc.format_message())
        else:
            report(usage_message(exc))
        code = ExitCode.USAGE
    sys.exit(code if isinstance(code, int) else ExitCode.OK)


if __name__ == "__main__":
    main()
