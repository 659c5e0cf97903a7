"""Migration 0008 down and up again on a delivery record holding v7 and other ids."""

from __future__ import annotations

import uuid

from sqlalchemy import create_engine, text

from outbox import sql
from outbox.db import sqlalchemy_url
from outbox.event_ids import new_event_id
from outbox.migrate import upgrade
from outbox.relay import deliveries
from tests.integration.delivery_record import downgrade


def test_i2_migration_0008_goes_down_and_up_with_a_record_of_both_kinds_of_ids(
    database_url: str,
) -> None:
    v7, v4 = new_event_id(), uuid.uuid4()
    engine = create_engine(sqlalchemy_url(database_url))
    try:
        with engine.begin() as conn:
            deliveries.maintain(conn.connection.driver_connection, 7)  # type: ignore[arg-type]
            conn.execute(
                text(
                    "INSERT INTO outbox_deliveries (event_id, id, topic)"
                    " VALUES (:a, 1, 't'), (:b, 2, 't')"
                ),
                {"a": v7, "b": v4},
            )
        downgrade(database_url, "0007")
        with engine.begin() as conn:
            found = (
                conn.execute(
                    text("SELECT event_id FROM outbox_deliveries WHERE event_id IN (:a, :b)"),
                    {"a": v7, "b": v4},
                )
                .scalars()
                .all()
            )
            assert set(found) == {v7, v4}
        upgrade(database_url)
        with engine.begin() as conn:
            raw = conn.connection.driver_connection
            assert raw is not None
            rows = raw.execute(sql.TRACE_DELIVERIES, {"event_ids": [v7, v4]}).fetchall()
            assert {r[0] for r in rows} == {v7, v4}
            defs = (
                conn.execute(
                    text("SELECT indexdef FROM pg_indexes WHERE tablename = 'outbox_deliveries'")
                )
                .scalars()
                .all()
            )
            assert any("USING brin" in d for d in defs), defs
    finally:
        engine.dispose()
