"""The ``outbox`` command. The only module that reads environment variables (shown in --help).

Every failure ends in one line on stderr, ``error: <what is wrong>: <the fix>``,
and one of the exit codes of ``ExitCode`` (listed in docs/reference/cli.md).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
import uuid
from collections.abc import Mapping
from datetime import timedelta
from enum import IntEnum, StrEnum
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Protocol, runtime_checkable

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
from outbox.logs import setup_logging
from outbox.partitioner import SHARD_COUNT
from outbox.relay.config import Guarantee, Profile, RelayConfig, parse_overrides

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from outbox.cli.health import HealthServer


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


class LogLevelName(StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


class DemoBroker(StrEnum):
    TANSU = "tansu"
    KAFKA = "kafka"


class LogFormatName(StrEnum):
    TEXT = "text"
    JSON = "json"


Db = Annotated[
    str,
    typer.Option(
        "--db",
        envvar="OUTBOX_DB",
        metavar="URL",
        help="PostgreSQL URL, e.g. postgresql+psycopg://app@localhost/app (or a libpq DSN).",
        show_default=False,
    ),
]
Bootstrap = Annotated[
    str,
    typer.Option(
        "--bootstrap-servers",
        "-b",
        envvar="OUTBOX_BOOTSTRAP_SERVERS",
        metavar="HOST:PORT[,...]",
        help="Kafka bootstrap servers.",
        show_default=False,
    ),
]
LogLevel = Annotated[
    LogLevelName,
    typer.Option(
        "--log-level",
        envvar="OUTBOX_LOG_LEVEL",
        case_sensitive=False,
        help="Least severe log level shown.",
    ),
]
LogFormat = Annotated[
    LogFormatName,
    typer.Option(
        "--log-format",
        envvar="OUTBOX_LOG_FORMAT",
        case_sensitive=False,
        help="text, or json (one object per line).",
    ),
]
MetricsPort = Annotated[
    int | None,
    typer.Option(
        envvar="OUTBOX_METRICS_PORT",
        metavar="PORT",
        min=1,
        max=65535,
        help="Serve /metrics, /healthz and /readyz on this port (off when unset).",
    ),
]
MetricsHost = Annotated[
    str,
    typer.Option(
        envvar="OUTBOX_METRICS_HOST", metavar="ADDRESS", help="Address for the metrics endpoint."
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print JSON for scripts instead of tables.")]


def _setup_logging(level: LogLevelName, log_format: LogFormatName = LogFormatName.TEXT) -> None:
    setup_logging(level.value, json_lines=log_format is LogFormatName.JSON)


def _serve_health(
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
        raise _fail(ConfigError(msg)) from None


def _outbox_id(value: str | None) -> uuid.UUID | None:
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ConfigError(
            f"--replaces-outbox={value!r} is not an outbox id (a uuid, as `outbox status` shows it)"
        ) from None


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


_ENV_SOURCED: dict[str, str] = {}
"""``env_sourced_flags`` of this process's command line, set by ``main()``."""


def name_sources(message: str, env_sources: dict[str, str]) -> str:
    """Name the environment variable instead of the flag for a value that came from the env."""
    for flag, envvar in env_sources.items():
        message = re.sub(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", envvar, message)
    return message


def _fail(exc: BaseException, code: ExitCode | None = None) -> typer.Exit:
    """Print ``error: ...`` in one line (no password, the right option name); the Exit to raise."""
    message = name_sources(redact(str(exc)), _ENV_SOURCED)
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    return typer.Exit(int(code if code is not None else exit_code_for(exc)))


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: Any) -> None:
        logging.getLogger("outbox").info(
            "%s: finishing the current batch, then stopping", signal.Signals(signum).name
        )
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _check_schema(db: str) -> None:
    """Fail with "run outbox migrate" before a daemon starts on an unmigrated database."""
    from outbox.cli.views import check_schema

    try:
        check_schema(db)
    except ConnectionError:
        return  # an unreachable server is the daemon's own start-up to handle
    except OutboxError as exc:
        raise _fail(exc) from None


