"""Consumer configuration and the rules that keep exactly-once effects (I5, I8). Pure.

Every librdkafka consumer setting passes through, except the few that would
silently break I5: offsets committed by librdkafka on a timer (before the
database commit), or records of aborted transactions applied as if they had
happened. Those are refused with a message naming the setting and the fix.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta

from consumer.retry import RetryPolicy
from outbox.codec import JSON, check_topic
from outbox.errors import ConfigError, EventError

DEAD_LETTER_SUFFIX = ".DLT"
MAX_TOPIC_LENGTH = 249
MAX_POLL_INTERVAL_MS = 300000
"""librdkafka's default ``max.poll.interval.ms``."""

DEFAULT_DEDUP_WINDOW = timedelta(days=14)
"""Kafka's default redelivery horizon, ``retention.ms`` + ``segment.ms`` (7 days each): a replay
from the start of a topic with default settings is still deduplicated."""

MAX_DEDUP_WINDOW_HOURS = 100 * 365 * 24.0
"""The longest window the CLI takes (100 years, well inside timedelta's range); the Python API
keeps dedup records for ever with ``dedup_window=None``."""

_SUFFIX_RE = re.compile(r"^[a-zA-Z0-9._-]{1,32}$")
_TRUE = frozenset({"true", "1", "t", "yes", "on"})
_ALIASES = {"auto.commit.enable": "enable.auto.commit"}
_OWNED = {
    "bootstrap.servers": "pass bootstrap_servers= (CLI: --bootstrap-servers)",
    "group.id": "set the class attribute group_id (CLI: --group-id)",
}


def _canonical(name: str) -> str:
    name = name.strip()
    return _ALIASES.get(name, name)


