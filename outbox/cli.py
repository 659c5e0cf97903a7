"""The ``outbox`` command. The only module that reads environment variables (shown in --help)."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from outbox.config import Guarantee, Profile, RelayConfig, parse_overrides
from outbox.db import redact
from outbox.errors import ConfigError, OutboxError, TransientError
from outbox.logs import setup_logging

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from outbox.health import HealthServer

app = typer.Typer(
    help="Transactional outbox for PostgreSQL + Kafka: migrate, relay, inspect, demo.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
dead_app = typer.Typer(help="Poison rows that Kafka refused for good (I6).", no_args_is_help=True)
app.add_typer(dead_app, name="dead")

Db = Annotated[
    str,
    typer.Option(
        "--db",
        envvar="OUTBOX_DB",
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
        help="Kafka bootstrap servers, host:port[,host:port...].",
        show_default=False,
    ),
]
LogLevel = Annotated[
    str, typer.Option("--log-level", envvar="OUTBOX_LOG_LEVEL", help="DEBUG, INFO, WARNING...")
]


LogFormat = Annotated[
    str,
    typer.Option(
        "--log-format", envvar="OUTBOX_LOG_FORMAT", help="text, or json (one object per line)."
    ),
]
MetricsPort = Annotated[
    int | None,
    typer.Option(
        envvar="OUTBOX_METRICS_PORT",
        help="Serve /metrics, /healthz and /readyz on this port (off when unset).",
    ),
]
MetricsHost = Annotated[
    str, typer.Option(envvar="OUTBOX_METRICS_HOST", help="Address for the metrics endpoint.")
]


def _setup_logging(level: str, log_format: str = "text") -> None:
    if log_format not in {"text", "json"}:
        raise _fail(ConfigError(f"--log-format={log_format!r}: use text or json"))
    setup_logging(level, json_lines=log_format == "json")


def _serve_health(
    host: str, port: int | None, runner: Any, registry: CollectorRegistry
) -> HealthServer | None:
    """The per-process HTTP endpoint, when a port is configured."""
    if port is None:
        return None
    from outbox.health import HealthServer

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


def _fail(exc: BaseException) -> typer.Exit:
    typer.echo(f"error: {redact(str(exc))}", err=True)
    return typer.Exit(2)


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: Any) -> None:
        logging.getLogger("outbox").info(
            "%s: finishing the current batch, then stopping", signal.Signals(signum).name
        )
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _client_settings(path: Path | None, pairs: list[str] | None) -> dict[str, str]:
    """A settings file (``key=value`` lines, # comments) overridden by ``-X key=value`` pairs."""
    lines = path.read_text().splitlines() if path is not None else []
    from_file = [
        line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")
    ]
    return parse_overrides(from_file) | parse_overrides(pairs or [])


@app.command()
def migrate(db: Db, log_level: LogLevel = "WARNING") -> None:
    """Create or upgrade the outbox tables (Alembic, own version table)."""
    from outbox.migrate import upgrade

    _setup_logging(log_level)
    try:
        upgrade(db)
    except (OutboxError, ConnectionError) as exc:
        raise _fail(exc) from None
    except Exception as exc:
        raise _fail(exc) from None
    typer.echo("outbox tables are up to date")


@app.command("sql")
def print_sql() -> None:
    """Print the DDL of every migration, for applying by hand."""
    from outbox.migrate import print_sql as render

    typer.echo(render())


@app.command()
def relay(
    db: Db,
    bootstrap_servers: Bootstrap,
    guarantee: Annotated[
        Guarantee,
        typer.Option(envvar="OUTBOX_GUARANTEE", help="exactly-once needs broker transactions."),
    ] = Guarantee.EXACTLY_ONCE,
    profile: Annotated[
        Profile, typer.Option(envvar="OUTBOX_PROFILE", help="Producer preset.")
    ] = Profile.BALANCED,
    producer_setting: Annotated[
        list[str] | None,
        typer.Option(
            "-X",
            help="Any librdkafka producer setting, key=value (repeatable); wins over the profile.",
        ),
    ] = None,
    producer_config: Annotated[
        Path | None,
        typer.Option(
            envvar="OUTBOX_PRODUCER_CONFIG",
            help="File of key=value producer settings (e.g. SASL/TLS); -X wins over it.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    slots: Annotated[
        int,
        typer.Option(envvar="OUTBOX_SLOTS", help="Slot count; the same on every relay of a DB."),
    ] = 4,
    max_slots: Annotated[
        int | None,
        typer.Option(envvar="OUTBOX_MAX_SLOTS", help="At most this many slots in this process."),
    ] = None,
    batch_size: Annotated[int, typer.Option(envvar="OUTBOX_BATCH_SIZE")] = 1000,
    poll_interval: Annotated[
        float,
        typer.Option(
            envvar="OUTBOX_POLL_INTERVAL",
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
        str, typer.Option(envvar="OUTBOX_TRANSACTIONAL_ID_PREFIX")
    ] = "outbox-relay",
    state_topic: Annotated[
        str,
        typer.Option(envvar="OUTBOX_STATE_TOPIC", help="Compacted topic of recovery markers."),
    ] = "outbox.relay-state",
    once: Annotated[bool, typer.Option("--once", help="Drain what is pending, then exit.")] = False,
    missing_topic_timeout: Annotated[
        float,
        typer.Option(
            envvar="OUTBOX_MISSING_TOPIC_TIMEOUT",
            help="Seconds a missing or unwritable topic is retried (its rows held back, the "
            "other topics flowing) before its rows become dead rows.",
        ),
    ] = 300.0,
    batch_bytes: Annotated[
        int,
        typer.Option(
            envvar="OUTBOX_BATCH_BYTES",
            help="A claim stops adding rows past this many key+value bytes (bounds memory).",
        ),
    ] = 16 * 1024 * 1024,
    processes: Annotated[
        int,
        typer.Option(
            envvar="OUTBOX_PROCESSES",
            help="Relay processes to run; they split the slots (one process is GIL-bound). "
            "With --metrics-port P, process i serves on P+i.",
        ),
    ] = 1,
    log_level: LogLevel = "INFO",
    log_format: LogFormat = "text",
    metrics_port: MetricsPort = None,
    metrics_host: MetricsHost = "0.0.0.0",  # noqa: S104 - a container's probe port
) -> None:
    """Publish committed outbox rows to Kafka, one transaction per batch, then delete them."""
    from outbox.relay import Relay

    _setup_logging(log_level, log_format)
    if processes < 1 or processes > slots:
        raise _fail(ConfigError(f"--processes={processes} must be between 1 and --slots={slots}"))
    if processes > 1 and once:
        raise _fail(
            ConfigError(
                "--once drains in one process (the first would take every slot before the "
                "others start): drop --processes, or run the daemon without --once"
            )
        )
    if processes > 1:
        from outbox.supervise import supervise

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
        )
        runner = Relay(config)
    except (ConfigError, ConnectionError) as exc:
        raise _fail(exc) from None
    _stop_on_signals(runner.stop)
    server = _serve_health(metrics_host, metrics_port, runner, runner.metrics.registry)
    try:
        stats = runner.run()
    except (ConfigError, ConnectionError) as exc:  # exit 2: fix a setting, the schema, the DSN
        raise _fail(exc) from None
    except TransientError as exc:  # exit 3 (--once): Kafka unreachable; retrying may work
        typer.echo(f"error: {redact(str(exc))}", err=True)
        raise typer.Exit(3) from None
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


@app.command()
def status(db: Db) -> None:
    """Pending rows per topic, oldest pending age, slot owners, dead rows."""
    from outbox.ops import render_status

    try:
        typer.echo(render_status(db))
    except (OutboxError, ConnectionError) as exc:
        raise _fail(exc) from None


@dead_app.command("list")
def dead_list(db: Db, limit: int = 50) -> None:
    """Show poison rows with their error."""
    from outbox.ops import render_dead

    try:
        typer.echo(render_dead(db, limit))
    except (OutboxError, ConnectionError) as exc:
        raise _fail(exc) from None


@dead_app.command("requeue")
def dead_requeue(
    db: Db,
    ids: Annotated[list[int] | None, typer.Argument(help="Outbox ids to re-queue.")] = None,
    all_rows: Annotated[bool, typer.Option("--all", help="Re-queue every dead row.")] = False,
) -> None:
    """Put poison rows back in the outbox after fixing the cause (they keep their order)."""
    from outbox.ops import requeue

    if not ids and not all_rows:
        raise _fail(ConfigError("name the outbox ids to re-queue, or pass --all"))
    try:
        n = requeue(db, ids or [], all_rows=all_rows)
    except (OutboxError, ConnectionError) as exc:
        raise _fail(exc) from None
    typer.echo(f"re-queued {n} rows")


@app.command()
def demo(
    db: Annotated[
        str | None,
        typer.Option(
            "--db", envvar="OUTBOX_DEMO_DB", help="Use this PostgreSQL (default: embedded)."
        ),
    ] = None,
    bootstrap_servers: Annotated[
        str | None,
        typer.Option(
            "--bootstrap-servers",
            envvar="OUTBOX_DEMO_BOOTSTRAP_SERVERS",
            help="Use this Kafka (default: embedded Tansu broker).",
        ),
    ] = None,
    events: Annotated[int, typer.Option(help="Events to attempt (some get rolled back).")] = 3000,
    writers: Annotated[int, typer.Option(help="Concurrent application transactions.")] = 8,
    rollback_ratio: Annotated[float, typer.Option(help="Share of transactions rolled back.")] = 0.1,
    crash_relay: Annotated[
        bool, typer.Option(help="SIGKILL the relay half way; a new one takes over.")
    ] = True,
    log_level: LogLevel = "WARNING",
) -> None:
    """Run the whole pipeline on embedded PostgreSQL + Kafka-API broker and check the result."""
    from outbox.demo import run_demo

    _setup_logging(log_level)
    try:
        ok = run_demo(
            db=db,
            bootstrap_servers=bootstrap_servers,
            events=events,
            writers=writers,
            rollback_ratio=rollback_ratio,
            crash_relay=crash_relay,
        )
    except (OutboxError, ConnectionError) as exc:
        raise _fail(exc) from None
    raise typer.Exit(0 if ok else 1)


def _dedup_window(hours: float) -> timedelta:
    if hours <= 0:
        raise ConfigError(f"--dedup-window-hours={hours} must be > 0 (e.g. 168 for a week)")
    return timedelta(hours=hours)


@app.command()
def consume(
    consumer_class: Annotated[
        str,
        typer.Argument(
            help="Your IdempotentConsumer subclass, module:Class (e.g. mypkg.projector:Projector).",
            show_default=False,
        ),
    ],
    db: Db,
    bootstrap_servers: Bootstrap,
    topic: Annotated[
        list[str] | None,
        typer.Option("--topic", "-t", help="Consume these instead of the class's (repeatable)."),
    ] = None,
    group_id: Annotated[
        str | None,
        typer.Option(envvar="OUTBOX_CONSUMER_GROUP_ID", help="Instead of the class's group_id."),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            envvar="OUTBOX_CONSUMER_BATCH_SIZE",
            help="Records per database transaction (default: the class's, 100).",
        ),
    ] = None,
    consumer_setting: Annotated[
        list[str] | None,
        typer.Option(
            "-X",
            help="Any librdkafka consumer setting, key=value (repeatable), e.g. "
            "-X session.timeout.ms=10000.",
        ),
    ] = None,
    consumer_config: Annotated[
        Path | None,
        typer.Option(
            envvar="OUTBOX_CONSUMER_CONFIG",
            help="File of key=value consumer settings (e.g. SASL/TLS); -X wins over it.",
            exists=True,
            dir_okay=False,
        ),
    ] = None,
    dedup_window_hours: Annotated[
        float | None,
        typer.Option(
            envvar="OUTBOX_DEDUP_WINDOW_HOURS",
            help="Keep dedup records this long (default: the class's, 168); must exceed the "
            "longest time after which an event can be delivered again.",
        ),
    ] = None,
    log_level: LogLevel = "INFO",
    log_format: LogFormat = "text",
    metrics_port: MetricsPort = None,
    metrics_host: MetricsHost = "0.0.0.0",  # noqa: S104 - a container's probe port
) -> None:
    """Run a deduplicating consumer: each event's effects and its dedup record in one DB
    transaction, the Kafka offset committed after it; failures dead-lettered to <topic>.DLT."""
    from consumer import DeadLetterError, load_consumer_class

    _setup_logging(log_level, log_format)
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
        runner = cls(db, bootstrap_servers, **options)
    except (ConfigError, ConnectionError) as exc:
        raise _fail(exc) from None
    _stop_on_signals(runner.stop)
    from outbox.metrics import ConsumerMetrics

    server = _serve_health(metrics_host, metrics_port, runner, ConsumerMetrics(runner).registry)
    try:
        runner.run()
    except (ConfigError, ConnectionError, DeadLetterError) as exc:
        raise _fail(exc) from None
    finally:
        if server is not None:
            server.stop()


def main() -> None:
    app(prog_name="outbox")


if __name__ == "__main__":
    main()
