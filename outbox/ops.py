"""Operator views: what is pending, who owns which slot, what was moved aside."""

from __future__ import annotations

import shutil
import uuid
from io import StringIO

from rich.console import Console
from rich.table import Table

from outbox import sql
from outbox.config import default_tid_prefix
from outbox.db import connect
from outbox.relay import SLOT_NAMESPACE


def _render(*tables: Table) -> str:
    buf = StringIO()
    width = max(160, shutil.get_terminal_size((160, 24)).columns)
    console = Console(file=buf, width=width, color_system=None)
    for table in tables:
        console.print(table)
    return buf.getvalue()


def render_status(db: str) -> str:
    with connect(db, application_name="outbox-status") as conn:
        pending = conn.execute(sql.PENDING_BY_TOPIC).fetchall()
        owners = conn.execute(sql.SLOT_OWNERS, {"namespace": SLOT_NAMESPACE}).fetchall()
        dead = conn.execute("SELECT count(*) AS n FROM outbox_dead_events").fetchone()
        identity = conn.execute(sql.READ_IDENTITY).fetchone()
    t0 = Table(title="outbox identity")
    for col in ("outbox id", "default transactional.id prefix", "slot layout"):
        t0.add_column(col, no_wrap=True)
    if identity is None:  # tables from outbox.metadata: the first relay creates it
        t0.add_row("(none yet: created by `outbox migrate` or the first relay)", "", "")
    else:
        t0.add_row(
            str(identity["outbox_id"]),
            default_tid_prefix(uuid.UUID(str(identity["outbox_id"]))),
            f"{identity['slot_count']} slots" if identity["slot_count"] else "(no relay yet)",
        )
    t1 = Table(title="pending events")
    for col in ("topic", "pending", "oldest age (s)"):
        t1.add_column(col)
    for r in pending:
        t1.add_row(str(r["topic"]), str(r["pending"]), f"{r['oldest_age_s']:.1f}")
    t2 = Table(title="slots")
    for col in ("slot", "backend pid", "relay", "client", "since"):
        t2.add_column(col)
    for r in owners:
        t2.add_row(
            str(r["slot"]),
            str(r["pid"]),
            str(r["application_name"]),
            str(r["client_addr"] or "local"),
            str(r["backend_start"]),
        )
    t3 = Table(title="dead rows")
    t3.add_column("count")
    t3.add_row(str(dead["n"] if dead else 0))
    return _render(t0, t1, t2, t3)


def render_dead(db: str, limit: int) -> str:
    with connect(db, application_name="outbox-dead") as conn:
        rows = conn.execute(sql.LIST_DEAD, {"limit": limit}).fetchall()
    table = Table(title="dead rows (outbox_dead_events)")
    for col in ("id", "event id", "topic", "value bytes", "attempts", "failed at"):
        table.add_column(col, no_wrap=True)
    table.add_column("error", overflow="fold")
    for r in rows:
        table.add_row(
            str(r["id"]),
            str(r["event_id"]),
            str(r["topic"]),
            str(r["value_bytes"]),
            str(r["attempts"]),
            str(r["failed_at"]),
            str(r["error"]),
        )
    return _render(table)


def requeue(db: str, ids: list[int], *, all_rows: bool) -> int:
    with connect(db, application_name="outbox-requeue") as conn:
        moved = len(conn.execute(sql.REQUEUE_DEAD, {"all": all_rows, "ids": ids}).fetchall())
        if moved:
            conn.execute(sql.WAKE_ALL_SLOTS)  # a relay publishes them now, not at its next poll
        return moved