@dataclass(frozen=True, slots=True)
class ConsumerPlan:
    """The librdkafka settings to use, and warnings worth logging once at start-up."""

    settings: dict[str, str]
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class ConsumerConfig:
    """Everything one deduplicating consumer needs; validated on construction.

    ``dedup_window`` must be longer than the longest time after which the same
    event can arrive again (topic retention for a replay from the start, an
    offset reset, a relay outage followed by a re-publish): a duplicate that
    arrives after its dedup record was purged is applied again. ``None``
    keeps dedup records forever.
    """

    bootstrap_servers: str
    topics: tuple[str, ...]
    group_id: str
    batch_size: int = 100
    poll_timeout: float = 1.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    settings: Mapping[str, str] = field(default_factory=dict)
    dedup_window: timedelta | None = DEFAULT_DEDUP_WINDOW
    purge_interval: float = 600.0
    purge_batch_size: int = 1000
    purge_max_batches: int = 50
    dead_letter_suffix: str = DEAD_LETTER_SUFFIX
    default_content_type: str = JSON

    def __post_init__(self) -> None:
        if not isinstance(self.bootstrap_servers, str) or not self.bootstrap_servers.strip():
            raise ConfigError(
                "bootstrap servers are empty: pass bootstrap_servers='host:port[,...]' "
                "(CLI: --bootstrap-servers)"
            )
        if isinstance(self.topics, str) or not self.topics:
            raise ConfigError(
                f"topics={self.topics!r}: set the class attribute topics = ['orders.v1', ...] "
                "(a list of topic names; CLI: --topic)"
            )
        if not isinstance(self.group_id, str) or not self.group_id.strip():
            raise ConfigError(
                "group_id is empty: set the class attribute group_id = 'my-projector' "
                "(it also scopes the dedup records; CLI: --group-id)"
            )
        if not 1 <= self.batch_size <= 10_000:
            raise ConfigError(
                f"batch_size={self.batch_size} must be 1 to 10000 records per DB transaction "
                "(CLI: --batch-size)"
            )
        if not 0 < self.poll_timeout <= 60:
            raise ConfigError(f"poll_timeout={self.poll_timeout} must be in (0, 60] seconds")
        suffix = self.dead_letter_suffix
        if not isinstance(suffix, str) or not _SUFFIX_RE.match(suffix):
            raise ConfigError(
                f"dead_letter_suffix={suffix!r} must be a legal topic suffix like '.DLT'"
            )
        for topic in self.topics:
            self._check_topic(topic)
        if self.dedup_window is not None and self.dedup_window <= timedelta(0):
            raise ConfigError(
                f"dedup_window={self.dedup_window} must be positive "
                "(or None to keep dedup records forever)"
            )
        if not 0 < self.purge_interval < math.inf:  # NaN included
            raise ConfigError(f"purge_interval={self.purge_interval} must be > 0 seconds, finite")
        if not 1 <= self.purge_batch_size <= 100_000:
            raise ConfigError(
                f"purge_batch_size={self.purge_batch_size} must be between 1 and 100000 rows "
                "(small batches keep locks short)"
            )
        if self.purge_max_batches < 1:
            raise ConfigError(f"purge_max_batches={self.purge_max_batches} must be at least 1")
        self.plan()  # the librdkafka rules fail here, at construction, not at run()

    def _check_topic(self, topic: object) -> None:
        if not isinstance(topic, str):
            raise ConfigError(f"topics must be str, got {topic!r}")
        if topic.startswith("^"):
            return  # a regex subscription; each matched topic's DLT name is checked when used
        try:
            check_topic(topic)
        except EventError as exc:
            raise ConfigError(f"topics: {exc}") from None
        dlt = topic + self.dead_letter_suffix
        try:
            check_topic(dlt)
        except EventError:
            raise ConfigError(
                f"topic {topic!r}: its dead-letter topic {dlt!r} would not be a legal Kafka topic "
                f"name (at most {MAX_TOPIC_LENGTH} characters); shorten the topic or the suffix"
            ) from None

    def dead_letter_topic(self, topic: str) -> str:
        """``<topic><suffix>``; for a topic too long for that (one a regex subscription
        matched), the topic cut short plus 8 hex digits of its hash, so that the name stays
        legal, distinct and the same on every run, and no record can stop the consumer."""
        name = topic + self.dead_letter_suffix
        if len(name) <= MAX_TOPIC_LENGTH:
            return name
        digest = hashlib.sha256(topic.encode()).hexdigest()[:8]
        keep = MAX_TOPIC_LENGTH - len(self.dead_letter_suffix) - len(digest) - 1
        return f"{topic[:keep]}-{digest}{self.dead_letter_suffix}"

    def plan(self) -> ConsumerPlan:
        """The librdkafka consumer settings, checked against the rules of I5."""
        user = {_canonical(k): str(v).strip() for k, v in self.settings.items()}
        for name, fix in _OWNED.items():
            if name in user:
                raise ConfigError(f"consumer setting {name} cannot be overridden with -X: {fix}")
        if user.get("enable.auto.commit", "false").lower() in _TRUE:
            raise ConfigError(
                "enable.auto.commit=true commits offsets on a timer, possibly before the database "
                "transaction that applied them commits (breaks exactly-once effects, I5); the "
                "consumer commits offsets itself after each DB commit: remove -X enable.auto.commit"
            )
        isolation = user.get("isolation.level", "read_committed").lower()
        if isolation != "read_committed":
            raise ConfigError(
                f"isolation.level={isolation} would apply events of aborted Kafka transactions "
                "(events that never happened); remove -X isolation.level (default read_committed)"
            )
        settings = {
            "bootstrap.servers": self.bootstrap_servers,
            "group.id": self.group_id,
            "isolation.level": "read_committed",
            "enable.auto.commit": "false",
            "enable.auto.offset.store": "false",
            "auto.offset.reset": "earliest",
        } | user
        return ConsumerPlan(settings, self._warnings(settings))

    def _warnings(self, settings: Mapping[str, str]) -> list[str]:
        warnings: list[str] = []
        raw = settings.get("max.poll.interval.ms", str(MAX_POLL_INTERVAL_MS))
        try:
            max_poll_ms = int(raw)
        except ValueError:
            raise ConfigError(
                f"consumer setting max.poll.interval.ms={raw!r} must be an integer"
            ) from None
        worst_ms = self.retry.worst_case_seconds() * 1000
        if worst_ms >= max_poll_ms:
            raise ConfigError(
                f"the retry policy can wait {worst_ms / 1000:.0f} s on one message without polling "
                f"Kafka, longer than max.poll.interval.ms={max_poll_ms}: the consumer would be "
                "thrown out of its group mid-retry; lower RetryPolicy(attempts/max_backoff) or "
                "raise -X max.poll.interval.ms"
            )
        if worst_ms * self.batch_size >= max_poll_ms:
            warnings.append(
                f"a batch of {self.batch_size} messages that all fail can spend up to "
                f"{worst_ms * self.batch_size / 1000:.0f} s in retries, beyond "
                f"max.poll.interval.ms={max_poll_ms}; a smaller batch_size or shorter backoff "
                "avoids a rebalance then"
            )
        if settings.get("auto.offset.reset", "").lower() in {"latest", "largest", "end"}:
            warnings.append(
                "auto.offset.reset=latest: a new consumer group skips every event already on "
                "the topic"
            )
        if self.dedup_window is not None and self.dedup_window < timedelta(days=1):
            warnings.append(
                f"dedup_window={self.dedup_window} is short: an event delivered again after that "
                "(replay, offset reset, relay recovery after an outage) is applied again; "
                "use at least the topics' retention.ms"
            )
        return warnings


