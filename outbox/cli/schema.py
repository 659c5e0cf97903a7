"""``outbox migrate`` and ``outbox sql``: create or upgrade the outbox tables, or print the DDL."""

from __future__ import annotations

from typing import Annotated

import typer

from outbox.cli.app import app, command
from outbox.cli.options import Db, LogLevel, LogLevelName, start_logging


@command(app, also=(Exception,), short_help="Create or upgrade the outbox tables.")
def migrate(db: Db, log_level: LogLevel = LogLevelName.WARNING) -> None:
    """Create or upgrade the outbox tables (Alembic, own version table), and say what it did."""
    from outbox.migrate import head, upgrade

    start_logging(log_level)
    applied = upgrade(db)  # whatever goes wrong ends in one line (also=Exception), no traceback
    for rev in applied:
        typer.echo(f"applied {rev.id}: {rev.title}")
    typer.echo(
        f"outbox tables are at revision {head()} (head)"
        + ("" if applied else ": already up to date, nothing applied")
    )


@command(app, "sql", short_help="Print the DDL, to apply by hand.")
def print_sql(
    from_rev: Annotated[
        str | None,
        typer.Option(
            "--from",
            metavar="REV",
            help="Revision the database is at (default: an empty database).",
        ),
    ] = None,
    to_rev: Annotated[str, typer.Option("--to", metavar="REV", help="Revision to reach.")] = "head",
) -> None:
    """Print the DDL of the migrations from --from to --to, for applying by hand."""
    from outbox.migrate import print_sql as render

    typer.echo(render(to_rev, since=from_rev))
