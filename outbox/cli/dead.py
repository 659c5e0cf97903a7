"""``outbox dead``: the poison rows Kafka refused for good (list, show, requeue, discard), and
``outbox identity renew``, the other command that changes rows an operator names."""

from __future__ import annotations

from typing import Annotated

import typer

from outbox.cli.app import command, dead_app, identity_app
from outbox.cli.options import Db, DeadIds, Json
from outbox.errors import ConfigError


@command(dead_app, "list")
def dead_list(
    db: Db,
    limit: Annotated[
        int, typer.Option(metavar="N", min=1, help="Show at most this many, newest first.")
    ] = 50,
    as_json: Json = False,
) -> None:
    """Show poison rows with their error, newest first."""
    from outbox.cli.views import read_dead, render_dead, to_json

    rows = read_dead(db, limit)
    typer.echo(to_json(rows) if as_json else render_dead(rows))


@command(dead_app, "show", short_help="Show one poison row: key, headers, value, error.")
def dead_show(
    row_id: Annotated[
        int, typer.Argument(metavar="ID", help="Id from `outbox dead list`.", show_default=False)
    ],
    db: Db,
    as_json: Json = False,
    full: Annotated[
        bool, typer.Option("--full", help="Print the whole value (default: its first 4096 chars).")
    ] = False,
) -> None:
    """Show one poison row: key, headers, value (cut at 4096 characters unless --full), error."""
    from outbox.cli.views import read_dead_row, render_dead_row, to_json

    row = read_dead_row(db, row_id, full=full)
    typer.echo(to_json(row) if as_json else render_dead_row(row))


@command(dead_app, "requeue", short_help="Put poison rows back in the outbox.")
def dead_requeue(
    db: Db,
    ids: Annotated[
        list[int] | None,
        typer.Argument(metavar="ID", help="Ids from `outbox dead list`.", show_default=False),
    ] = None,
    all_rows: Annotated[bool, typer.Option("--all", help="Re-queue every dead row.")] = False,
) -> None:
    """Put poison rows back in the outbox after fixing the cause (they keep their order).

    All the named rows are re-queued, or none when one of them does not exist.
    """
    from outbox.cli.views import requeue

    if not ids and not all_rows:
        raise ConfigError("name the ids to re-queue (see `outbox dead list`), or pass --all")
    n = requeue(db, ids or [], all_rows=all_rows)
    typer.echo(f"re-queued {n} rows")


@command(dead_app, "discard")
def dead_discard(ids: DeadIds, db: Db) -> None:
    """Delete poison rows for good: their events are never published.

    All the named rows are discarded, or none when one of them does not exist.
    """
    from outbox.cli.views import discard

    n = discard(db, ids)
    typer.echo(f"discarded {n} rows")


@command(identity_app, "renew", short_help="Give a copied database its own identity.")
def identity_renew(db: Db) -> None:
    """Give this database a new outbox identity: the fix for a COPY of another outbox's database
    (CREATE DATABASE ... TEMPLATE, a dump restored as a second service), whose relays would
    otherwise fence the original's on every slot. Run it on the copy, with its relays stopped
    by SIGTERM; they use transactional ids of their own from their next start. Nothing
    pending is lost.
    """
    from outbox.cli.views import renew_identity

    old, new = renew_identity(db)
    typer.echo(f"outbox identity renewed: {old} -> {new}")
