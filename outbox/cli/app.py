"""The ``outbox`` command tree: the typer applications the command modules register on.

Every command is registered through ``command``, so its errors end in one line and a
documented exit code (``outbox.cli.errors.reported``) without a try/except of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any, TypeVar

import typer

from outbox.cli.errors import reported

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}

app = typer.Typer(
    help="Transactional outbox for PostgreSQL + Kafka: migrate, relay, inspect, demo.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help wraps at any width; rich tables cut option names
    context_settings=CONTEXT,
)
dead_app = typer.Typer(
    help="Poison rows that Kafka refused for good: list, show, requeue, discard.",
    short_help="Poison rows Kafka refused: list, show, requeue, discard.",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings=CONTEXT,
)
app.add_typer(dead_app, name="dead")
identity_app = typer.Typer(
    help="This outbox's identity (it names its transactional ids and recovery markers).",
    short_help="This outbox's identity: renew a copied database's.",
    no_args_is_help=True,
    rich_markup_mode=None,
    context_settings=CONTEXT,
)
app.add_typer(identity_app, name="identity")

F = TypeVar("F", bound=Callable[..., Any])


def command(
    group: typer.Typer,
    name: str | None = None,
    *,
    also: tuple[type[BaseException], ...] = (),
    short_help: str | None = None,
) -> Callable[[F], F]:
    """Register the decorated function as a command of ``group``; its errors (``OutboxError``,
    ``ConnectionError``, and the kinds in ``also``) are reported in one line."""

    def register(function: F) -> F:
        group.command(name, short_help=short_help)(reported(function, also))
        return function

    return register


def _version(value: bool) -> None:
    if value:
        try:
            typer.echo(f"outbox (kafka-outbox) {version('kafka-outbox')}")
        except PackageNotFoundError:  # a checkout without an install
            typer.echo("outbox (kafka-outbox) unknown version")
        raise typer.Exit()


@app.callback()
def _root(
    _version_flag: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version,
            is_eager=True,
            help="Print the version and exit.",
        ),
    ] = False,
) -> None:
    """Transactional outbox for PostgreSQL + Kafka: migrate, relay, inspect, demo."""
