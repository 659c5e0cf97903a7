"""Relay configuration and the producer rules from Kafka's semantics: pure, checked early (I8).

Every librdkafka setting passes through; these rules only refuse combinations
that would silently break a delivery guarantee, and name the setting and fix.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from outbox import transactional_ids
from outbox.codec import check_topic
from outbox.db import libpq_dsn
from outbox.errors import ConfigError, EventError
from outbox.partitioner import SHARD_COUNT
from outbox.relay.marker import MARKER_BYTES_PER_EVENT, MAX_TID_BYTES, max_marker_batch


class Guarantee(StrEnum):
    EXACTLY_ONCE = "exactly-once"
    AT_LEAST_ONCE = "at-least-once"
    AT_MOST_ONCE = "at-most-once"


class Profile(StrEnum):
    BALANCED = "balanced"
    THROUGHPUT = "throughput"
    LATENCY = "latency"


# The relay ends every batch with flush(), so lingering longer than it takes to produce a
# batch never makes a bigger request: it only holds records back while the slot deletes
# the batch and claims the next one, the work meant to overlap the broker's (5 ms: 1.2x the
# events/s of 50 ms with one slot, benchmarks/README.md).
PROFILES: dict[Profile, dict[str, str]] = {
    Profile.BALANCED: {"linger.ms": "5", "compression.type": "lz4"},
    Profile.THROUGHPUT: {
        "linger.ms": "5",
        "batch.size": "1000000",
        "batch.num.messages": "100000",
        "compression.type": "zstd",
    },
    Profile.LATENCY: {"linger.ms": "0", "batch.size": "65536", "compression.type": "lz4"},
}

# librdkafka's defaults for the settings the rules read.
_DEFAULTS = {
    "linger.ms": 5,
    "request.timeout.ms": 30000,
    "message.timeout.ms": 300000,
    "max.in.flight.requests.per.connection": 1000000,
    "retries": 2147483647,
    "message.max.bytes": 1000000,
    "transaction.timeout.ms": 60000,
}
_ALIASES = {
    "delivery.timeout.ms": "message.timeout.ms",
    "queue.buffering.max.ms": "linger.ms",
    "max.in.flight": "max.in.flight.requests.per.connection",
    "message.send.max.retries": "retries",
    "request.required.acks": "acks",
    "metadata.broker.list": "bootstrap.servers",
}
REPLICA_LAG_TIME_MAX_MS = 30000
"""The broker default that request.timeout.ms should exceed."""
TRANSACTION_MAX_TIMEOUT_MS = 900000
"""The broker default transaction.max.timeout.ms: a longer transaction.timeout.ms is refused."""
MAX_TAKEOVER_TIMEOUT = 86_400.0
"""The longest --takeover-timeout: its TCP keepalive idle time (a third of it) stays under
Linux's 32767 s and its milliseconds under PostgreSQL's int limit."""

# Owned by the relay: a user value would break slot fencing or ordering.
_RELAY_OWNED = {
    "transactional.id": "use --transactional-id-prefix",
    "partitioner": "keys always use murmur2_random (Java-compatible, keeps per-key order)",
    "bootstrap.servers": "use --bootstrap-servers",
}


# Which settings say how to reach and authenticate with the brokers: every Kafka client
# the relay creates (producers, the admin client, the marker consumer) gets them, so
# a SASL_SSL cluster works for all of them, not only for the producer.
_CONNECTION_NAMES = frozenset(
    {
        "bootstrap.servers",
        "security.protocol",
        "client.id",
        "client.rack",
        "client.dns.lookup",
        "broker.address.family",
        "broker.address.ttl",
        "connections.max.idle.ms",
        "api.version.request",
        "api.version.request.timeout.ms",
        "api.version.fallback.ms",
        "broker.version.fallback",
        "plugin.library.paths",
    }
)
_CONNECTION_PREFIXES = (
    "sasl.",
    "ssl.",
    "ssl_",
    "enable.ssl.",
    "enable.sasl.",
    "https.",
    "socket.",
    "reconnect.backoff.",
    "retry.backoff.",
)


def is_connection_setting(name: str) -> bool:
    """Is this librdkafka setting about reaching/authenticating with brokers (any client)?"""
    name = canonical(name)
    return name in _CONNECTION_NAMES or name.startswith(_CONNECTION_PREFIXES)


def connection_settings(settings: Mapping[str, str]) -> dict[str, str]:
    """The connection and security subset of the producer's settings, for the other clients."""
    return {canonical(k): str(v) for k, v in settings.items() if is_connection_setting(k)}


