"""The commands on throwaway services: ``outbox demo`` (the whole pipeline, checked) and
``outbox dev`` (a local PostgreSQL and broker for development, until Ctrl-C)."""

from __future__ import annotations

import sys
import threading
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from outbox.cli.app import app, command
from outbox.cli.daemon import stop_on_signals
from outbox.cli.errors import ExitCode
from outbox.cli.options import LogLevel, LogLevelName, finite, start_logging
from outbox.embedded import EmbeddedServiceError
from outbox.errors import ConfigError


class DemoBroker(StrEnum):
    TANSU = "tansu"
    KAFKA = "kafka"


@command(
    app,
    also=(EmbeddedServiceError,),  # no java, no mvn
    short_help="The whole pipeline on embedded services, checked.",
)
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
        typer.Option(
            metavar="RATIO",
            min=0,
            max=1,
            callback=finite,
            help="Share of transactions rolled back.",
        ),
    ] = 0.1,
    crash_relay: Annotated[
        bool, typer.Option(help="SIGKILL the relay half way; a new one takes over.")
    ] = True,
    steady_rate: Annotated[
        float,
        typer.Option(
            metavar="EVENTS/S",
            min=0,
            callback=finite,
            help="After the burst: publish at this steady rate to measure latency (0: skip).",
        ),
    ] = 50.0,
    steady_seconds: Annotated[
        float,
        typer.Option(
            metavar="SECONDS", min=0, callback=finite, help="How long the steady phase lasts."
        ),
    ] = 4.0,
    log_level: LogLevel = LogLevelName.WARNING,
) -> None:
    """Run the whole pipeline on embedded PostgreSQL + Kafka-API broker and check the result."""
    from outbox.embedded.demo import run_demo

    start_logging(log_level)
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
    raise typer.Exit(ExitCode.OK if ok else ExitCode.FAILED)


@command(
    app,
    also=(EmbeddedServiceError, OSError),
    short_help="Local PostgreSQL and broker for development, until Ctrl-C.",
)
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
    from outbox.embedded.dev import dev_servers, port_in_use

    start_logging(log_level)
    for option, port in (("--db-port", db_port), ("--broker-port", broker_port)):
        if port is not None and port_in_use(port):
            raise ConfigError(
                f"{option} {port}: 127.0.0.1:{port} is in use by another process: pick "
                f"another port, or leave {option} out for a free one"
            )
    stop = threading.Event()
    stop_on_signals(stop)
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
    finally:
        if env_file is not None:
            env_file.unlink(missing_ok=True)
    typer.echo("# outbox dev: stopped, data deleted", err=True)
