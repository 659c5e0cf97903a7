"""I5/I8: consumer settings that would break exactly-once effects are refused up front."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from consumer import ConsumerConfig, Event, IdempotentConsumer, RetryPolicy, load_consumer_class
from consumer.purge import PurgeSchedule
from outbox.cli.commands import app
from outbox.errors import ConfigError

DB = "postgresql+psycopg://app:s3cret@localhost:1/app"  # never connected to by these tests


def _config(**overrides: Any) -> ConsumerConfig:
    fields: dict[str, Any] = {
        "bootstrap_servers": "localhost:9092",
        "topics": ("orders.v1",),
        "group_id": "projector",
    }
    fields.update(overrides)
    return ConsumerConfig(**fields)


class Projector(IdempotentConsumer):
    topics = ["orders.v1"]  # noqa: RUF012 - the base class declares it a ClassVar
    group_id = "order-projector"

    def handle(self, session: Session, event: Event) -> None:
        pass


def test_i5_defaults_are_read_committed_manual_commit_from_earliest() -> None:
    settings = _config().plan().settings
    assert settings["isolation.level"] == "read_committed"
    assert settings["enable.auto.commit"] == "false"
    assert settings["enable.auto.offset.store"] == "false"
    assert settings["auto.offset.reset"] == "earliest"
    assert settings["group.id"] == "projector"
    assert settings["bootstrap.servers"] == "localhost:9092"


def test_other_librdkafka_settings_pass_through() -> None:
    plan = _config(settings={"session.timeout.ms": "6000", "security.protocol": "SASL_SSL"}).plan()
    assert plan.settings["session.timeout.ms"] == "6000"
    assert plan.settings["security.protocol"] == "SASL_SSL"
    assert plan.warnings == []


@pytest.mark.parametrize("name", ["enable.auto.commit", "auto.commit.enable"])
@pytest.mark.parametrize("value", ["true", "True", "1"])
def test_i5_auto_commit_is_refused_naming_the_setting(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=r"enable\.auto\.commit=true .* remove -X enable\.auto"):
        _config(settings={name: value})


def test_i5_auto_commit_false_is_accepted() -> None:
    assert _config(settings={"enable.auto.commit": "false"}).plan().settings


def test_i5_read_uncommitted_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"isolation\.level=read_uncommitted"):
        _config(settings={"isolation.level": "read_uncommitted"})


@pytest.mark.parametrize(
    ("name", "fix"), [("group.id", "group_id"), ("bootstrap.servers", "bootstrap_servers")]
)
def test_i8_owned_settings_point_to_their_option(name: str, fix: str) -> None:
    with pytest.raises(ConfigError, match=rf"{name} cannot be overridden .*{fix}"):
        _config(settings={name: "x"})


def test_i8_retry_longer_than_max_poll_interval_is_refused() -> None:
    slow = RetryPolicy(attempts=10, initial_backoff=10, max_backoff=60)
    with pytest.raises(ConfigError, match=r"max\.poll\.interval\.ms=300000"):
        _config(retry=slow)
    assert _config(retry=slow, settings={"max.poll.interval.ms": "900000"}).plan()


def test_warnings_for_latest_offsets_short_dedup_window_and_slow_batches() -> None:
    plan = _config(
        settings={"auto.offset.reset": "latest"},
        dedup_window=timedelta(hours=1),
        batch_size=1000,
        retry=RetryPolicy(attempts=3, initial_backoff=1),
    ).plan()
    text = "\n".join(plan.warnings)
    assert "auto.offset.reset=latest" in text
    assert "dedup_window=1:00:00 is short" in text
    assert "batch of 1000" in text


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"topics": ()}, "topics=()"),
        ({"topics": "orders.v1"}, "topics='orders.v1'"),
        ({"topics": ("bad topic",)}, "not a legal Kafka topic"),
        ({"topics": ("t" * 247,)}, "dead-letter topic"),
        ({"group_id": " "}, "group_id is empty"),
        ({"bootstrap_servers": ""}, "bootstrap servers are empty"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"poll_timeout": 0}, "poll_timeout=0"),
        ({"dedup_window": timedelta(0)}, "dedup_window=0:00:00 must be positive"),
        ({"purge_interval": 0}, "purge_interval=0"),
        ({"purge_batch_size": 0}, "purge_batch_size=0"),
        ({"dead_letter_suffix": "/dlt"}, "dead_letter_suffix='/dlt'"),
        ({"settings": {"max.poll.interval.ms": "soon"}}, "max.poll.interval.ms='soon'"),
    ],
)
def test_i8_bad_consumer_config_is_refused(overrides: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match.replace("(", r"\(").replace(")", r"\)")):
        _config(**overrides)


def test_regex_subscriptions_are_allowed() -> None:
    assert _config(topics=("^orders\\..*",)).topics == ("^orders\\..*",)


def test_class_attributes_are_defaults_and_keywords_override_them() -> None:
    projector = Projector(DB, "localhost:9092")
    assert projector.config.topics == ("orders.v1",)
    assert projector.config.group_id == "order-projector"
    assert projector.config.batch_size == 100
    other = Projector(
        DB, "localhost:9092", topics="orders.v2", group_id="g2", batch_size=5, dedup_window=None
    )
    assert (other.config.topics, other.config.group_id, other.config.batch_size) == (
        ("orders.v2",),
        "g2",
        5,
    )
    assert other.config.dedup_window is None


def test_i8_a_consumer_without_handle_is_refused() -> None:
    class NoHandler(IdempotentConsumer):
        topics = ["t"]  # noqa: RUF012
        group_id = "g"

    with pytest.raises(ConfigError, match=r"does not implement handle\(self, session, event\)"):
        NoHandler(DB, "localhost:9092")


def test_i8_a_consumer_without_topics_or_group_is_refused() -> None:
    class Bare(IdempotentConsumer):
        def handle(self, session: Session, event: Event) -> None:
            pass

    with pytest.raises(ConfigError, match="class attribute topics"):
        Bare(DB, "localhost:9092")
    with pytest.raises(ConfigError, match="class attribute group_id"):
        Bare(DB, "localhost:9092", topics=["t"])


def test_loader_finds_a_subclass_by_module_and_name() -> None:
    assert load_consumer_class(f"{__name__}:Projector") is Projector


@pytest.mark.parametrize(
    ("path", "match"),
    [
        ("no_colon", "not module:Class"),
        ("missing_module_xyz:Thing", "cannot import module 'missing_module_xyz'"),
        (f"{__name__}:Nope", "has no attribute 'Nope'"),
        ("builtins:dict", "not a subclass of consumer.IdempotentConsumer"),
        ("consumer:IdempotentConsumer", "base class itself"),
    ],
)
def test_i8_loader_refuses_anything_but_a_consumer_subclass(path: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_consumer_class(path)


def test_i8_cli_consume_refuses_a_non_consumer_class_and_hides_the_password() -> None:
    result = CliRunner().invoke(
        app, ["consume", "builtins:dict", "--db", DB, "--bootstrap-servers", "localhost:9092"]
    )
    assert result.exit_code == 2
    assert "not a subclass of consumer.IdempotentConsumer" in result.output
    assert "s3cret" not in result.output


def test_i8_cli_consume_refuses_auto_commit() -> None:
    result = CliRunner().invoke(
        app,
        [
            "consume",
            f"{__name__}:Projector",
            "--db",
            DB,
            "--bootstrap-servers",
            "localhost:9092",
            "-X",
            "enable.auto.commit=true",
        ],
    )
    assert result.exit_code == 2
    assert "enable.auto.commit=true" in result.output


@pytest.mark.parametrize("hours", ["nan", "inf", "-inf", "0", "-1"])
def test_i8_cli_consume_refuses_a_dedup_window_that_is_not_a_positive_finite_number_of_hours(
    hours: str,
) -> None:
    result = CliRunner().invoke(
        app,
        [
            "consume",
            f"{__name__}:Projector",
            "--db",
            DB,
            "--bootstrap-servers",
            "localhost:9092",
            "--dedup-window-hours",
            hours,
        ],
    )
    assert result.exit_code == 2, result.output
    [line] = result.output.strip().splitlines()
    assert line.startswith(f"error: --dedup-window-hours={hours} must be"), line


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"purge_interval": float("nan")}, "purge_interval=nan"),
        ({"purge_interval": float("inf")}, "purge_interval=inf"),
        ({"poll_timeout": float("nan")}, "poll_timeout=nan"),
    ],
)
def test_i8_consumer_config_refuses_seconds_that_are_not_finite(
    overrides: dict[str, Any], named: str
) -> None:
    _config()  # control
    with pytest.raises(ConfigError, match=named):
        _config(**overrides)


def test_purge_schedule_runs_at_start_then_every_interval_and_soon_after_a_backlog() -> None:
    schedule = PurgeSchedule(interval=600)
    assert schedule.due(0.0)
    schedule.ran(10.0, finished=True)
    assert not schedule.due(609.0)
    assert schedule.due(610.0)
    schedule.ran(610.0, finished=False)
    assert schedule.due(611.0)


@pytest.mark.parametrize("length", [1, 200, 245, 246, 247, 249])
def test_i10_every_topic_a_regex_can_match_has_a_legal_dead_letter_topic(length: int) -> None:
    """A topic of 246-249 characters used to get a DLT name Kafka refuses, and its first
    poison record stopped the consumer at every restart."""
    from outbox.codec import check_topic

    config = _config(topics=("^t.*",))
    topic = "t" * length
    dlt = config.dead_letter_topic(topic)
    check_topic(dlt)  # legal: raises otherwise
    assert dlt.endswith(".DLT")
    assert dlt == config.dead_letter_topic(topic)  # the same on every run
    if length + len(".DLT") <= 249:
        assert dlt == topic + ".DLT"
    else:
        assert dlt != config.dead_letter_topic("t" * (length - 1))  # distinct per topic
