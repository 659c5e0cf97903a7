"""The options several commands share, each declared once with its environment variable
(shown in ``--help``). This package is the only one that reads environment variables.

Options carry no ranges of their own: a value is checked once, by the configuration it
ends up in (``RelayConfig``, ``ConsumerConfig``), which names the option in its error.
"""

from __future__ import annotations

import math
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from outbox.logs import setup_logging
from outbox.relay.config import parse_overrides


class LogLevelName(StrEnum):
    DEBUG = "DEBUG"
    INFO = "INFO"
    WARNING = "WARNING"
    ERROR = "ERROR"


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
DeadIds = Annotated[
    list[int],
    typer.Argument(metavar="ID", help="Ids from `outbox dead list`.", show_default=False),
]


def finite(value: float | None) -> float | None:
    """The check of a command's own float options (typer's ranges let NaN through)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def client_settings_option(help: str) -> Any:
    """``-X KEY=VALUE``, repeatable: any librdkafka setting of the command's Kafka client."""
    return typer.Option("-X", metavar="KEY=VALUE", help=help)


def client_config_option(envvar: str, help: str) -> Any:
    """A file of ``key=value`` librdkafka settings (e.g. SASL/TLS); ``-X`` wins over it."""
    return typer.Option(envvar=envvar, metavar="FILE", help=help, exists=True, dir_okay=False)


ProducerSettings = Annotated[
    list[str] | None,
    client_settings_option(
        "Any librdkafka producer setting (repeatable); wins over --producer-config and the profile."
    ),
]
ProducerConfig = Annotated[
    Path | None,
    client_config_option(
        "OUTBOX_PRODUCER_CONFIG",
        "File of key=value producer settings (e.g. SASL/TLS); -X wins over it.",
    ),
]


def client_settings(path: Path | None, pairs: list[str] | None) -> dict[str, str]:
    """A settings file (``key=value`` lines, # comments) overridden by ``-X key=value`` pairs."""
    lines = path.read_text().splitlines() if path is not None else []
    from_file = [
        line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")
    ]
    return parse_overrides(from_file) | parse_overrides(pairs or [])


def start_logging(level: LogLevelName, log_format: LogFormatName = LogFormatName.TEXT) -> None:
    setup_logging(level.value, json_lines=log_format is LogFormatName.JSON)
