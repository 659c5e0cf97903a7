"""Rows no record can be built from (written by another writer or an old table, not by
``publish()``): poison, moved aside with their reason while the rows behind them flow (I6);
the table's constraints keep new ones out; burying never trips on a reused dead-row id."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import sqlalchemy as sa
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from outbox import publish
from outbox.relay import Relay
from outbox.schema import metadata
from tests.support import KafkaReader, assert_exactly_once

CONSTRAINTS = ("outbox_events_headers_paired", "outbox_events_headers_named")

MALFORMED = {
    "unpaired": ("ARRAY['a', 'b']::text[]", "ARRAY['\\x01'::bytea]"),
    "null name": ("ARRAY[NULL, 'b']::text[]", "ARRAY['\\x01'::bytea, '\\x02'::bytea]"),
}


def _insert_raw(engine: Engine, topic: str, key: str, names: str, values: str) -> None:
    """A row as another writer (a SQL backfill, another service) would insert it."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox_events "
                "(event_id, topic, shard, key, value, header_names, header_values) "
                f"VALUES (gen_random_uuid(), :topic, 0, :key, 'raw', {names}, {values})"
            ),
            {"topic": topic, "key": key.encode()},
        )


def _publish(engine: Engine, topic: str, values: list[str]) -> list[str]:
    with Session(engine) as session, session.begin():
        return [str(publish(session, topic=topic, key="k", value=v)) for v in values]


def test_i6_rows_no_record_can_be_built_from_are_buried_and_the_rows_behind_them_flow(
    engine: Engine, topic: str, drain: Callable[..., Relay], kafka: KafkaReader
) -> None:
    with engine.begin() as conn:  # an outbox table from before the constraints
        for name in CONSTRAINTS:
            conn.execute(text(f"ALTER TABLE outbox_events DROP CONSTRAINT IF EXISTS {name}"))
    before = _publish(engine, topic, ["before"])
    for names, values in MALFORMED.values():
        _insert_raw(engine, topic, "k", names, values)
    after = _publish(engine, topic, ["after-1", "after-2"])
    relay = drain(slots=1)
    assert relay.stats.dead == 2
    with engine.connect() as conn:
        pending = conn.execute(text("SELECT count(*) FROM outbox_events")).scalar_one()
        errors = conn.execute(text("SELECT error FROM outbox_dead_events ORDER BY id")).scalars()
        reasons = list(errors)
    assert pending == 0
    assert "header_names has 2 entries but header_values 1" in reasons[0]
    assert "header_names[1] is NULL" in reasons[1]
    records = kafka.read(topic, 3)
    assert [r.value for r in records] == [b"before", b"after-1", b"after-2"]
    assert_exactly_once(records, before + after)


def test_i6_burying_a_row_whose_id_a_dead_row_of_an_older_table_has_keeps_both(
    engine: Engine, topic: str, drain: Callable[..., Relay]
) -> None:
    """After ``TRUNCATE outbox_events RESTART IDENTITY`` ids repeat, and the dead table still
    holds an older event under the id of a new poison row: both stay, the older one under a
    free id."""
    _publish(engine, topic, ["old"])
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO outbox_dead_events (id, event_id, topic, shard, key, value, "
                "header_names, header_values, created_at, error) "
                "SELECT id, event_id, topic, shard, key, value, header_names, header_values, "
                "created_at, 'an older failure' FROM outbox_events"
            )
        )
        conn.execute(text("TRUNCATE outbox_events RESTART IDENTITY"))
        old = conn.execute(text("SELECT id, event_id FROM outbox_dead_events")).one()
    [poison] = _publish(engine, topic, ["x" * 20_000])
    relay = drain(
        slots=1,
        batch_size=100,
        producer_overrides={"message.max.bytes": "10000", "request.timeout.ms": "40000"},
    )
    assert relay.stats.dead == 1
    with engine.connect() as conn:
        dead = {str(r.event_id): r for r in conn.execute(text("SELECT * FROM outbox_dead_events"))}
    assert set(dead) == {str(old.event_id), poison}
    assert dead[poison].id == old.id  # the new poison row keeps its outbox id (its order)
    assert dead[str(old.event_id)].error == "an older failure"
    assert dead[str(old.event_id)].id != old.id


@pytest.mark.parametrize("defect", sorted(MALFORMED))
def test_i6_the_migrated_table_refuses_rows_no_record_can_be_built_from(
    engine: Engine, defect: str
) -> None:
    names, values = MALFORMED[defect]
    with pytest.raises(IntegrityError, match="outbox_events_headers_"):
        _insert_raw(engine, "t", "k", names, values)


@pytest.mark.parametrize("defect", sorted(MALFORMED))
def test_i6_tables_made_from_outbox_metadata_refuse_rows_no_record_can_be_built_from(
    unmigrated_database_url: str, defect: str
) -> None:
    engine = sa.create_engine(unmigrated_database_url)
    try:
        metadata.create_all(engine)
        names, values = MALFORMED[defect]
        with pytest.raises(IntegrityError, match="outbox_events_headers_"):
            _insert_raw(engine, "t", "k", names, values)
    finally:
        engine.dispose()
