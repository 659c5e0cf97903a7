"""Relays of one outbox must agree on more than the slot count (I8, I9): one with another
transactional-id prefix or state topic would neither fence the others nor read their markers,
and one with another guarantee would publish beside them without the recovery marker. Such a
relay is refused in one line naming the option."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest

from outbox.errors import ConfigError
from outbox.relay import Relay
from outbox.relay.config import Guarantee, RelayConfig
from tests.conftest import RelayHandle
from tests.support import wait_for


@pytest.mark.parametrize(
    ("other", "option"),
    [
        ({"transactional_id_prefix": "another-prefix"}, "--transactional-id-prefix"),
        ({"state_topic": "another.state-topic"}, "--state-topic"),
        ({"guarantee": Guarantee.AT_LEAST_ONCE}, "--guarantee=at-least-once"),
    ],
    ids=["prefix", "state-topic", "guarantee"],
)
def test_i9_a_relay_with_other_settings_than_the_running_one_is_refused_in_one_line(
    start_relay: Callable[..., RelayHandle],
    relay_config: Callable[..., RelayConfig],
    other: dict[str, Any],
    option: str,
) -> None:
    prefix = f"agree-{uuid.uuid4().hex[:6]}"
    handle = start_relay(slots=2, transactional_id_prefix=prefix)
    wait_for(lambda: len(handle.relay.workers) == 2, what="the first relay owns its slots")
    settings = {"slots": 2, "transactional_id_prefix": prefix, "once": True} | other
    with pytest.raises(ConfigError, match="running relay of this outbox uses another") as refused:
        Relay(relay_config(**settings)).run()
    message = str(refused.value)
    assert option in message
    assert "\n" not in message
    assert handle.thread.is_alive(), "the running relay was disturbed"
    handle.stop()


def test_i9_relays_with_the_same_settings_share_the_outbox(
    start_relay: Callable[..., RelayHandle],
) -> None:
    prefix = f"agree-{uuid.uuid4().hex[:6]}"
    a = start_relay(slots=2, transactional_id_prefix=prefix)
    b = start_relay(slots=2, transactional_id_prefix=prefix)
    wait_for(
        lambda: len(a.relay.workers) == len(b.relay.workers) == 1,
        timeout=60,
        what="the relays split the slots",
    )
