"""The runner's checks before it joins its group: fail early with the fix, or warn (I8, I11)."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from confluent_kafka import Consumer, KafkaException
from sqlalchemy import Engine
from sqlalchemy import exc as sa_exc

from consumer.attempts import CHECK_ATTEMPTS_TABLE
from consumer.config import ConsumerConfig, admin_settings, horizon_warning
from consumer.deadletter import describe
from consumer.dedup import CHECK_TABLE
from consumer.handling import Transactions
from consumer.retry import sqlstate
from outbox.db import redact
from outbox.errors import ConfigError, NotMigrated

log = logging.getLogger("outbox.consumer")

HORIZON_TIMEOUT = 5.0
"""Seconds to wait for the broker's topic configs at start (the dedup window check)."""


def check_database(engine: Engine, transactions: Transactions) -> None:
    """Fail before joining the group when the database or the dedup table is missing (I8),
    or when the handler's engine runs without transactions (I11). ``ConnectionError`` when
    PostgreSQL cannot be reached."""
    for table, check in (
        ("outbox_processed_events", CHECK_TABLE),
        ("outbox_consumer_attempts", CHECK_ATTEMPTS_TABLE),
    ):
        _check_table(engine, table, check)
    try:
        autocommit = transactions.autocommit()
    except sa_exc.OperationalError as exc:  # a server restarting since the tables were read
        raise ConnectionError(f"cannot connect to PostgreSQL: {redact(str(exc.orig))}") from None
    if autocommit:
        # The dedup rows would commit before the handler ran, and a failing handler would
        # leave half its effects.
        raise ConfigError(
            "the consumer's engine runs in AUTOCOMMIT (isolation_level='AUTOCOMMIT'): each "
            "event's effects and its dedup record must commit in one transaction; pass an "
            "engine without isolation_level='AUTOCOMMIT' (e.g. create_engine(url))"
        )


def _check_table(engine: Engine, table: str, check: Any) -> None:
    try:
        with engine.connect() as conn:
            conn.execute(check)
    except sa_exc.ProgrammingError as exc:
        if sqlstate(exc) == "42P01":  # undefined_table
            raise NotMigrated(
                f"table {table} does not exist in this database: run `outbox migrate` first"
            ) from None
        raise ConfigError(
            f"cannot read {table}: {redact(str(exc.orig))} "
            "(the consumer's database user needs SELECT, INSERT, UPDATE and DELETE on it)"
        ) from None
    except sa_exc.OperationalError as exc:
        raise ConnectionError(f"cannot connect to PostgreSQL: {redact(str(exc.orig))}") from None


def new_kafka_consumer(settings: dict[str, Any]) -> Any:
    try:
        return Consumer(settings)
    except KafkaException as exc:
        raise ConfigError(
            f"librdkafka refused the consumer settings: {exc.args[0].str()} "
            "(check the -X / consumer_settings names and values)"
        ) from None


def check_horizon(config: ConsumerConfig, settings: Mapping[str, str], logger: Any) -> None:
    """Warn when the dedup window is shorter than a topic's redelivery horizon, as the
    broker reports it; a broker that does not say (or is down) is logged, not fatal."""
    topics = [t for t in config.topics if not t.startswith("^")]
    window: timedelta | None = config.dedup_window
    if window is None or not topics:
        return
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.admin._config import ConfigResource

    admin_config: dict[str, Any] = admin_settings(settings)
    admin_config["logger"] = logger
    try:
        admin = AdminClient(admin_config)
        futures = admin.describe_configs([ConfigResource("topic", t) for t in topics])
        for resource, future in futures.items():
            entries = future.result(timeout=HORIZON_TIMEOUT)
            configs = {name: entry.value for name, entry in entries.items()}
            warning = horizon_warning(resource.name, window, configs)
            if warning is not None:
                log.warning("%s", warning)
            elif "retention.ms" not in configs:
                log.info(
                    "the broker did not report retention.ms of topic %r: "
                    "dedup_window=%s not checked against it",
                    resource.name,
                    window,
                )
    except Exception as exc:
        log.info(
            "cannot read the topics' retention from the broker (%s): dedup_window not checked",
            describe(exc),
        )


def check_patterns(config: ConsumerConfig, kafka: Any) -> None:
    """Warn when a regex subscription also matches its own dead-letter topics: their
    records are consumed too (they are never dead-lettered again)."""
    suffix = config.dead_letter_suffix
    patterns = [t for t in config.topics if t.startswith("^")]
    if not patterns:
        return
    try:
        names = list(kafka.list_topics(timeout=HORIZON_TIMEOUT).topics)
    except Exception:
        names = []
    for pattern in patterns:
        try:
            regex = re.compile(pattern)
        except re.error:
            continue  # librdkafka's regex dialect: it reports its own errors
        matched = [n for n in names if regex.search(n) and not n.endswith(suffix)]
        samples = matched or [pattern.lstrip("^").split(".*")[0].rstrip("\\$") or "topic"]
        if any(regex.search(name + suffix) for name in samples):
            log.warning(
                "the subscription %r also matches its own dead-letter topics (%s): their "
                "records are consumed by this group too; a failing one is logged and marked "
                "processed, never dead-lettered again. Anchor the pattern so that it cannot "
                "match %r, or list the topics",
                pattern,
                samples[0] + suffix,
                suffix,
            )