def _client_settings(path: Path | None, pairs: list[str] | None) -> dict[str, str]:
    """A settings file (``key=value`` lines, # comments) overridden by ``-X key=value`` pairs."""
    lines = path.read_text().splitlines() if path is not None else []
    from_file = [
        line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")
    ]
    return parse_overrides(from_file) | parse_overrides(pairs or [])


@app.command(short_help="Create or upgrade the outbox tables.")
def migrate(db: Db, log_level: LogLevel = LogLevelName.WARNING) -> None:
    """Create or upgrade the outbox tables (Alembic, own version table), and say what it did."""
    from outbox.migrate import head, upgrade

    _setup_logging(log_level)
    try:
        applied = upgrade(db)
    except Exception as exc:  # one line whatever went wrong, never a traceback
        raise _fail(exc) from None
    for rev in applied:
        typer.echo(f"applied {rev.id}: {rev.title}")
    typer.echo(
        f"outbox tables are at revision {head()} (head)"
        + ("" if applied else ": already up to date, nothing applied")
    )


@app.command("sql", short_help="Print the DDL, to apply by hand.")
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

    try:
        typer.echo(render(to_rev, since=from_rev))
    except OutboxError as exc:
        raise _fail(exc) from None


@app.command(short_help="Publish committed outbox rows to Kafka.")
def relay(
    db: Db,
    bootstrap_servers: Bootstrap,
    guarantee: Annotated[
        Guarantee,
        typer.Option(
            envvar="OUTBOX_GUARANTEE",
            help="Delivery guarantee; exactly-once needs broker transactions.",
        ),
    ] = Guarantee.EXACTLY_ONCE,
    profile: Annotated[
        Profile,
        typer.Option(envvar="OUTBOX_PROFILE", help="Producer preset (linger, batch, compression)."),
    ] = Profile.BALANCED,
    producer_setting: Annotated[
        list[str] | None,
        typer.Option(
            "-X",
            metavar="KEY=VALUE",
            help="Any librdkafka producer setting (repeatable); wins over the profile.",
        ),
    ] = None,
    producer_config: Annotated[
        Path | None,
        typer.Option(
            envvar="OUTBOX_PRODUCER_CONFIG",
            metavar="FILE",
            help="File of key=value producer settings (e.g. SASL/TLS); -X wins over it.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    slots: Annotated[
        int,
        typer.Option(
            envvar="OUTBOX_SLOTS",
            metavar="N",
            min=1,
            max=SHARD_COUNT,
            help=f"Slot count, 1-{SHARD_COUNT}; the same on every relay of a database.",
        ),
    ] = 4,
    max_slots: Annotated[
        int | None,
        typer.Option(
            envvar="OUTBOX_MAX_SLOTS",
            metavar="N",
            min=1,
            help="At most this many slots in this process (default: all it can take).",
        ),
    ] = None,
    batch_size: Annotated[
        int,
        typer.Option(
            envvar="OUTBOX_BATCH_SIZE",
            metavar="N",
            min=1,
            max=100_000,
            help="Most events per Kafka transaction.",
        ),
    ] = 1000,
    poll_interval: Annotated[
        float,
        typer.Option(
            envvar="OUTBOX_POLL_INTERVAL",
            metavar="SECONDS",
            help="Seconds between polls when idle; without LISTEN, 10 ms after rows were "
            "found, growing x1.5 per empty poll up to this.",
        ),
    ] = 1.0,
    listen: Annotated[
        bool,
        typer.Option(
            envvar="OUTBOX_LISTEN",
            help="Wake on NOTIFY (needs a direct session); --no-listen for writers that "
            "publish with notify=False.",
        ),
    ] = True,
    transactional_id_prefix: Annotated[
        str | None,
        typer.Option(
            envvar="OUTBOX_TRANSACTIONAL_ID_PREFIX",
            metavar="PREFIX",
            help="Kafka transactional.id of slot N is PREFIX-N; default "
            "outbox-<12 hex digits of the outbox id> (see `outbox status`). Unique per outbox.",
            show_default=False,
        ),
    ] = None,
    replaces_outbox: Annotated[
        str | None,
        typer.Option(
            envvar="OUTBOX_REPLACES_OUTBOX",
            metavar="OUTBOX_ID",
            help="With an explicit --transactional-id-prefix once used by another outbox "
            "identity (this outbox was re-created): ignore that identity's markers.",
            show_default=False,
        ),
    ] = None,
    state_topic: Annotated[
        str,
        typer.Option(
            envvar="OUTBOX_STATE_TOPIC",
            metavar="TOPIC",
            help="Compacted topic of recovery markers.",
        ),
    ] = "outbox.relay-state",
    once: Annotated[bool, typer.Option("--once", help="Drain what is pending, then exit.")] = False,
    missing_topic_timeout: Annotated[
        float,
        typer.Option(
            envvar="OUTBOX_MISSING_TOPIC_TIMEOUT",
            metavar="SECONDS",
            help="How long a missing or unwritable topic is retried (its rows held back, the "
            "other topics flowing) before its rows become dead rows.",
        ),
    ] = 300.0,
    batch_bytes: Annotated[
        int,
        typer.Option(
            envvar="OUTBOX_BATCH_BYTES",
            metavar="BYTES",
            help="A claim stops adding rows past this many key+value bytes (bounds memory).",
        ),
    ] = 16 * 1024 * 1024,
    takeover_timeout: Annotated[
        float,
        typer.Option(
            envvar="OUTBOX_TAKEOVER_TIMEOUT",
            metavar="SECONDS",
            help="A relay that has not answered its database for this long (frozen, cut off) "
            "loses its slots to another relay: the server ends its sessions.",
        ),
    ] = 30.0,
    delivery_retention: Annotated[
        int,
        typer.Option(
            envvar="OUTBOX_DELIVERY_RETENTION",
            metavar="DAYS",
            help="Days the delivery record (where each event went: `outbox trace`, `outbox "
            "verify`) is kept; 0 records nothing.",
        ),
    ] = 7,
    processes: Annotated[
        int,
        typer.Option(
            envvar="OUTBOX_PROCESSES",
            metavar="N",
            min=1,
            help="Relay processes to run; they split the slots (one process is GIL-bound). "
            "With a metrics port P, process i serves on P+i.",
        ),
    ] = 1,
    log_level: LogLevel = LogLevelName.INFO,
    log_format: LogFormat = LogFormatName.TEXT,
    metrics_port: MetricsPort = None,
    metrics_host: MetricsHost = "0.0.0.0",  # noqa: S104 - a container's probe port
) -> None:
    """Publish committed outbox rows to Kafka, one transaction per batch, then delete them."""
    from outbox.relay.coordinator import Relay

    _setup_logging(log_level, log_format)
    if processes > slots:
        raise _fail(ConfigError(f"--processes={processes} must be at most --slots={slots}"))
    if processes > 1 and once:
        raise _fail(
            ConfigError(
                "--once drains in one process (the first would take every slot before the "
                "others start): drop --processes, or run the daemon without --once"
            )
        )
    _check_schema(db)
    if processes > 1:
        from outbox.relay.supervise import supervise

        raise typer.Exit(supervise(sys.argv[1:], processes, metrics_port, once))
    try:
        overrides = _client_settings(producer_config, producer_setting)
        config = RelayConfig(
            dsn=db,
            bootstrap_servers=bootstrap_servers,
            guarantee=guarantee,
            profile=profile,
            producer_overrides=overrides,
            slots=slots,
            max_slots=max_slots,
            batch_size=batch_size,
            poll_interval=poll_interval,
            listen=listen,
            transactional_id_prefix=transactional_id_prefix,
            state_topic=state_topic,
            once=once,
            missing_topic_timeout=missing_topic_timeout,
            batch_bytes=batch_bytes,
            replaces_outbox=_outbox_id(replaces_outbox),
            takeover_timeout=takeover_timeout,
            delivery_retention=delivery_retention,
        )
        runner = Relay(config)
    except (ConfigError, ConnectionError) as exc:
        raise _fail(exc) from None
    _stop_on_signals(runner.stop)
    server = _serve_health(metrics_host, metrics_port, runner, runner.metrics.registry)
    try:
        stats = runner.run()
    except (OutboxError, ConnectionError) as exc:  # one line; exit code: exit_code_for
        raise _fail(exc) from None
    finally:
        if server is not None:
            server.stop()
    logging.getLogger("outbox.relay").info(
        "stopped: %d events published in %d batches, %d dead, %d recovered",
        stats.published,
        stats.batches,
        stats.dead,
        stats.recovered,
    )


@app.command(short_help="Pending rows, lag, slot owners, dead rows.")
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
            help="With --check: also fail when the oldest pending event is older than this.",
        ),
    ] = None,
) -> None:
    """Pending rows per topic, oldest pending age, slot owners, dead rows. With --check: one
    line, `ok: ...` on stdout, or the problems on stderr with exit 1."""
    from outbox.cli.views import read_status, render_status, status_line, status_problems, to_json

    try:
        report = read_status(db)
    except (OutboxError, ConnectionError) as exc:
        raise _fail(exc) from None
    problems = status_problems(report, max_lag=max_lag) if check or max_lag is not None else []
    if as_json:
        typer.echo(to_json({**report, "problems": problems}))
    elif check:
        if not problems:
            typer.echo(status_line(report))
    else:
        typer.echo(render_status(report))
    if problems:
        raise _fail(OutboxError("; ".join(problems)), ExitCode.FAILED)