def dedup_window_of_hours(hours: float) -> timedelta:
    """``--dedup-window-hours`` as a window; refused unless a positive, finite number."""
    if not 0 < hours <= MAX_DEDUP_WINDOW_HOURS:  # NaN included
        raise ConfigError(
            f"--dedup-window-hours={hours:g} must be a positive number of hours up to "
            f"{MAX_DEDUP_WINDOW_HOURS:g} (e.g. 168 for a week)"
        )
    return timedelta(hours=hours)


def parse_topics(topics: Sequence[str] | str | None) -> tuple[str, ...]:
    """Class attribute or CLI value -> tuple; a lone string is one topic, not its letters."""
    if topics is None:
        return ()
    if isinstance(topics, str):
        return (topics,)
    return tuple(topics)


def _ms(value: str | None) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def horizon_warning(topic: str, window: timedelta | None, configs: Mapping[str, str]) -> str | None:
    """A warning when ``window`` is shorter than how long the broker may deliver ``topic``'s
    records again: ``retention.ms`` plus ``segment.ms`` (a segment is deleted only once its
    newest record is past retention). None when it is not, or when the broker did not say.
    """
    if window is None:
        return None
    policy = configs.get("cleanup.policy") or ""
    if {p.strip() for p in policy.split(",")} == {"compact"}:  # compact,delete: retention holds
        return (
            f"topic {topic!r} is compacted (cleanup.policy={policy}): its "
            f"latest records are kept forever, but dedup_window={window}: a replay after the "
            "group's offsets expire applies purged events again; set dedup_window=None to keep "
            "dedup records forever"
        )
    retention, segment = _ms(configs.get("retention.ms")), _ms(configs.get("segment.ms"))
    if retention is None:
        return None
    fix = "raise dedup_window (CLI: --dedup-window-hours), or None to keep dedup records forever"
    if retention < 0:
        return (
            f"topic {topic!r} keeps its records forever (retention.ms={retention}) but "
            f"dedup_window={window}: an event read again after that (a replay, an offset "
            f"reset) is applied again; {fix}"
        )
    horizon = timedelta(milliseconds=retention + max(segment or 0, 0))
    if window >= horizon:
        return None
    hours = math.ceil(horizon / timedelta(hours=1))
    return (
        f"dedup_window={window} is shorter than topic {topic!r}'s redelivery horizon "
        f"{horizon} (retention.ms={retention} + segment.ms={segment}): an event delivered "
        f"again after its dedup record was purged is applied again; {fix} (at least {hours} h)"
    )


ADMIN_SETTING_PREFIXES = ("bootstrap.servers", "security.", "sasl.", "ssl.", "client.id", "socket.")
"""Consumer settings an admin client needs too (connection and credentials)."""


def admin_settings(settings: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in settings.items() if k.startswith(ADMIN_SETTING_PREFIXES)}