def canonical(name: str) -> str:
    """librdkafka's alias of a setting mapped to the one name the rules read."""
    return _ALIASES.get(name, name)


def _canonical_settings(settings: Mapping[str, object]) -> dict[str, str]:
    """Settings under their canonical names; of a name and its alias the LAST one wins,
    as librdkafka applies a configuration dict in order."""
    return {canonical(k): str(v) for k, v in settings.items()}


def _int(settings: Mapping[str, str], name: str) -> int:
    raw = settings.get(name, _DEFAULTS.get(name))
    try:
        return int(str(raw).strip())
    except ValueError:
        raise ConfigError(f"producer setting {name}={raw!r} must be an integer") from None


def _bool(settings: Mapping[str, str], name: str, default: bool) -> bool:
    """A boolean as librdkafka parses it (true/t/1, false/f/0, any case)."""
    raw = settings.get(name)
    if raw is None:
        return default
    text = str(raw).strip().lower()
    if text in {"true", "t", "1"}:
        return True
    if text in {"false", "f", "0"}:
        return False
    raise ConfigError(f"producer setting {name}={raw!r} must be true or false")


def _guarantee(value: str) -> Guarantee:
    try:
        return Guarantee(value)
    except ValueError:
        choices = ", ".join(g.value for g in Guarantee)
        raise ConfigError(f"--guarantee={value!r} must be one of: {choices}") from None


@dataclass(frozen=True, slots=True)
class ProducerPlan:
    """The producer settings to use, and warnings worth logging once at start-up."""

    settings: dict[str, str]
    warnings: list[str] = field(default_factory=list)

    @property
    def message_max_bytes(self) -> int:
        return _int(self.settings, "message.max.bytes")

    @property
    def transaction_timeout(self) -> float:
        """Seconds the broker lets a transaction stay open (``transaction.timeout.ms``)."""
        return _int(self.settings, "transaction.timeout.ms") / 1000

    @property
    def connection(self) -> dict[str, str]:
        """What the relay's admin client and marker consumer get (see ``connection_settings``)."""
        return connection_settings(self.settings)


def producer_settings(
    *,
    bootstrap_servers: str,
    guarantee: Guarantee,
    profile: Profile = Profile.BALANCED,
    overrides: Mapping[str, str] | None = None,
    transaction_timeout_ms: int = 60000,
) -> ProducerPlan:
    """Build the producer settings for a guarantee and check Kafka's rules on the result."""
    guarantee = _guarantee(guarantee)
    if not bootstrap_servers.strip():
        raise ConfigError("bootstrap servers are empty: pass --bootstrap-servers host:port[,...]")
    for name in overrides or {}:
        fix = _RELAY_OWNED.get(canonical(name))
        if fix is not None:
            raise ConfigError(
                f"producer setting {name} is managed by the relay and cannot be overridden: {fix}"
            )
    user = _canonical_settings(overrides or {})
    settings: dict[str, str] = {
        "bootstrap.servers": bootstrap_servers,
        "partitioner": "murmur2_random",
        "request.timeout.ms": "40000",
        "message.timeout.ms": "300000",
        "queue.buffering.max.messages": "200000",
    }
    if guarantee is Guarantee.AT_MOST_ONCE:
        settings |= {"acks": "0", "retries": "0", "enable.idempotence": "false"}
    else:
        settings |= {"acks": "all", "enable.idempotence": "true"}
    if guarantee is Guarantee.EXACTLY_ONCE:
        # librdkafka refuses message.timeout.ms > transaction.timeout.ms: follow the
        # transaction timeout, including one given as an override.
        timeout = user.get("transaction.timeout.ms", str(transaction_timeout_ms))
        settings |= {"transaction.timeout.ms": timeout, "message.timeout.ms": timeout}
    settings |= PROFILES[profile]
    settings |= user
    return ProducerPlan(settings, check_producer_rules(settings, guarantee))


