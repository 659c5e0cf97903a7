"""The read-only reports: ``outbox status`` (pending rows, lag, slot owners, dead rows),
``outbox trace`` (where one event went) and ``outbox verify`` (a topic checked against the
delivery record and the consumer groups)."""

from __future__ import annotations

from typing import Annotated

import typer

from outbox.cli.app import app, command
from outbox.cli.errors import ExitCode
from outbox.cli.options import (
    Bootstrap,
    Db,
    Json,
    ProducerConfig,
    client_settings,
    client_settings_option,
    finite,
)
from outbox.errors import ConfigError, EventError, OutboxError


@command(app, short_help="Pending rows, lag, slot owners, dead rows.")
def status(
    db: Db,
    as_json: Json = False,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="One line; exit 1 when there are dead rows, or lag above --max-lag (cron jobs, "
            "probes).",
        ),
    ] = False,
    max_lag: Annotated[
        float | None,
        typer.Option(
            "--max-lag",
            metavar="SECONDS",
            min=0,
            callback=finite,
            help="With --check: also fail when the oldest pending event is older than this.",
        ),
    ] = None,
) -> None:
    """Pending rows per topic, oldest pending age, slot owners, dead rows. With --check: one
    line, `ok: ...` on stdout, or the problems on stderr with exit 1."""
    from outbox.cli.views import read_status, render_status, status_line, status_problems, to_json

    report = read_status(db)
    problems = status_problems(report, max_lag=max_lag) if check or max_lag is not None else []
    if as_json:
        typer.echo(to_json({**report, "problems": problems}))
    elif check:
        if not problems:
            typer.echo(status_line(report))
    else:
        typer.echo(render_status(report))
    if problems:
        raise OutboxError("; ".join(problems))  # reported with ExitCode.FAILED


@command(app, short_help="Where one event went: pending, published (where), dead; who applied it.")
def trace(
    event_id: Annotated[
        str,
        typer.Argument(metavar="EVENT_ID", help="The id publish() returned.", show_default=False),
    ],
    db: Db,
    as_json: Json = False,
) -> None:
    """Where one event went: pending, published (topic, partition, offset, time), dead (error
    and tries) or unknown (older than the delivery record's retention); every consumer group
    that applied it, and its dead letter if a group dead-lettered it."""
    from outbox.cli.delivery import parse_event_id, read_trace, render_trace, to_json

    found = read_trace(db, parse_event_id(event_id))
    typer.echo(to_json(found) if as_json else render_trace(found).rstrip("\n"))


@command(
    app, short_help="Check a topic against the delivery record and the consumer groups (read-only)."
)
def verify(
    db: Db,
    bootstrap_servers: Bootstrap,
    topic: Annotated[
        str, typer.Option(metavar="TOPIC", help="The topic to check.", show_default=False)
    ],
    group: Annotated[
        list[str] | None,
        typer.Option(
            metavar="GROUP", help="A consumer group to check too (repeatable).", show_default=False
        ),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            metavar="DURATION",
            help="Only events published this recently (30m, 24h, 7d); default: the whole "
            "delivery record.",
            show_default=False,
        ),
    ] = None,
    client_setting: Annotated[
        list[str] | None,
        client_settings_option(
            "librdkafka settings as given to the relay (repeatable); the connection and "
            "security ones (SASL/TLS) are used."
        ),
    ] = None,
    producer_config: ProducerConfig = None,
    as_json: Json = False,
) -> None:
    """Read the topic to its end (read_committed) and the delivery record, and report events
    lost from their offset, duplicated, or out of key order, records not this outbox's, and per
    group the lag and the events it can no longer read. Exits 0 when clean, 1 with findings."""
    from outbox.cli.delivery import parse_duration, read_verify, render_verify, to_json, verify_json
    from outbox.codec import check_topic
    from outbox.relay.config import connection_settings

    def progress(read: int, total: int) -> None:
        typer.echo(f"read {read} of about {total} records", err=True)

    window = parse_duration(since) if since is not None else None
    for g in group or []:
        if not g.strip():  # confluent-kafka's Consumer aborts the interpreter on group.id ''
            raise ConfigError(f"--group {g!r} is empty: give a consumer group's group.id")
    try:
        check_topic(topic)
    except EventError:
        raise ConfigError(
            f"--topic {topic!r} is not a Kafka topic name: give 1-249 characters from "
            "[a-zA-Z0-9._-], not '.' or '..'"
        ) from None
    settings = connection_settings(client_settings(producer_config, client_setting))
    report = read_verify(
        db,
        bootstrap_servers,
        settings,
        topic,
        group or [],
        window,
        None if as_json else progress,
    )
    typer.echo(to_json(verify_json(report)) if as_json else render_verify(report, topic))
    if not report.clean:
        raise typer.Exit(ExitCode.FAILED)
