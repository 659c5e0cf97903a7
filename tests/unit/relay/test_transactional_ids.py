"""I4/I9: one rule names a slot's transactional.id, wherever it is needed."""

from __future__ import annotations

import uuid

from outbox.relay.config import RelayConfig
from outbox.transactional_ids import default_prefix, prefix_of, transactional_id

IDENTITY = uuid.UUID("0123456789ab4def8000000000000000")


def test_i4_a_slots_transactional_id_is_its_prefix_and_number() -> None:
    assert transactional_id("orders-relay", 3) == "orders-relay-3"
    assert transactional_id("orders-relay", "*") == "orders-relay-*"


def test_i9_the_default_prefix_is_stable_and_unique_per_outbox() -> None:
    assert default_prefix(IDENTITY) == "outbox-0123456789ab"
    assert default_prefix(uuid.UUID(str(IDENTITY))) == default_prefix(IDENTITY)
    assert default_prefix(uuid.uuid4()) != default_prefix(IDENTITY)


def test_i9_an_explicit_prefix_wins_over_the_default() -> None:
    assert prefix_of("orders-relay", IDENTITY) == "orders-relay"
    assert prefix_of(None, IDENTITY) == default_prefix(IDENTITY)


def test_i4_the_relay_config_names_slots_by_the_same_rule() -> None:
    config = RelayConfig(dsn="postgresql://relay@db/app", bootstrap_servers="broker:9092")
    for slot in (0, 31):
        assert config.transactional_id(slot, IDENTITY) == transactional_id(
            default_prefix(IDENTITY), slot
        )