def check_producer_rules(settings: Mapping[str, str], guarantee: Guarantee) -> list[str]:
    """Raise ConfigError for a broken guarantee; return warnings for merely unwise values.

    Aliases (``delivery.timeout.ms``, ``request.required.acks``...) are read as
    their canonical names; when both are given the later one wins, as in librdkafka.
    """
    guarantee = _guarantee(guarantee)
    settings = _canonical_settings(settings)
    warnings: list[str] = []
    acks = str(settings.get("acks", "all")).strip().lower()
    idempotent = _bool(settings, "enable.idempotence", default=False)
    if guarantee is not Guarantee.AT_MOST_ONCE:
        if acks not in {"all", "-1"}:
            raise ConfigError(
                f"acks={acks} loses acknowledged events when a leader fails; "
                f"--guarantee {guarantee} needs acks=all (remove -X acks=...)"
            )
        if not idempotent:
            raise ConfigError(
                f"enable.idempotence={settings.get('enable.idempotence', 'false')} lets retries "
                f"duplicate and reorder records; --guarantee {guarantee} needs "
                "enable.idempotence=true"
            )
    if idempotent:
        if acks not in {"all", "-1"}:
            raise ConfigError(
                f"enable.idempotence=true needs acks=all, got acks={acks}: "
                "remove -X enable.idempotence=... or -X acks=..."
            )
        if _int(settings, "retries") <= 0:
            raise ConfigError(
                f"retries={settings.get('retries')} turns every transient broker error into a "
                "failed batch; idempotence needs retries > 0 (remove -X retries=...)"
            )
        # Unset, librdkafka caps it at 5 itself when idempotence is on.
        in_flight = "max.in.flight.requests.per.connection"
        if in_flight in settings and _int(settings, in_flight) > 5:
            raise ConfigError(
                f"{in_flight}={settings[in_flight]} can reorder records; "
                "idempotence needs a value <= 5"
            )
    _int(settings, "message.max.bytes")  # read by the relay for every batch: fail here
    linger = _int(settings, "linger.ms")
    request_timeout = _int(settings, "request.timeout.ms")
    delivery_timeout = _int(settings, "message.timeout.ms")
    if delivery_timeout != 0 and delivery_timeout < linger + request_timeout:
        hint = (
            " (with --guarantee exactly-once it follows transaction.timeout.ms: raise that)"
            if guarantee is Guarantee.EXACTLY_ONCE
            else ""
        )
        raise ConfigError(
            f"delivery.timeout.ms={delivery_timeout} is shorter than linger.ms + "
            f"request.timeout.ms = {linger + request_timeout}: records would expire before "
            f"their first request could time out; raise delivery.timeout.ms{hint} or lower "
            "request.timeout.ms"
        )
    if guarantee is Guarantee.EXACTLY_ONCE:
        txn_timeout = _int(settings, "transaction.timeout.ms")
        if delivery_timeout > txn_timeout or delivery_timeout == 0:
            shown = "0 (infinite)" if delivery_timeout == 0 else str(delivery_timeout)
            raise ConfigError(
                f"delivery.timeout.ms={shown} exceeds transaction.timeout.ms="
                f"{txn_timeout}: a transaction would expire while its records are still being "
                "retried; set delivery.timeout.ms <= transaction.timeout.ms"
            )
        if txn_timeout > TRANSACTION_MAX_TIMEOUT_MS:
            warnings.append(
                f"transaction.timeout.ms={txn_timeout} is above the broker's default "
                f"transaction.max.timeout.ms ({TRANSACTION_MAX_TIMEOUT_MS}): unless the broker "
                "allows more, init_transactions fails with INVALID_TRANSACTION_TIMEOUT"
            )
    if request_timeout <= REPLICA_LAG_TIME_MAX_MS:
        warnings.append(
            f"request.timeout.ms={request_timeout} does not exceed the broker's "
            f"replica.lag.time.max.ms ({REPLICA_LAG_TIME_MAX_MS} by default): a slow follower "
            "can make requests time out and retry needlessly; consider 40000"
        )
    if guarantee is Guarantee.AT_MOST_ONCE:
        warnings.append(
            "--guarantee at-most-once: acks=0 and no retries; events are deleted from the "
            "outbox even if the broker never stored them"
        )
    return warnings


