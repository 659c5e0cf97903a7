"""``outbox relay``: the daemon that publishes committed outbox rows to Kafka.

Each option's default and range live in ``RelayConfig`` (the defaults are read from it, the
ranges checked by it), so an option is declared here once and validated there once.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Annotated, Any

import typer

from outbox.cli.app import app, command
from outbox.cli.daemon import check_schema, serve_health, stop_on_signals
from outbox.cli.options import (
    Bootstrap,
    Db,
    LogFormat,
    LogFormatName,
    LogLevel,
    LogLevelName,
    MetricsHost,
    MetricsPort,
    ProducerConfig,
    ProducerSettings,
    client_settings,
    start_logging,
)
from outbox.errors import ConfigError
from outbox.relay.config import RANGES, Guarantee, Profile, RelayConfig, replaced_outbox

DEFAULT: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(RelayConfig)}
"""RelayConfig's defaults, which the options show and use."""


def span(name: str) -> str:
    """RelayConfig's range of a setting, for its --help."""
    low, high, _ = RANGES[name]
    return f" Range: {low:g}-{high:g}." if high is not None else f" At least {low:g}."


def check_processes(processes: int, slots: int, once: bool) -> None:
    """``--processes`` split the slots between them, and ``--once`` drains in one process."""
    if processes < 1:
        raise ConfigError(f"--processes={processes} must be at least 1")
    if processes > slots:
        raise ConfigError(f"--processes={processes} must be at most --slots={slots}")
    if processes > 1 and once:
        raise ConfigError(
            "--once drains in one process (the first would take every slot before the "
            "others start): drop --processes, or run the daemon without --once"
        )


@command(app, short_help="Publish committed outbox rows to Kafka.")
def relay(
    db: Db,
    bootstrap_servers: Bootstrap,
    guarantee: Annotated[
        Guarantee,
        typer.Option(
            envvar="OUTBOX_GUARANTEE",
            help="Delivery guarantee; exactly-once needs broker transactions.",
        ),
    ] = DEFAULT["guarantee"],
    profile: Annotated[
        Profile,
        typer.Option(envvar="OUTBOX_PROFILE", help="Producer preset (linger, batch, compression)."),
    ] = DEFAULT["profile"],
    producer_setting: ProducerSettings = None,
    producer_config: ProducerConfig = None,
    slots: Annotated[
        int,
        typer.Option(
            envvar="OUTBOX_SLOTS",
            metavar="N",
            help="Slot count; the same on every relay of a database." + span("slots"),
        ),
    ] = DEFAULT["slots"],
    max_slots: Annotated[
        int | None,
        typer.Option(
            envvar="OUTBOX_MAX_SLOTS",
            metavar="N",
            help="At most this many slots in this process (default: all it can take).",
        ),
    ] = DEFAULT["max_slots"],
    batch_size: Annotated[
        int,
        typer.Option(
            envvar="OUTBOX_BATCH_SIZE",
            metavar="N",
            help="Most events per Kafka transaction." + span("batch_size"),
        ),
    ] = DEFAULT["batch_size"],
    poll_interval: Annotated[
        float,
        typer.Option(
            envvar="OUTBOX_POLL_INTERVAL",
            metavar="SECONDS",
            help="Seconds between polls when idle; without LISTEN, 10 ms after rows were "
            "found, growing x1.5 per empty poll up to this." + span("poll_interval"),
        ),
    ] = DEFAULT["poll_interval"],
    listen: Annotated[
        bool,
        typer.Option(
            envvar="OUTBOX_LISTEN",
            help="Wake on NOTIFY (needs a direct session); --no-listen for writers that "
            "publish with notify=False.",
        ),
    ] = DEFAULT["listen"],
    transactional_id_prefix: Annotated[
        str | None,
        typer.Option(
            envvar="OUTBOX_TRANSACTIONAL_ID_PREFIX",
            metavar="PREFIX",
            help="Kafka transactional.id of slot N is PREFIX-N; default "
            "outbox-<12 hex digits of the outbox id> (see `outbox status`). Unique per outbox.",
            show_default=False,
        ),
    ] = DEFAULT["transactional_id_prefix"],
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
    ] = DEFAULT["state_topic"],
    once: Annotated[bool, typer.Option("--once", help="Drain what is pending, then exit.")] = (
        DEFAULT["once"]
    ),
    missing_topic_timeout: Annotated[
        float,
        typer.Option(
            envvar="OUTBOX_MISSING_TOPIC_TIMEOUT",
            metavar="SECONDS",
            help="How long a missing or unwritable topic is retried (its rows held back, the "
            "other topics flowing) before its rows become dead rows."
            + span("missing_topic_timeout"),
        ),
    ] = DEFAULT["missing_topic_timeout"],
    batch_bytes: Annotated[
        int,
        typer.Option(
            envvar="OUTBOX_BATCH_BYTES",
            metavar="BYTES",
            help="A claim stops adding rows past this many key+value bytes (bounds memory)."
            + span("batch_bytes"),
        ),
    ] = DEFAULT["batch_bytes"],
    takeover_timeout: Annotated[
        float,
        typer.Option(
            envvar="OUTBOX_TAKEOVER_TIMEOUT",
            metavar="SECONDS",
            help="A relay that has not answered its database for this long (frozen, cut off) "
            "loses its slots to another relay: the server ends its sessions."
            + span("takeover_timeout"),
        ),
    ] = DEFAULT["takeover_timeout"],
    delivery_retention: Annotated[
        int,
        typer.Option(
            envvar="OUTBOX_DELIVERY_RETENTION",
            metavar="DAYS",
            help="Days the delivery record (where each event went: `outbox trace`, `outbox "
            "verify`) is kept; 0 records nothing." + span("delivery_retention"),
        ),
    ] = DEFAULT["delivery_retention"],
    processes: Annotated[
        int,
        typer.Option(
            envvar="OUTBOX_PROCESSES",
            metavar="N",
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
    start_logging(log_level, log_format)
    config = RelayConfig(  # every setting checked here, before any process or connection
        dsn=db,
        bootstrap_servers=bootstrap_servers,
        guarantee=guarantee,
        profile=profile,
        producer_overrides=client_settings(producer_config, producer_setting),
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
        replaces_outbox=replaced_outbox(replaces_outbox),
        takeover_timeout=takeover_timeout,
        delivery_retention=delivery_retention,
    )
    check_processes(processes, config.slots, config.once)
    check_schema(db)
    if processes > 1:
        from outbox.relay.supervise import supervise

        raise typer.Exit(supervise(sys.argv[1:], processes, metrics_port, once))
    from outbox.relay.coordinator import Relay

    runner = Relay(config)
    stop_on_signals(runner.stop)
    server = serve_health(metrics_host, metrics_port, runner, runner.metrics.registry)
    try:
        stats = runner.run()
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
