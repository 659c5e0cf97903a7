"""Proof of delivery for operators: where one event went (``outbox trace``).

Read once into plain data (``read_trace``), then printed as JSON or rendered (pure), like
``outbox.cli.views``. The consumer groups come from their dedup records; a group's dead letter
is found under the id the consumer publishes it with (``consumer.deadletter``).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from consumer.deadletter import dead_letter_id
from outbox import sql
from outbox.cli.views import _session, to_json
from outbox.errors import ConfigError

Row = dict[str, Any]

__all__ = ["event_state", "read_trace", "render_trace", "to_json"]


def parse_event_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ConfigError(
            f"EVENT_ID {raw!r} is not a UUID: give the event id publish() returned "
            "(the record's outbox-event-id header)"
        ) from None


def event_state(pending: Row | None, dead: Row | None, deliveries: Sequence[Row]) -> str:
    """pending, dead, published or unknown: what the outbox knows of the event now. A row
    still pending wins over an older delivery (an event id reused after its publication)."""
    if pending is not None:
        return "pending"
    if dead is not None:
        return "dead"
    if deliveries:
        return "published"
    return "unknown"


def _iso(value: object) -> object:
    return value.isoformat() if hasattr(value, "isoformat") else value


def read_trace(db: str, event_id: uuid.UUID) -> Row:
    """Everything the database knows of one event, as plain data."""
    with _session(db, "outbox-trace") as conn:
        params = {"event_id": event_id}
        pending = conn.execute(sql.TRACE_PENDING, params).fetchone()
        dead = conn.execute(sql.TRACE_DEAD, params).fetchone()
        applied = conn.execute(sql.TRACE_APPLIED, {"event_id": str(event_id)}).fetchall()
        letters = {
            str(r["group_id"]): dead_letter_id(str(r["group_id"]), str(event_id)) for r in applied
        }
        found = conn.execute(
            sql.TRACE_DELIVERIES, {"event_ids": [event_id, *letters.values()]}
        ).fetchall()
        pending_letters = {
            g: conn.execute(sql.TRACE_PENDING, {"event_id": i}).fetchone() is not None
            for g, i in letters.items()
        }
    deliveries = [dict(r) for r in found if r["event_id"] == event_id]
    published_letters = {r["event_id"] for r in found if r["event_id"] != event_id}
    groups = []
    for r in applied:
        group = str(r["group_id"])
        letter = letters[group]
        state = (
            "pending"
            if pending_letters[group]
            else "published"
            if letter in published_letters
            else None
        )
        groups.append(
            {
                "group": group,
                "applied_at": _iso(r["processed_at"]),
                "dead_letter": None if state is None else {"event_id": str(letter), "state": state},
            }
        )
    return {
        "event_id": str(event_id),
        "state": event_state(pending, dead, deliveries),
        "pending": None
        if pending is None
        else {
            "outbox_id": pending["id"],
            "topic": pending["topic"],
            "created_at": _iso(pending["created_at"]),
            "dead_attempts": pending["dead_attempts"],
        },
        "dead": None
        if dead is None
        else {
            "outbox_id": dead["id"],
            "topic": dead["topic"],
            "error": dead["error"],
            "attempts": dead["attempts"],
            "failed_at": _iso(dead["failed_at"]),
        },
        "deliveries": [
            {
                "outbox_id": d["id"],
                "topic": d["topic"],
                "partition": d["partition"],
                "offset": d["kafka_offset"],
                "published_at": _iso(d["published_at"]),
            }
            for d in deliveries
        ],
        "groups": groups,
    }


def render_trace(trace: Row) -> str:
    """A few lines an operator reads at a glance."""
    lines = [f"event {trace['event_id']}: {trace['state']}"]
    if (p := trace["pending"]) is not None:
        lines.append(
            f"  pending in the outbox since {p['created_at']} (topic {p['topic']!r}, "
            f"outbox id {p['outbox_id']})"
        )
    if (d := trace["dead"]) is not None:
        lines.append(
            f"  dead since {d['failed_at']} after {d['attempts']} tries (topic {d['topic']!r}, "
            f"`outbox dead show {d['outbox_id']}`): {d['error']}"
        )
    for r in trace["deliveries"]:
        place = (
            f"partition {r['partition']} offset {r['offset']}"
            if r["partition"] is not None
            else "partition and offset unknown (recovered from a marker)"
        )
        lines.append(f"  published {r['published_at']} to {r['topic']!r} {place}")
    if trace["state"] == "unknown":
        lines.append(
            "  not in the outbox, not dead, not in the delivery record (older than its "
            "retention, published with the record off, or never published here)"
        )
    if not trace["groups"]:
        lines.append("  applied by no consumer group (within their dedup windows)")
    for g in trace["groups"]:
        letter = g["dead_letter"]
        dead = f"; dead-lettered ({letter['state']}, event {letter['event_id']})" if letter else ""
        lines.append(f"  applied by group {g['group']!r} at {g['applied_at']}{dead}")
    return "\n".join(lines) + "\n"
