"""``outbox consume``: run a deduplicating consumer class as a daemon.

The options override the class's attributes; ``ConsumerConfig`` checks them (naming the
option), so they carry no ranges of their own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from outbox.cli.app import app, command
from outbox.cli.daemon import serve_health, stop_on_signals
from outbox.cli.options import (
    Bootstrap,
    Db,
    LogFormat,
    LogFormatName,
    LogLevel,
    LogLevelName,
    MetricsHost,
    MetricsPort,
    client_config_option,
    client_settings,
    client_settings_option,
    start_logging,
)
from outbox.errors import ConfigError


@command(app, short_help="Run a deduplicating consumer class.")
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
            help="Records per database transaction (default: the class's, 100).",
        ),
    ] = None,
    consumer_setting: Annotated[
        list[str] | None,
        client_settings_option(
            "Any librdkafka consumer setting (repeatable), e.g. -X session.timeout.ms=10000."
        ),
    ] = None,
    consumer_config: Annotated[
        Path | None,
        client_config_option(
            "OUTBOX_CONSUMER_CONFIG",
            "File of key=value consumer settings (e.g. SASL/TLS); -X wins over it.",
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
    start_logging(log_level, log_format)
    try:
        from consumer import load_consumer_class, runner_of
        from consumer.config import dedup_window_of_hours
    except ImportError as exc:  # a module of the user's named consumer.py imported instead
        raise ConfigError(_shadowed("consumer", exc)) from None
    cls = load_consumer_class(consumer_class)
    options: dict[str, Any] = {"settings": client_settings(consumer_config, consumer_setting)}
    if topic:
        options["topics"] = topic
    if group_id is not None:
        options["group_id"] = group_id
    if batch_size is not None:
        options["batch_size"] = batch_size
    if dedup_window_hours is not None:
        options["dedup_window"] = dedup_window_of_hours(dedup_window_hours)
    runner = runner_of(cls(db, bootstrap_servers, **options))  # the user's names are theirs
    stop_on_signals(runner.stop)
    from consumer.metrics import ConsumerMetrics

    server = serve_health(metrics_host, metrics_port, runner, ConsumerMetrics(runner).registry)
    try:
        runner.run()
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
