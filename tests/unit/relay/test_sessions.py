"""The bounds of a relay's sessions (I12): a relay silent for --takeover-timeout loses its
slots; a live one speaks well inside that bound."""

from __future__ import annotations

import pytest

from outbox.relay.config import RelayConfig
from outbox.relay.sessions import (
    KEEPALIVE_PROBES,
    client_settings,
    heartbeat_interval,
    server_settings,
)


@pytest.mark.parametrize("takeover", [1.0, 3.0, 30.0, 600.0])
def test_i12_the_server_ends_a_silent_session_within_the_takeover_timeout(takeover: float) -> None:
    settings = server_settings(takeover)
    ms = takeover * 1000
    assert float(settings["idle_session_timeout"]) == ms
    assert float(settings["idle_in_transaction_session_timeout"]) == ms
    assert float(settings["tcp_user_timeout"]) == ms
    idle, interval = int(settings["tcp_keepalives_idle"]), int(settings["tcp_keepalives_interval"])
    assert idle >= 1
    assert interval >= 1
    if takeover >= 9:  # whole seconds: below that the keepalives round up to 1 s each
        assert idle + KEEPALIVE_PROBES * interval <= takeover


@pytest.mark.parametrize("takeover", [1.0, 30.0])
def test_i12_a_live_slot_connection_speaks_several_times_per_takeover_timeout(
    takeover: float,
) -> None:
    assert heartbeat_interval(takeover) <= takeover / 3


def test_i12_client_keepalives_leave_the_dsns_own_values_alone() -> None:
    given = {"host": "db", "keepalives_idle": "7"}
    settings = client_settings(30.0, given)
    assert "keepalives_idle" not in settings
    assert settings["keepalives"] == "1"
    assert settings["tcp_user_timeout"] == "30000"


def test_i8_a_takeover_timeout_below_one_second_is_refused_naming_the_setting() -> None:
    with pytest.raises(ValueError, match=r"--takeover-timeout=0\.5 must be between 1 and 86400"):
        RelayConfig(dsn="postgresql://u@h/db", bootstrap_servers="b:9092", takeover_timeout=0.5)


@pytest.mark.parametrize("takeover", [float("nan"), float("inf"), 1e9, 86_401.0])
def test_i8_a_takeover_timeout_no_server_or_kernel_can_apply_is_refused_naming_the_setting(
    takeover: float,
) -> None:
    with pytest.raises(ValueError, match=r"--takeover-timeout=\S+ must be between 1 and 86400"):
        RelayConfig(
            dsn="postgresql://u@h/db", bootstrap_servers="b:9092", takeover_timeout=takeover
        )


def test_i12_the_longest_takeover_timeout_gives_settings_the_server_and_kernel_accept() -> None:
    settings = server_settings(86_400.0)
    assert int(settings["idle_session_timeout"]) <= 2**31 - 1  # PostgreSQL's int limit
    assert int(settings["tcp_keepalives_idle"]) <= 32_767  # Linux's TCP_KEEPIDLE limit
    assert int(client_settings(86_400.0, {})["keepalives_idle"]) <= 32_767