MAX_POLL_INTERVAL = 3600.0
"""The longest --poll-interval: an idle relay still polls at least once an hour."""
MAX_MISSING_TOPIC_TIMEOUT = 30 * 86_400.0
"""The longest --missing-topic-timeout (30 days): holding a topic's rows for ever is not an
option, since a finite wait is what turns them into dead rows an operator sees."""


class Bounds(NamedTuple):
    low: float
    high: float | None  # None: no upper bound
    note: str  # what an error adds after the bounds: the unit, and why


RANGES: dict[str, Bounds] = {
    "slots": Bounds(
        1, SHARD_COUNT, " (the shard count); every relay of one database must use the same value"
    ),
    "max_slots": Bounds(1, None, ""),
    "batch_size": Bounds(1, 100_000, ""),
    "poll_interval": Bounds(0.001, MAX_POLL_INTERVAL, " seconds"),
    "missing_topic_timeout": Bounds(0, MAX_MISSING_TOPIC_TIMEOUT, " seconds"),
    "batch_bytes": Bounds(1, None, " bytes"),
    "takeover_timeout": Bounds(
        1, MAX_TAKEOVER_TIMEOUT, " seconds (the server ends a relay's sessions after this silence)"
    ),
    "delivery_retention": Bounds(0, 3650, " days (0: no delivery record)"),
}
"""RelayConfig's numeric fields and their bounds: the only place the ranges are written (the
options of `outbox relay` show them in their help and have none of their own)."""


def check_range(
    option: str, value: float | None, low: float, high: float | None, note: str
) -> None:
    """Refuse a value outside ``[low, high]`` (NaN and infinities included) in one line that
    names the option; ``None`` is an unset optional value."""
    if value is None:
        return
    if high is None:
        if not (math.isfinite(value) and value >= low):
            raise ConfigError(f"{option}={value} must be at least {low:g}{note}")
    elif not low <= value <= high:  # False for NaN
        raise ConfigError(f"{option}={value} must be between {low:g} and {high:g}{note}")


