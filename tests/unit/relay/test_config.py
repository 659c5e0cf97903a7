"""I8: producer settings that would break a delivery guarantee are refused at start-up.

Every rule has a test built the same way: a valid base passes without complaint
(the control), and changing one setting makes it fail with a message naming it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka import KafkaException, Producer

from outbox.errors import ConfigError
from outbox.relay.config import (
    PROFILES,
    REPLICA_LAG_TIME_MAX_MS,
    Guarantee,
    ProducerPlan,
    Profile,
    RelayConfig,
    canonical,
    check_producer_rules,
    is_connection_setting,
    parse_overrides,
    producer_settings,
)

EOS, ALO, AMO = Guarantee.EXACTLY_ONCE, Guarantee.AT_LEAST_ONCE, Guarantee.AT_MOST_ONCE

# Valid for every guarantee that needs idempotence, and warning-free.
SAFE = {
    "acks": "all",
    "enable.idempotence": "true",
    "linger.ms": "5",
    "request.timeout.ms": "40000",
    "message.timeout.ms": "60000",
    "transaction.timeout.ms": "60000",
}


def _refused(change: dict[str, str], guarantee: Guarantee, *names: str) -> str:
    """Assert SAFE passes, SAFE + change is refused, and the message names every ``names``."""
    assert check_producer_rules(SAFE, guarantee) == [], "control: the base settings are fine"
    with pytest.raises(ConfigError) as caught:
        check_producer_rules(SAFE | change, guarantee)
    message = str(caught.value)
    for name in names:
        assert name in message, f"{name!r} not named in: {message}"
    return message


def _plan(**kw: Any) -> ProducerPlan:
    args: dict[str, Any] = {"bootstrap_servers": "broker:9092", "guarantee": EOS}
    args.update(kw)
    return producer_settings(**args)


# -- acks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("guarantee", [EOS, ALO])
@pytest.mark.parametrize("acks", ["1", "0", "2"])
def test_i8_acks_other_than_all_refused_for_exactly_once_and_at_least_once(
    guarantee: Guarantee, acks: str
) -> None:
    message = _refused({"acks": acks}, guarantee, f"acks={acks}", "acks=all")
    assert str(guarantee) in message


def test_i8_acks_refused_when_given_under_its_alias() -> None:
    _refused({"request.required.acks": "1"}, EOS, "acks=1")


@pytest.mark.parametrize(
    ("settings", "refused"),
    [
        ({"acks": "all", "request.required.acks": "1"}, True),
        ({"request.required.acks": "1", "acks": "all"}, False),
    ],
)
def test_i8_rules_read_the_value_librdkafka_ends_up_with(
    settings: dict[str, str], refused: bool
) -> None:
    """librdkafka applies a config dict in order, so of a name and its alias the last wins."""
    settings = settings | {k: v for k, v in SAFE.items() if k != "acks"}
    librdkafka_refuses = False
    try:
        Producer(settings | {"bootstrap.servers": "127.0.0.1:1", "log_level": "0"}).flush(0)
    except KafkaException:
        librdkafka_refuses = True
    assert librdkafka_refuses is refused
    if refused:
        with pytest.raises(ConfigError, match="acks=1"):
            check_producer_rules(settings, EOS)
    else:
        assert check_producer_rules(settings, EOS) == []


@pytest.mark.parametrize("acks", ["all", "-1", "ALL"])
def test_acks_all_in_any_spelling_is_accepted(acks: str) -> None:
    assert check_producer_rules(SAFE | {"acks": acks}, EOS) == []


# -- idempotence ---------------------------------------------------------------------------


@pytest.mark.parametrize("guarantee", [EOS, ALO])
@pytest.mark.parametrize("value", ["false", "0", "f"])
def test_i8_idempotence_off_refused_for_exactly_once_and_at_least_once(
    guarantee: Guarantee, value: str
) -> None:
    _refused({"enable.idempotence": value}, guarantee, f"enable.idempotence={value}")


def test_i8_idempotence_missing_refused_for_exactly_once() -> None:
    base = {k: v for k, v in SAFE.items() if k != "enable.idempotence"}
    with pytest.raises(ConfigError, match=r"enable\.idempotence"):
        check_producer_rules(base, EOS)


@pytest.mark.parametrize("value", ["true", "TRUE", "t", "1"])
def test_idempotence_true_in_librdkafkas_spellings_is_accepted(value: str) -> None:
    # Regression: only the exact string "true" used to count as on.
    assert check_producer_rules(SAFE | {"enable.idempotence": value}, EOS) == []


def test_i8_idempotence_value_that_is_not_a_bool_refused_naming_it() -> None:
    _refused({"enable.idempotence": "yes"}, EOS, "enable.idempotence", "true or false")


def test_i8_idempotence_with_acks_0_refused_even_for_at_most_once() -> None:
    base = {"acks": "0", "enable.idempotence": "false", "retries": "0"}
    assert check_producer_rules(base, AMO)  # only the at-most-once warning
    with pytest.raises(ConfigError, match=r"enable\.idempotence=true needs acks=all"):
        check_producer_rules(base | {"enable.idempotence": "true", "retries": "5"}, AMO)


# -- retries -------------------------------------------------------------------------------


@pytest.mark.parametrize("guarantee", [EOS, ALO])
@pytest.mark.parametrize("name", ["retries", "message.send.max.retries"])
def test_i8_idempotence_without_retries_refused(guarantee: Guarantee, name: str) -> None:
    _refused({name: "0"}, guarantee, "retries=0", "retries > 0")


def test_i8_negative_retries_refused() -> None:
    _refused({"retries": "-1"}, EOS, "retries=-1")


# -- max in flight -------------------------------------------------------------------------


@pytest.mark.parametrize("guarantee", [EOS, ALO])
@pytest.mark.parametrize("name", ["max.in.flight.requests.per.connection", "max.in.flight"])
def test_i8_more_than_5_in_flight_refused_with_idempotence(guarantee: Guarantee, name: str) -> None:
    _refused({name: "6"}, guarantee, "max.in.flight.requests.per.connection=6", "<= 5")


@pytest.mark.parametrize("value", ["1", "5"])
def test_up_to_5_in_flight_is_accepted(value: str) -> None:
    assert check_producer_rules(SAFE | {"max.in.flight": value}, EOS) == []


def test_in_flight_unset_is_accepted_because_librdkafka_caps_it_itself() -> None:
    assert "max.in.flight.requests.per.connection" not in SAFE
    assert check_producer_rules(SAFE, EOS) == []


def test_many_in_flight_allowed_without_idempotence() -> None:
    settings = {"acks": "0", "retries": "0", "max.in.flight": "100"}
    assert check_producer_rules(settings, AMO)  # only the at-most-once warning


# -- delivery timeout ----------------------------------------------------------------------


@pytest.mark.parametrize("guarantee", [EOS, ALO])
@pytest.mark.parametrize("name", ["message.timeout.ms", "delivery.timeout.ms"])
def test_i8_delivery_timeout_below_linger_plus_request_timeout_refused(
    guarantee: Guarantee, name: str
) -> None:
    _refused({name: "40004"}, guarantee, "delivery.timeout.ms=40004", "40005")


def test_delivery_timeout_equal_to_linger_plus_request_timeout_is_accepted() -> None:
    settings = SAFE | {"message.timeout.ms": "40005"}
    assert check_producer_rules(settings, EOS) == []


def test_i8_delivery_timeout_rule_counts_linger() -> None:
    _refused({"linger.ms": "20001", "request.timeout.ms": "40000"}, EOS, "delivery.timeout.ms")


def test_i8_delivery_timeout_rule_applies_to_at_most_once_too() -> None:
    settings = {"acks": "0", "retries": "0", "message.timeout.ms": "1000"}
    with pytest.raises(ConfigError, match=r"delivery\.timeout\.ms=1000"):
        check_producer_rules(settings, AMO)


def test_infinite_delivery_timeout_is_fine_without_transactions() -> None:
    assert check_producer_rules(SAFE | {"message.timeout.ms": "0"}, ALO) == []


def test_i8_delivery_timeout_hint_under_exactly_once_points_at_the_transaction_timeout() -> None:
    with pytest.raises(ConfigError, match=r"follows transaction\.timeout\.ms"):
        _plan(transaction_timeout_ms=30000)


# -- transaction timeout -------------------------------------------------------------------


def test_i8_delivery_timeout_above_transaction_timeout_refused_for_exactly_once() -> None:
    _refused(
        {"message.timeout.ms": "60001"},
        EOS,
        "delivery.timeout.ms=60001",
        "transaction.timeout.ms=60000",
    )
    assert check_producer_rules(SAFE | {"message.timeout.ms": "60001"}, ALO) == []


def test_i8_infinite_delivery_timeout_refused_for_exactly_once() -> None:
    _refused({"message.timeout.ms": "0"}, EOS, "delivery.timeout.ms=0 (infinite)")


def test_transaction_timeout_above_the_broker_maximum_warns() -> None:
    settings = SAFE | {"transaction.timeout.ms": "900001"}
    (warning,) = check_producer_rules(settings, EOS)
    assert "transaction.max.timeout.ms" in warning
    assert check_producer_rules(SAFE | {"transaction.timeout.ms": "900000"}, EOS) == []


# -- request timeout -----------------------------------------------------------------------


@pytest.mark.parametrize("value", ["30000", "5000"])
def test_request_timeout_not_above_replica_lag_time_max_warns(value: str) -> None:
    (warning,) = check_producer_rules(SAFE | {"request.timeout.ms": value}, EOS)
    assert f"request.timeout.ms={value}" in warning
    assert str(REPLICA_LAG_TIME_MAX_MS) in warning


def test_request_timeout_above_replica_lag_time_max_does_not_warn() -> None:
    assert check_producer_rules(SAFE | {"request.timeout.ms": "30001"}, EOS) == []


# -- values --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["retries", "linger.ms", "request.timeout.ms", "message.timeout.ms", "message.max.bytes"],
)
def test_i8_non_integer_values_refused_naming_the_setting(name: str) -> None:
    _refused({name: "ten"}, EOS, f"{name}='ten'", "integer")


def test_rules_accept_the_guarantee_as_its_string() -> None:
    with pytest.raises(ConfigError, match="acks=1"):
        check_producer_rules(SAFE | {"acks": "1"}, "exactly-once")  # type: ignore[arg-type]


def test_i8_unknown_guarantee_refused() -> None:
    with pytest.raises(ConfigError, match="--guarantee='twice'"):
        check_producer_rules(SAFE, "twice")  # type: ignore[arg-type]


# -- building the settings -----------------------------------------------------------------


def test_exactly_once_plan_is_transactional_with_the_delivery_timeout_inside_it() -> None:
    plan = _plan(transaction_timeout_ms=45000)
    assert plan.settings["acks"] == "all"
    assert plan.settings["enable.idempotence"] == "true"
    assert plan.settings["partitioner"] == "murmur2_random"
    assert plan.settings["transaction.timeout.ms"] == "45000"
    assert plan.settings["message.timeout.ms"] == "45000"
    assert plan.settings["bootstrap.servers"] == "broker:9092"
    assert plan.warnings == []


def test_at_least_once_plan_is_idempotent_without_transactions() -> None:
    plan = _plan(guarantee=ALO)
    assert plan.settings["enable.idempotence"] == "true"
    assert "transaction.timeout.ms" not in plan.settings
    assert plan.warnings == []


def test_at_most_once_plan_has_no_acks_no_retries_and_says_so() -> None:
    plan = _plan(guarantee=AMO)
    assert (plan.settings["acks"], plan.settings["retries"]) == ("0", "0")
    assert plan.settings["enable.idempotence"] == "false"
    assert any("at-most-once" in w for w in plan.warnings)


def test_profiles_follow_the_design_presets() -> None:
    throughput = PROFILES[Profile.THROUGHPUT]
    latency = PROFILES[Profile.LATENCY]
    assert throughput["compression.type"] == "zstd"
    assert latency["compression.type"] == "lz4"
    # Every batch ends with a flush: a longer linger would only hold records back while the
    # slot claims its next batch instead of letting the broker work meanwhile.
    assert all(int(p["linger.ms"]) <= 5 for p in PROFILES.values())
    assert 0 <= int(latency["linger.ms"]) < int(throughput["linger.ms"])
    assert int(throughput["batch.size"]) > int(latency["batch.size"])


@pytest.mark.parametrize("profile", list(Profile))
def test_profile_settings_reach_the_plan(profile: Profile) -> None:
    plan = _plan(profile=profile)
    assert PROFILES[profile].items() <= plan.settings.items()


def test_any_librdkafka_setting_passes_through_and_overrides_the_profile() -> None:
    overrides = {"socket.keepalive.enable": "true", "compression.type": "gzip"}
    plan = _plan(profile=Profile.THROUGHPUT, overrides=overrides)
    assert plan.settings["socket.keepalive.enable"] == "true"
    assert plan.settings["compression.type"] == "gzip"


def test_overrides_under_an_alias_replace_the_canonical_setting() -> None:
    plan = _plan(overrides={"queue.buffering.max.ms": "7"})
    assert plan.settings["linger.ms"] == "7"
    assert "queue.buffering.max.ms" not in plan.settings


def test_of_a_setting_and_its_alias_the_later_wins_as_in_librdkafka() -> None:
    plan = _plan(overrides={"linger.ms": "3", "queue.buffering.max.ms": "9"})
    assert plan.settings["linger.ms"] == "9"
    plan = _plan(overrides={"queue.buffering.max.ms": "9", "linger.ms": "3"})
    assert plan.settings["linger.ms"] == "3"


def test_a_transaction_timeout_override_carries_the_delivery_timeout_with_it() -> None:
    # Regression: it used to leave message.timeout.ms at the old value and be refused.
    plan = _plan(overrides={"transaction.timeout.ms": "30000", "request.timeout.ms": "20000"})
    assert plan.settings["message.timeout.ms"] == "30000"
    plan = _plan(overrides={"transaction.timeout.ms": "120000", "delivery.timeout.ms": "90000"})
    assert plan.settings["message.timeout.ms"] == "90000"


@pytest.mark.parametrize(
    ("name", "fix"),
    [
        ("transactional.id", "--transactional-id-prefix"),
        ("partitioner", "murmur2_random"),
        ("bootstrap.servers", "--bootstrap-servers"),
        ("metadata.broker.list", "--bootstrap-servers"),
    ],
)
def test_i8_relay_owned_settings_cannot_be_overridden(name: str, fix: str) -> None:
    with pytest.raises(ConfigError, match=rf"{name} is managed by the relay.*{fix}"):
        _plan(overrides={name: "x"})


@pytest.mark.parametrize("servers", ["", "  "])
def test_i8_empty_bootstrap_servers_refused(servers: str) -> None:
    with pytest.raises(ConfigError, match="--bootstrap-servers"):
        _plan(bootstrap_servers=servers)


def test_plan_message_max_bytes_default_and_override() -> None:
    assert _plan().message_max_bytes == 1000000
    assert _plan(overrides={"message.max.bytes": "2000"}).message_max_bytes == 2000


def test_plan_transaction_timeout_default_and_override_in_seconds() -> None:
    """What a fence at the end of a long transaction is measured against (I9)."""
    assert _plan().transaction_timeout == 60.0
    assert _plan(overrides={"transaction.timeout.ms": "90000"}).transaction_timeout == 90.0


def test_canonical_maps_librdkafka_aliases() -> None:
    assert canonical("delivery.timeout.ms") == "message.timeout.ms"
    assert canonical("queue.buffering.max.ms") == "linger.ms"
    assert canonical("request.required.acks") == "acks"
    assert canonical("linger.ms") == "linger.ms"


@pytest.fixture
def producers() -> Iterator[list[Any]]:
    made: list[Any] = []
    yield made
    for producer in made:
        producer.flush(0)


@pytest.mark.parametrize("guarantee", list(Guarantee))
@pytest.mark.parametrize("profile", list(Profile))
def test_librdkafka_accepts_every_plan(
    guarantee: Guarantee, profile: Profile, producers: list[Any]
) -> None:
    """No broker needed: librdkafka validates the configuration when the producer is built."""
    settings: dict[str, Any] = dict(_plan(guarantee=guarantee, profile=profile).settings)
    settings |= {"bootstrap.servers": "127.0.0.1:1", "log_level": 0}
    if guarantee is EOS:
        settings["transactional.id"] = "outbox-relay-0"
    producers.append(Producer(settings))


# -- RelayConfig ---------------------------------------------------------------------------


def _config(**kw: Any) -> RelayConfig:
    args: dict[str, Any] = {
        "dsn": "postgresql+psycopg://relay:secret@db/app",
        "bootstrap_servers": "broker:9092",
    }
    args.update(kw)
    return RelayConfig(**args)


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("slots", 0, "--slots=0"),
        ("slots", 33, "--slots=33"),
        ("max_slots", 0, "--max-slots=0"),
        ("batch_size", 0, "--batch-size=0"),
        ("batch_size", 100_001, "--batch-size=100001"),
        ("poll_interval", 0, "--poll-interval=0"),
        ("poll_interval", float("nan"), "--poll-interval=nan"),
        ("poll_interval", float("inf"), "--poll-interval=inf"),
        ("missing_topic_timeout", -1.0, "--missing-topic-timeout=-1"),
        ("missing_topic_timeout", float("nan"), "--missing-topic-timeout=nan"),
        ("missing_topic_timeout", float("inf"), "--missing-topic-timeout=inf"),
        ("takeover_timeout", float("nan"), "--takeover-timeout=nan"),
        ("delivery_retention", -1, "--delivery-retention=-1"),
        ("batch_bytes", 0, "--batch-bytes=0"),
        ("transactional_id_prefix", "", "--transactional-id-prefix"),
        ("transactional_id_prefix", "relé", "--transactional-id-prefix"),
        ("transaction_timeout", 0.5, "transaction_timeout=0.5"),
        ("transaction_timeout", float("nan"), "transaction_timeout=nan"),
        ("state_topic", "relay state", "--state-topic"),
        ("guarantee", "twice", "--guarantee='twice'"),
        ("profile", "fast", "--profile='fast'"),
        ("dsn", "", "--db is empty"),
        ("dsn", "mysql://u:secret@h/db", "not PostgreSQL"),
        ("bootstrap_servers", "", "--bootstrap-servers"),
        ("producer_overrides", {"acks": "1"}, "acks=1"),
    ],
)
def test_i8_relay_config_refuses_bad_values_naming_the_option(
    field: str, value: Any, named: str
) -> None:
    _config()  # control
    with pytest.raises(ConfigError) as caught:
        _config(**{field: value})
    assert named in str(caught.value)
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize("slots", [1, 32])
def test_relay_config_accepts_the_slot_range_limits(slots: int) -> None:
    assert _config(slots=slots).slots == slots


def test_relay_config_turns_strings_into_enums() -> None:
    config = _config(guarantee="at-least-once", profile="latency")
    assert config.guarantee is Guarantee.AT_LEAST_ONCE
    assert config.profile is Profile.LATENCY
    assert "transaction.timeout.ms" not in config.producer_plan().settings


def test_i4_transactional_id_is_stable_per_slot() -> None:
    outbox_id = uuid.uuid4()
    config = _config(transactional_id_prefix="orders-relay")
    again = _config(transactional_id_prefix="orders-relay")
    assert config.transactional_id(3, outbox_id) == "orders-relay-3"
    assert again.transactional_id(3, uuid.uuid4()) == "orders-relay-3"


def test_i9_default_transactional_ids_are_unique_per_outbox() -> None:
    a = uuid.UUID("0123456789ab4def8000000000000000")
    config = _config()
    assert config.transactional_id_prefix is None
    assert config.transactional_id(0, a) == "outbox-0123456789ab-0"
    assert config.transactional_id(0, a) == _config().transactional_id(0, a)  # stable
    assert config.transactional_id(0, uuid.uuid4()) != config.transactional_id(0, a)


@pytest.mark.parametrize(
    ("message_max_bytes", "largest"),
    [
        (1_000_000, 38_450),
        (10_000, 373),
        (100_000_000, 38_450),  # a marker stays under 1 MB, the broker's default limit
    ],
)
def test_i9_batch_size_is_capped_so_the_marker_fits_one_record(
    message_max_bytes: int, largest: int
) -> None:
    overrides = {"message.max.bytes": str(message_max_bytes)}
    assert _config(producer_overrides=overrides, batch_size=largest).batch_size == largest
    with pytest.raises(
        ConfigError,
        match=rf"--batch-size={largest + 1} is too large for the recovery marker.*"
        rf"message.max.bytes={message_max_bytes}; use --batch-size={largest} or less",
    ):
        _config(producer_overrides=overrides, batch_size=largest + 1)
    # without a marker (at-least-once) only the general limit applies
    assert _config(producer_overrides=overrides, batch_size=100_000, guarantee="at-least-once")


def test_relay_transaction_timeout_becomes_the_producers() -> None:
    plan = _config(transaction_timeout=45.5).producer_plan()
    assert plan.settings["transaction.timeout.ms"] == "45500"
    assert plan.settings["message.timeout.ms"] == "45500"


# -- -X key=value --------------------------------------------------------------------------


def test_parse_overrides_reads_key_value_pairs() -> None:
    pairs = ["linger.ms=10", " compression.type = zstd ", "sasl.password=a=b", "client.id="]
    assert parse_overrides(pairs) == {
        "linger.ms": "10",
        "compression.type": "zstd",
        "sasl.password": "a=b",
        "client.id": "",
    }
    assert parse_overrides([]) == {}
    assert parse_overrides(["a=1", "a=2"]) == {"a": "2"}


@pytest.mark.parametrize("pair", ["linger.ms", "=10", " =10", ""])
def test_i8_parse_overrides_refuses_what_is_not_key_value(pair: str) -> None:
    with pytest.raises(ConfigError, match=r"is not key=value \(e.g. -X linger.ms=10\)"):
        parse_overrides([pair])


@pytest.mark.parametrize(
    ("pair", "shown"),
    [
        ("sasl.password S3cr3t-pw", "entry 1 (starting 'sasl.password')"),
        ("sasl.password: S3cr3t-pw", "entry 1 (starting 'sasl.password')"),
        ("S3cr3t-pw", "entry 1"),
    ],
)
def test_i8_a_malformed_setting_is_named_without_echoing_its_value(pair: str, shown: str) -> None:
    """A password typed with a space or a colon instead of '=' never reaches the error."""
    with pytest.raises(ConfigError) as caught:
        parse_overrides([pair])
    assert "S3cr3t-pw" not in str(caught.value)
    assert str(caught.value).startswith(f"-X {shown} is not key=value")


SECURED = {
    "security.protocol": "SASL_SSL",
    "sasl.mechanisms": "SCRAM-SHA-512",
    "sasl.username": "relay",
    "sasl.password": "s3cret",
    "ssl.ca.location": "/etc/ca.pem",
    "enable.ssl.certificate.verification": "true",
    "client.dns.lookup": "use_all_dns_ips",
    "socket.keepalive.enable": "true",
    "metadata.broker.list": "ignored:1",
}
PRODUCER_ONLY = {"linger.ms": "20", "compression.type": "zstd", "acks": "all", "batch.size": "9"}


@pytest.mark.parametrize("name", sorted(SECURED))
def test_connection_and_security_settings_are_connection_settings(name: str) -> None:
    assert is_connection_setting(name)


@pytest.mark.parametrize("name", [*sorted(PRODUCER_ONLY), "enable.idempotence", "retries"])
def test_producer_only_settings_are_not_given_to_other_clients(name: str) -> None:
    assert not is_connection_setting(name)


def test_every_kafka_client_of_the_relay_gets_the_same_connection_settings() -> None:
    """The admin client and the marker consumer reach a SASL_SSL cluster like the producer."""
    overrides = {k: v for k, v in SECURED.items() if k != "metadata.broker.list"}
    plan = producer_settings(
        bootstrap_servers="b:9093",
        guarantee=Guarantee.EXACTLY_ONCE,
        overrides=overrides | PRODUCER_ONLY,
    )
    assert plan.connection == {"bootstrap.servers": "b:9093"} | overrides
    assert all(plan.settings[k] == v for k, v in plan.connection.items())


def test_i8_replaces_outbox_must_be_an_outbox_id() -> None:
    from typer.testing import CliRunner

    from outbox.cli.commands import app

    args = ["relay", "--db", "postgresql://relay:secret@db/app", "-b", "broker:9092"]
    result = CliRunner().invoke(app, [*args, "--replaces-outbox", "not-a-uuid"])
    assert result.exit_code == 2
    assert "--replaces-outbox='not-a-uuid' is not an outbox id" in result.output
    assert "secret" not in result.output
