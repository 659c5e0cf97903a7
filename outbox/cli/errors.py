"""How every ``outbox`` command fails: one line on stderr, ``error: <what is wrong>: <the fix>``,
and one of the exit codes of ``ExitCode`` (listed in docs/reference/cli.md).

``reported`` is the one place a command's errors become that line and that code; ``main``
sends typer's usage errors through ``report`` too. Messages go through ``redact`` (no
password of a URL) and name the environment variable a value came from instead of its flag.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from enum import IntEnum
from typing import Any, ParamSpec, Protocol, TypeVar, runtime_checkable

import typer

from outbox.db import redact
from outbox.errors import (
    ConfigError,
    NotFound,
    NotMigrated,
    OutboxError,
    SlotLost,
    TransientError,
)


class ExitCode(IntEnum):
    """What ``outbox`` exits with; "Exit codes" in docs/reference/cli.md lists the same."""

    OK = 0
    FAILED = 1
    """A check failed (``status --check``, the demo) or a daemon stopped on an error."""
    USAGE = 2
    """A bad option, environment variable or setting: the message names it and the fix."""
    UNAVAILABLE = 3
    """PostgreSQL or Kafka could not be reached."""
    NOT_MIGRATED = 4
    """The outbox tables are missing or out of date: run ``outbox migrate``."""
    NOT_FOUND = 5
    """A named row does not exist (``dead show/requeue/discard ID``); nothing was changed."""


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code of an error a command could not go on after (a table, most specific first)."""
    table: list[tuple[type[BaseException], ExitCode]] = [
        (NotMigrated, ExitCode.NOT_MIGRATED),
        (NotFound, ExitCode.NOT_FOUND),
        (ConfigError, ExitCode.USAGE),
        (ConnectionError, ExitCode.UNAVAILABLE),
        (TransientError, ExitCode.UNAVAILABLE),
        (SlotLost, ExitCode.FAILED),
    ]
    return next((code for kind, code in table if isinstance(exc, kind)), ExitCode.FAILED)


def env_sourced_flags(command: Any, args: list[str], environ: Mapping[str, str]) -> dict[str, str]:
    """``--flag`` -> ``ENV_VAR`` for the options of the invoked command (and its groups) whose
    value comes from the environment: the variable is set and the flag is not given.

    Worked out from the command tree (only public attributes of typer's commands), so an
    error can name where a value came from without typer's private click.
    """
    found: dict[str, str] = {}
    cmd, rest = command, list(args)
    while cmd is not None:
        for param in getattr(cmd, "params", []):
            envvar = getattr(param, "envvar", None)
            opts = list(getattr(param, "opts", []))
            given = any(a == o or a.startswith(f"{o}=") for a in args for o in opts)
            if isinstance(envvar, str) and envvar in environ and not given:
                found.update(dict.fromkeys(opts, envvar))
        subcommands = getattr(cmd, "commands", None)
        name = next((a for a in rest if not a.startswith("-")), None)
        if not subcommands or name is None:
            break
        rest = rest[rest.index(name) + 1 :]
        cmd = subcommands.get(name)
    return found


ENV_SOURCED: dict[str, str] = {}
"""``env_sourced_flags`` of this process's command line, set by ``main()``."""


def name_sources(message: str, env_sources: dict[str, str]) -> str:
    """Name the environment variable instead of the flag for a value that came from the env."""
    for flag, envvar in env_sources.items():
        message = re.sub(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", envvar, message)
    return message


def report(message: str) -> None:
    """Print ``error: <message>`` as one line on stderr, without any password it held."""
    typer.echo(f"error: {' '.join(redact(message).split())}", err=True)


def fail(exc: BaseException) -> typer.Exit:
    """Report ``exc`` (naming where its values came from); the Exit with its code to raise."""
    report(name_sources(redact(str(exc)), ENV_SOURCED))
    return typer.Exit(int(exit_code_for(exc)))


REPORTED: tuple[type[BaseException], ...] = (OutboxError, ConnectionError)
"""What any command reports in one line; anything else is a defect and keeps its traceback."""

P = ParamSpec("P")
R = TypeVar("R")


def reported(command: Callable[P, R], also: tuple[type[BaseException], ...] = ()) -> Callable[P, R]:
    """``command`` with its errors (``REPORTED`` and ``also``) reported by ``fail``.

    ``functools.wraps`` keeps the signature and annotations that typer reads the options from.
    """

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return command(*args, **kwargs)
        except typer.Exit:  # a command's own exit code, even where ``also`` is Exception
            raise
        except (*REPORTED, *also) as exc:
            raise fail(exc) from None

    return run


@runtime_checkable
class UsageError(Protocol):
    """What typer's (vendored) click raises for bad usage: its classes are private."""

    exit_code: int

    def format_message(self) -> str: ...


def _from_environment(ctx: Any, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return getattr(source, "name", None) == "ENVIRONMENT"


def usage_message(exc: UsageError) -> str:
    """A usage error in one line, naming the flag, or the environment variable it came from."""
    ctx = getattr(exc, "ctx", None)
    # A missing parameter is a BadParameter too, told apart by its param_type.
    if isinstance(exc, typer.BadParameter) and not hasattr(exc, "param_type"):
        param = exc.param
        where = None
        if param is not None and param.name and ctx is not None:
            envvar = getattr(param, "envvar", None)
            if isinstance(envvar, str) and _from_environment(ctx, param.name):
                where = envvar
            else:
                where = max(param.opts, key=len) if param.opts else param.name
        detail = exc.message.removeprefix("Value error, ")
        message = f"invalid value for {where}: {detail}" if where else exc.format_message()
    else:
        message = exc.format_message()
    if ctx is not None:
        message += f" (see `{ctx.command_path} -h`)"
    return " ".join(message.split())