@dataclass(frozen=True, slots=True)
class RelayConfig:
    """Everything one relay process needs; validated on construction."""

    dsn: str
    bootstrap_servers: str
    guarantee: Guarantee = Guarantee.EXACTLY_ONCE
    profile: Profile = Profile.BALANCED
    producer_overrides: Mapping[str, str] = field(default_factory=dict)
    slots: int = 4
    max_slots: int | None = None
    batch_size: int = 1000
    poll_interval: float = 1.0
    listen: bool = True
    transactional_id_prefix: str | None = None  # None: derived from the outbox identity
    transaction_timeout: float = 60.0
    state_topic: str = "outbox.relay-state"
    once: bool = False
    missing_topic_timeout: float = 300.0
    batch_bytes: int = 16 * 1024 * 1024
    replaces_outbox: uuid.UUID | None = None  # markers of this identity are ignored, not refused
    takeover_timeout: float = 30.0  # a relay silent this long loses its slots (I12)
    delivery_retention: int = 7  # days the delivery record keeps; 0: no record

    def __post_init__(self) -> None:
        for name, kind in (("guarantee", Guarantee), ("profile", Profile)):
            raw = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(raw))
            except ValueError:
                choices = ", ".join(m.value for m in kind)
                raise ConfigError(f"--{name}={raw!r} must be one of: {choices}") from None
        libpq_dsn(self.dsn)  # parse only: a bad --db fails here, without its password
        for name, (low, high, note) in RANGES.items():
            check_range(f"--{name.replace('_', '-')}", getattr(self, name), low, high, note)
        prefix = self.transactional_id_prefix
        if prefix is not None and (
            not prefix or not prefix.isascii() or len(prefix) > MAX_TID_BYTES - 3
        ):
            raise ConfigError(
                f"--transactional-id-prefix={prefix!r} must be non-empty ASCII of at most "
                f"{MAX_TID_BYTES - 3} characters (or leave it out: the default derives from "
                "the outbox identity)"
            )
        # librdkafka's transaction.timeout.ms starts at 1000 (a Python-only setting).
        check_range("transaction_timeout", self.transaction_timeout, 1, None, " second")
        try:
            check_topic(self.state_topic)
        except (EventError, TypeError) as exc:
            raise ConfigError(f"--state-topic: {exc}") from None
        plan = self.producer_plan()  # the producer rules too, before anything runs (I8)
        if self.guarantee is Guarantee.EXACTLY_ONCE:
            most = max_marker_batch(plan.message_max_bytes)
            if self.batch_size > most:
                raise ConfigError(
                    f"--batch-size={self.batch_size} is too large for the recovery marker: it "
                    f"names every event of a batch (up to {MARKER_BYTES_PER_EVENT} bytes each) "
                    f"in one record of at most message.max.bytes={plan.message_max_bytes}; "
                    f"use --batch-size={most} or less"
                )

    def producer_plan(self) -> ProducerPlan:
        return producer_settings(
            bootstrap_servers=self.bootstrap_servers,
            guarantee=self.guarantee,
            profile=self.profile,
            overrides=self.producer_overrides,
            transaction_timeout_ms=int(self.transaction_timeout * 1000),
        )

    def tid_prefix(self, outbox_id: uuid.UUID) -> str:
        """The given prefix, else one unique to the outbox (``outbox.transactional_ids``)."""
        return transactional_ids.prefix_of(self.transactional_id_prefix, outbox_id)

    def transactional_id(self, slot: int | str, outbox_id: uuid.UUID) -> str:
        """Slot ``slot``'s transactional.id (``outbox.transactional_ids``)."""
        return transactional_ids.transactional_id(self.tid_prefix(outbox_id), slot)


default_tid_prefix = transactional_ids.default_prefix
"""The default prefix (the name it had here before ``outbox.transactional_ids``)."""


def replaced_outbox(value: str | None) -> uuid.UUID | None:
    """``--replaces-outbox``: the id of the outbox identity this one replaces, if any."""
    if value is None:
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        raise ConfigError(
            f"--replaces-outbox={value!r} is not an outbox id (a uuid, as `outbox status` shows it)"
        ) from None


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """``-X key=value`` pairs, as kcat and librdkafka tools take them."""
    out: dict[str, str] = {}
    for number, pair in enumerate(pairs, 1):
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ConfigError(
                f"-X {_unquoted_entry(pair, number)} is not key=value (e.g. -X linger.ms=10)"
            )
        out[name.strip()] = value.strip()
    return out


_PROPERTY_NAME = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z0-9_]+)+")


def _unquoted_entry(pair: str, number: int) -> str:
    """Which entry is malformed, without echoing it: a mistyped ``sasl.password secret``
    (a space or a colon for ``=``) holds a secret. Only a leading property name is shown."""
    head = re.split(r"[\s:]", pair.strip(), maxsplit=1)[0]
    if _PROPERTY_NAME.fullmatch(head):
        return f"entry {number} (starting {head!r})"
    return f"entry {number}"