IdArgument = Annotated[
    list[int],
    typer.Argument(metavar="ID", help="Ids from `outbox dead list`.", show_default=False),
]


@app.command(short_help="Where one event went: pending, published (where), dead; who applied it.")
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

    try:
        found = read_trace(db, parse_event_id(event_id))
    except (OutboxError, ConnectionError) as exc:
        raise _fail(exc) from None
    typer.echo(to_json(found) if as_json else render_trace(found).rstrip("\n"))


@app.command(
    short_help="Check a topic against the delivery record and the consumer groups (read-only)."
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
        typer.Option(
            "-X",
            metavar="KEY=VALUE",
            help="librdkafka settings as given to the relay (repeatable); the connection and "
            "security ones (SASL/TLS) are used.",
        ),
    ] = None,
    producer_config: Annotated[
        Path | None,
        typer.Option(
            envvar="OUTBOX_PRODUCER_CONFIG",
            metavar="FILE",
            help="The relay's file of key=value settings; -X wins over it.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    as_json: Json = False,
) -> None:
    """Read the topic to its end (read_committed) and the delivery record, and report events
    lost from their offset, duplicated, or out of key order, records not this outbox's, and per
    group the lag and the events it can no longer read. Exits 0 when clean, 1 with findings."""
    from outbox.cli.delivery import parse_duration, read_verify, render_verify, to_json, verify_json
    from outbox.relay.config import connection_settings

    def progress(read: int, total: int) -> None:
        typer.echo(f"read {read} of about {total} records", err=True)

    try:
        window = parse_duration(since) if since is not None else None
        settings = connection_settings(_client_settings(producer_config, client_setting))
        report = read_verify(
            db,
            bootstrap_servers,
            settings,
            topic,
            group or [],
            window,
            None if as_json else progress,
        )
    except (OutboxError, ConnectionError) as exc:
        raise _fail(exc) from None
    typer.echo(to_json(verify_json(report)) if as_json else render_verify(report, topic))
    if not report.clean:
        raise typer.Exit(ExitCode.FAILED)


@dead_app.command("list")
def dead_list(
    db: Db,
    limit: Annotated[
        int, typer.Option(metavar="N", min=1, help="Show at most this many, newest first.")
    ] = 50,
    as_json: Json = False,
) -> None:
    """Show poison rows with their error, newest first."""
    from outbox.cli.views import read_dead, render_dead, to_json

    try:
        rows = read_dead(db, limit)
    except (OutboxError, ConnectionError) as exc:
        raise _fail(exc) from None
    typer.echo(to_json(rows) if as_json else render_dead(rows))


@dead_app.command("show", short_help="Show one poison row: key, headers, value, error.")
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

    try:
        row = read_dead_row(db, row_id, full=full)
    except (OutboxError, ConnectionError) as exc:
        raise _fail(exc) from None
    typer.echo(to_json(row) if as_json else render_dead_row(row))


@dead_app.command("requeue", short_help="Put poison rows back in the outbox.")
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
        raise _fail(ConfigError("name the ids to re-queue (see `outbox dead list`), or pass --all"))
    try:
        n = requeue(db, ids or [], all_rows=all_rows)
    except (OutboxError, ConnectionError) as exc:
        raise _fail(exc) from None
    typer.echo(f"re-queued {n} rows")


@dead_app.command("discard")
def dead_discard(ids: IdArgument, db: Db) -> None:
    """Delete poison rows for good: their events are never published.

    All the named rows are discarded, or none when one of them does not exist.
    """
    from outbox.cli.views import discard

    try:
        n = discard(db, ids)
    except (OutboxError, ConnectionError) as exc:
        raise _fail(exc) from None
    typer.echo(f"discarded {n} rows")


@identity_app.command("renew", short_help="Give a copied database its own identity.")
def identity_renew(db: Db) -> None:
    """Give this database a new outbox identity: the fix for a COPY of another outbox's database
    (CREATE DATABASE ... TEMPLATE, a dump restored as a second service), whose relays would
    otherwise fence the original's on every slot. Run it on the copy, with its relays stopped
    by SIGTERM; they use transactional ids of their own from their next start. Nothing
    pending is lost.
    """
    from outbox.cli.views import renew_identity

    try:
        old, new = renew_identity(db)
    except (OutboxError, ConnectionError) as exc:
        raise _fail(exc) from None
    typer.echo(f"outbox identity renewed: {old} -> {new}")


@app.command(short_help="The whole pipeline on embedded services, checked.")
def demo(
    db: Annotated[
        str | None,
        typer.Option(
            "--db",
            envvar="OUTBOX_DEMO_DB",
            metavar="URL",
            help="Use this PostgreSQL (default: embedded).",
        ),
    ] = None,
    bootstrap_servers: Annotated[
        str | None,
        typer.Option(
            "--bootstrap-servers",
            envvar="OUTBOX_DEMO_BOOTSTRAP_SERVERS",
            metavar="HOST:PORT[,...]",
            help="Use this Kafka (default: start the broker --broker names).",
        ),
    ] = None,
    broker: Annotated[
        DemoBroker,
        typer.Option(
            "--broker",
            envvar="OUTBOX_DEMO_BROKER",
            case_sensitive=False,
            help="Broker to start: tansu (zero setup) or kafka (a 3-node Apache Kafka "
            "KRaft cluster; needs java, and mvn for the first fetch of its jars). With "
            "--bootstrap-servers, kafka says they are an Apache Kafka: then the topic must "
            "hold no duplicate.",
        ),
    ] = DemoBroker.TANSU,
    events: Annotated[
        int,
        typer.Option(metavar="N", min=1, help="Events of the burst (some get rolled back)."),
    ] = 3000,
    writers: Annotated[
        int, typer.Option(metavar="N", min=1, help="Concurrent application transactions.")
    ] = 8,
    rollback_ratio: Annotated[
        float,
        typer.Option(metavar="RATIO", min=0, max=1, help="Share of transactions rolled back."),
    ] = 0.1,
    crash_relay: Annotated[
        bool, typer.Option(help="SIGKILL the relay half way; a new one takes over.")
    ] = True,
    steady_rate: Annotated[
        float,
        typer.Option(
            metavar="EVENTS/S",
            min=0,
            help="After the burst: publish at this steady rate to measure latency (0: skip).",
        ),
    ] = 50.0,
    steady_seconds: Annotated[
        float,
        typer.Option(metavar="SECONDS", min=0, help="How long the steady phase lasts."),
    ] = 4.0,
    log_level: LogLevel = LogLevelName.WARNING,
) -> None:
    """Run the whole pipeline on embedded PostgreSQL + Kafka-API broker and check the result."""
    from outbox.embedded import EmbeddedServiceError
    from outbox.embedded.demo import run_demo

    _setup_logging(log_level)
    try:
        ok = run_demo(
            db=db,
            bootstrap_servers=bootstrap_servers,
            events=events,
            writers=writers,
            rollback_ratio=rollback_ratio,
            crash_relay=crash_relay,
            steady_rate=steady_rate,
            steady_seconds=steady_seconds,
            broker=broker.value,
        )
    except (OutboxError, ConnectionError, EmbeddedServiceError) as exc:  # no java, no mvn
        raise _fail(exc) from None
    raise typer.Exit(ExitCode.OK if ok else ExitCode.FAILED)


@app.command(short_help="Local PostgreSQL and broker for development, until Ctrl-C.")
def dev(
    env_file: Annotated[
        Path | None,
        typer.Option(
            metavar="FILE",
            help="Also write the export lines to this file (`. FILE` in another shell).",
            dir_okay=False,
        ),
    ] = None,
    db_port: Annotated[
        int | None,
        typer.Option(metavar="PORT", min=1, max=65535, help="PostgreSQL port (default: free)."),
    ] = None,
    broker_port: Annotated[
        int | None,
        typer.Option(metavar="PORT", min=1, max=65535, help="Broker port (default: free)."),
    ] = None,
    log_level: LogLevel = LogLevelName.WARNING,
) -> None:
    """Start a throwaway PostgreSQL (outbox tables migrated) and Tansu broker, print where they
    are as shell assignments (OUTBOX_DB, OUTBOX_BOOTSTRAP_SERVERS, and OUTBOX_CONSUMER_CONFIG,
    which makes `outbox consume` join in seconds), and keep them until SIGINT/SIGTERM. Data is
    deleted on exit. For development only."""
    from outbox.embedded import EmbeddedServiceError
    from outbox.embedded.dev import dev_servers, port_in_use

    _setup_logging(log_level)
    for option, port in (("--db-port", db_port), ("--broker-port", broker_port)):
        if port is not None and port_in_use(port):
            raise _fail(
                ConfigError(
                    f"{option} {port}: 127.0.0.1:{port} is in use by another process: pick "
                    f"another port, or leave {option} out for a free one"
                )
            )
    stop = threading.Event()
    _stop_on_signals(stop)
    try:
        with dev_servers(db_port=db_port, broker_port=broker_port) as servers:
            lines = servers.assignments()
            if env_file is not None:
                env_file.write_text("\n".join(lines) + "\n")
            for line in lines:
                typer.echo(line)
            sys.stdout.flush()
            typer.echo(
                "# outbox dev: PostgreSQL and Tansu are running; Ctrl-C (or SIGTERM) stops them. "
                "In another shell: "
                + (f"`. {env_file}`" if env_file is not None else "run the export lines above")
                + ", then e.g. `outbox relay` and `outbox consume mypkg.mod:MyConsumer`.",
                err=True,
            )
            stop.wait()
    except (OutboxError, ConnectionError, EmbeddedServiceError, OSError) as exc:
        raise _fail(exc) from None
    finally:
        if env_file is not None:
            env_file.unlink(missing_ok=True)
    typer.echo("# outbox dev: stopped, data deleted", err=True)


def _dedup_window(hours: float) -> timedelta:
    if hours <= 0:
        raise ConfigError(f"--dedup-window-hours={hours} must be > 0 (e.g. 168 for a week)")
    return timedelta(hours=hours)


@app.command(short_help="Run a deduplicating consumer class.")
def consume(
    consumer_class: Annotated[
        str,
        typer.Argument(
            metavar="MODULE:CLASS",
            help="Your IdempotentConsumer subclass (e.g. mypkg.projector:Projector).",
            show_default=False,
        ),
    ],
    db: Db,
    bootstrap_servers: Bootstrap,
    topic: Annotated[
        list[str] | None,
        typer.Option(
            "--topic",
            "-t",
            metavar="TOPIC",
            help="Consume these instead of the class's (repeatable).",
        ),
    ] = None,
    group_id: Annotated[
        str | None,
        typer.Option(
            envvar="OUTBOX_CONSUMER_GROUP_ID",
            metavar="GROUP",
            help="Kafka consumer group, instead of the class's group_id.",
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            envvar="OUTBOX_CONSUMER_BATCH_SIZE",
            metavar="N",
            min=1,
            help="Records per database transaction (default: the class's, 100).",
        ),
    ] = None,
    consumer_setting: Annotated[
        list[str] | None,
        typer.Option(
            "-X",
            metavar="KEY=VALUE",
            help="Any librdkafka consumer setting (repeatable), e.g. -X session.timeout.ms=10000.",
        ),
    ] = None,
    consumer_config: Annotated[
        Path | None,
        typer.Option(
            envvar="OUTBOX_CONSUMER_CONFIG",
            metavar="FILE",
            help="File of key=value consumer settings (e.g. SASL/TLS); -X wins over it.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    dedup_window_hours: Annotated[
        float | None,
        typer.Option(
            envvar="OUTBOX_DEDUP_WINDOW_HOURS",
            metavar="HOURS",
            help="Keep dedup records this long (default: the class's, 336); must exceed the "
            "longest time after which an event can be delivered again.",
        ),
    ] = None,
    log_level: LogLevel = LogLevelName.INFO,
    log_format: LogFormat = LogFormatName.TEXT,
    metrics_port: MetricsPort = None,
    metrics_host: MetricsHost = "0.0.0.0",  # noqa: S104 - a container's probe port
) -> None:
    """Run a deduplicating consumer: each event's effects and its dedup record in one DB
    transaction, the Kafka offset committed after it; failures dead-lettered to <topic>.DLT."""
    _setup_logging(log_level, log_format)
    try:
        from consumer import DeadLetterError, load_consumer_class, runner_of
    except ImportError as exc:  # a module of the user's named consumer.py imported instead
        raise _fail(ConfigError(_shadowed("consumer", exc))) from None
    try:
        cls = load_consumer_class(consumer_class)
        settings = _client_settings(consumer_config, consumer_setting)
        options: dict[str, Any] = {"settings": settings}
        if topic:
            options["topics"] = topic
        if group_id is not None:
            options["group_id"] = group_id
        if batch_size is not None:
            options["batch_size"] = batch_size
        if dedup_window_hours is not None:
            options["dedup_window"] = _dedup_window(dedup_window_hours)
        runner = runner_of(cls(db, bootstrap_servers, **options))  # the user's names are theirs
    except (ConfigError, ConnectionError) as exc:
        raise _fail(exc) from None
    _stop_on_signals(runner.stop)
    from consumer.metrics import ConsumerMetrics

    server = _serve_health(metrics_host, metrics_port, runner, ConsumerMetrics(runner).registry)
    try:
        runner.run()
    except (ConfigError, ConnectionError, DeadLetterError) as exc:
        raise _fail(exc) from None
    finally:
        if server is not None:
            server.stop()


def _shadowed(package: str, exc: ImportError) -> str:
    import importlib

    module = importlib.import_module(package)
    where = getattr(module, "__file__", None)
    return (
        f"cannot load kafka-outbox's {package!r} package ({exc}): {where} has its name and "
        f"hides it; rename that module (e.g. my_{package}.py)"
    )


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


def main(args: list[str] | None = None) -> None:
    """Run the command; usage errors in one line with exit code 2, never a traceback."""
    command = typer.main.get_command(app)
    argv = sys.argv[1:] if args is None else args
    _ENV_SOURCED.clear()
    _ENV_SOURCED.update(env_sourced_flags(command, argv, os.environ))
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
            typer.echo(f"error: {usage_message(exc)}", err=True)
        code = ExitCode.USAGE
    sys.exit(code if isinstance(code, int) else ExitCode.OK)


if __name__ == "__main__":
    main()
