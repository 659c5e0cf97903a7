"""Operator views: what is pending, who owns which slot, what was moved aside.

Each view is read once into plain data (``read_*``), then either printed as JSON
or rendered as a table (``render_*``, pure), so ``--json`` and the tables never
disagree. Tables fit the terminal (80 columns when there is none).
"""

from __future__ import annotations

import base64
import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime
from io import StringIO
from itertools import zip_longest
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table

from outbox import sql
from outbox.codec import BINARY, CONTENT_TYPE_HEADER, JSON
from outbox.db import connect, show_stored_text
from outbox.errors import ConfigError, NotFound, NotMigrated
from outbox.locks import COUNT_NAMESPACE, GUARD_NAMESPACE, SLOT_NAMESPACE
from outbox.transactional_ids import default_prefix

Row = dict[str, Any]


@contextmanager
def _session(db: str, name: str) -> Iterator[psycopg.Connection[dict[str, object]]]:
    """A connection whose missing-table errors say to run ``outbox migrate``, and which shows
    text a SQL_ASCII database holds that is not UTF-8 (``show_stored_text``)."""
    with connect(db, application_name=name) as conn:
        show_stored_text(conn)
        try:
            yield conn
        except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
            raise NotMigrated(str(exc).splitlines()[0]) from None
        except psycopg.errors.InsufficientPrivilege as exc:
            raise ConfigError(
                f"{str(exc).splitlines()[0]}: grant the --db user SELECT on the outbox's "
                "tables (a grant made before `outbox migrate` does not cover the tables it "
                "added, such as outbox_deliveries)"
            ) from None


def _width() -> int:
    return shutil.get_terminal_size((80, 24)).columns


def _render(*tables: Table) -> str:
    buf = StringIO()
    # markup=False: topics and errors come from rows any writer made ("a[/b]" is no tag).
    console = Console(file=buf, width=_width(), color_system=None, markup=False)
    for table in tables:
        console.print(table)
    return buf.getvalue()


def to_json(data: object) -> str:
    """Stable, indented JSON for scripts (datetimes as ISO 8601)."""
    return json.dumps(data, indent=2, default=str)


def _iso(value: object) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else None


def check_schema(db: str) -> None:
    """Raise NotMigrated when the outbox tables are missing (before a daemon starts)."""
    with _session(db, "outbox-check") as conn:
        conn.execute(sql.CHECK_SCHEMA)


# -- status ------------------------------------------------------------------------------


def read_status(db: str) -> Row:
    """Pending rows per topic, slot owners and the dead-row count, as plain data."""
    with _session(db, "outbox-status") as conn:
        pending = conn.execute(sql.PENDING_BY_TOPIC).fetchall()
        owners = conn.execute(sql.SLOT_OWNERS, {"namespace": SLOT_NAMESPACE}).fetchall()
        dead = conn.execute(sql.COUNT_DEAD).fetchone()
        identity = conn.execute(sql.READ_IDENTITY).fetchone()
    topics: list[Row] = [
        {
            "topic": str(r["topic"]),
            "pending": int(str(r["pending"])),
            "oldest_age_s": round(float(str(r["oldest_age_s"])), 3),
        }
        for r in pending
    ]
    outbox_id = str(identity["outbox_id"]) if identity is not None else None
    return {
        "outbox_id": outbox_id,
        "default_transactional_id_prefix": (
            default_prefix(uuid.UUID(outbox_id)) if outbox_id is not None else None
        ),
        "slot_count": identity["slot_count"] if identity is not None else None,
        "pending": topics,
        "pending_total": sum(int(t["pending"]) for t in topics),
        "oldest_age_s": max((float(t["oldest_age_s"]) for t in topics), default=0.0),
        "slots": [
            {
                "slot": r["slot"],
                "backend_pid": r["pid"],
                "relay": r["application_name"],
                "client": r["client_addr"] or "local",
                "since": _iso(r["backend_start"]),
            }
            for r in owners
        ],
        "dead_rows": int(str(dead["n"])) if dead else 0,
    }


def status_problems(report: Row, *, max_lag: float | None) -> list[str]:
    """What ``status --check`` fails on: dead rows, and pending rows older than ``max_lag``."""
    problems = []
    if report["dead_rows"]:
        problems.append(
            f"{report['dead_rows']} dead rows: see `outbox dead list`, then requeue or discard them"
        )
    if max_lag is not None and report["oldest_age_s"] > max_lag:
        problems.append(
            f"the oldest pending event is {report['oldest_age_s']:.1f} s old, above "
            f"--max-lag {max_lag:g}: is a relay running and reaching Kafka?"
        )
    return problems


def status_line(report: Row) -> str:
    """``status --check`` when nothing is wrong: one line for cron mail and probe logs."""
    return (
        f"ok: {report['pending_total']} pending (oldest {report['oldest_age_s']:.1f} s), "
        f"{report['dead_rows']} dead rows, {len(report['slots'])} slots held"
    )


def render_status(report: Row) -> str:
    t0 = Table(title="outbox identity", show_header=False)
    t0.add_column("field", no_wrap=True)
    t0.add_column("value", no_wrap=True)
    if report["outbox_id"] is None:  # tables from outbox.metadata: the first relay creates it
        t0.add_row("outbox id", "none yet: `outbox migrate` or the first relay creates it")
    else:
        slots = report["slot_count"]
        t0.add_row("outbox id", report["outbox_id"])
        t0.add_row("default transactional.id prefix", report["default_transactional_id_prefix"])
        t0.add_row("slot layout", f"{slots} slots" if slots else "no relay yet")
    t1 = Table(title="pending events")
    for col in ("topic", "pending", "oldest age (s)"):
        t1.add_column(col, overflow="fold")
    for t in report["pending"]:
        t1.add_row(t["topic"], str(t["pending"]), f"{t['oldest_age_s']:.1f}")
    t2 = Table(title="slots")
    for col in ("slot", "backend pid", "relay", "client", "since"):
        t2.add_column(col, overflow="fold")
    for s in report["slots"]:
        t2.add_row(str(s["slot"]), str(s["backend_pid"]), s["relay"], s["client"], s["since"])
    t3 = Table(title="dead rows")
    t3.add_column("count")
    t3.add_row(str(report["dead_rows"]))
    return _render(t0, t1, t2, t3)


# -- dead rows ---------------------------------------------------------------------------


def read_dead(db: str, limit: int) -> list[Row]:
    with _session(db, "outbox-dead") as conn:
        rows = conn.execute(sql.LIST_DEAD, {"limit": limit}).fetchall()
    return [
        {
            "id": r["id"],
            "event_id": str(r["event_id"]),
            "topic": r["topic"],
            "value_bytes": r["value_bytes"],
            "attempts": r["attempts"],
            "failed_at": _iso(r["failed_at"]),
            "error": r["error"],
        }
        for r in rows
    ]


def render_dead(rows: list[Row]) -> str:
    """One row per dead event, the error wrapped so the table fits 80 columns."""
    table = Table(title="dead rows (outbox dead show ID for one whole)")
    table.add_column("id", no_wrap=True)
    table.add_column("topic", overflow="fold", max_width=24)
    table.add_column("bytes", justify="right", no_wrap=True)
    table.add_column("tries", justify="right", no_wrap=True)
    table.add_column("failed at (UTC)", no_wrap=True)
    table.add_column("error", overflow="fold", ratio=1)
    for r in rows:
        failed = str(r["failed_at"] or "")[:19].replace("T", " ")
        table.add_row(
            str(r["id"]), r["topic"], str(r["value_bytes"]), str(r["attempts"]), failed, r["error"]
        )
    return _render(table)


def _bytes_field(raw: bytes | None, content_type: str | None) -> Row:
    """Bytes shown as text when they are UTF-8 (JSON pretty-printed), else base64."""
    if raw is None:
        return {"encoding": None, "data": None}
    if content_type != BINARY:
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            pass
        else:
            if content_type == JSON:
                with suppress(ValueError):  # labelled JSON but not JSON: shown as it is
                    text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
            return {"encoding": "utf-8", "data": text}
    return {"encoding": "base64", "data": base64.b64encode(raw).decode()}


SHOW_CHARS = 4096
"""How much of a dead row's value (and of each header and key) ``outbox dead show`` prints
without ``--full``: enough to recognise it, not a 2 MB value on the terminal."""


def _shown(field: Row, size: int | None, *, full: bool) -> Row:
    """``field`` with its data cut at ``SHOW_CHARS`` unless ``full``; says whether it was."""
    data = field["data"]
    cut = not full and isinstance(data, str) and len(data) > SHOW_CHARS
    return {**field, "data": data[:SHOW_CHARS] if cut else data, "bytes": size, "cut": cut}


def read_dead_row(db: str, row_id: int, *, full: bool = False) -> Row:
    with _session(db, "outbox-dead") as conn:
        r = conn.execute(sql.SHOW_DEAD, {"id": row_id}).fetchone()
    if r is None:
        raise NotFound(f"no dead row with id {row_id}: `outbox dead list` shows the ids")
    # A dead row may be one no record could be built from (unpaired header arrays, a NULL
    # name or value, a multidimensional array, a content type that is not UTF-8): show it as
    # it is, never fail on it.
    names: list[object] = list(r["header_names"] or [])  # type: ignore[call-overload]
    values: list[object] = list(r["header_values"] or [])  # type: ignore[call-overload]
    pairs = list(zip_longest(names, values))
    headers = {
        n if n is None or isinstance(n, str) else str(n): _header_data(v, full=full)
        for n, v in pairs
    }
    content_type = next(
        (
            raw.decode(errors="replace")
            for n, v in pairs
            if n == CONTENT_TYPE_HEADER and (raw := _raw(v))
        ),
        None,
    )
    value, key = r["value"], r["key"]
    value_bytes = bytes(value) if isinstance(value, bytes | memoryview) else None
    key_bytes = bytes(key) if isinstance(key, bytes | memoryview) else None
    return {
        "id": r["id"],
        "event_id": str(r["event_id"]),
        "topic": r["topic"],
        "shard": r["shard"],
        "key": _shown(_bytes_field(key_bytes, None), _size(key_bytes), full=full),
        "headers": headers,
        "value": _shown(_bytes_field(value_bytes, content_type), _size(value_bytes), full=full),
        "created_at": _iso(r["created_at"]),
        "failed_at": _iso(r["failed_at"]),
        "attempts": r["attempts"],
        "error": r["error"],
    }


def _header_data(value: object, *, full: bool) -> object:
    """A header value as shown; a multidimensional array's sub-array as a list of them."""
    if isinstance(value, list):
        return [_header_data(v, full=full) for v in value]
    raw = _raw(value)
    return _shown(_bytes_field(raw, None), _size(raw), full=full)["data"]


def _raw(value: object) -> bytes | None:
    """A bytea cell as bytes (NULL stays None)."""
    return bytes(value) if isinstance(value, bytes | memoryview) else None


def _size(raw: bytes | None) -> int | None:
    return None if raw is None else len(raw)


def render_dead_row(row: Row) -> str:
    lines = [f"{name}: {row[name]}" for name in ("id", "event_id", "topic", "shard")]
    lines.append(f"key ({row['key']['encoding']}): {row['key']['data']}")
    lines += [f"header {n}: {v}" for n, v in row["headers"].items()]
    lines += [f"{name}: {row[name]}" for name in ("created_at", "failed_at", "attempts")]
    lines.append(f"error: {row['error']}")
    value = row["value"]
    lines.append(f"value ({value['encoding']}, {value['bytes']} bytes):")
    lines.append(str(value["data"]))
    cut = [name for name in ("key", "value") if row[name]["cut"]]
    if cut or any(len(str(v)) >= SHOW_CHARS for v in row["headers"].values()):
        lines.append(
            f"... cut at {SHOW_CHARS} characters: `outbox dead show {row['id']} --full` "
            "prints all of it"
        )
    return "\n".join(lines)


def _locked(conn: psycopg.Connection[dict[str, object]], ids: list[int]) -> None:
    """Lock the named dead rows; NotFound (and nothing done) if any of them is missing."""
    found = {r["id"] for r in conn.execute(sql.LOCK_DEAD, {"ids": ids}).fetchall()}
    missing = sorted(set(ids) - found)
    if missing:
        raise NotFound(
            f"no dead row with id {', '.join(map(str, missing))}: nothing was changed; "
            "`outbox dead list` shows the ids"
        )


# A row buried because no record can be built from it (I6): the table's constraints refuse
# it back as it is (its DETAIL, the row's data, is not shown), or cannot even be checked on a
# multidimensional header_names array (FeatureNotSupported).
_UNBUILDABLE = (
    sql.UNBUILDABLE_DEAD,
    "the outbox table refuses them",
    ": no Kafka record can be built from them",
    "fix their header_names/header_values with SQL",
)

_REFUSED_REQUEUE: dict[type[Exception], tuple[str, str, str, str]] = {
    psycopg.errors.CheckViolation: _UNBUILDABLE,
    psycopg.errors.FeatureNotSupported: _UNBUILDABLE,
    # A dead row keeps its id (its order); after TRUNCATE ... RESTART IDENTITY a new row may
    # have it, or the event was published again under its event id.
    psycopg.errors.UniqueViolation: (
        sql.CLASHING_DEAD,
        "rows in the outbox have their id or event id",
        "",
        "let the relay publish those first",
    ),
}
"""Why the outbox refused dead rows back: the query naming them, the cause, a note after the
constraint's name, the fix."""


def requeue(db: str, ids: list[int], *, all_rows: bool) -> int:
    """Put dead rows back in the outbox, all of the named ones or none."""
    with _session(db, "outbox-requeue") as conn:
        try:
            with conn.transaction():
                if not all_rows:
                    _locked(conn, ids)
                params = {"all": all_rows, "ids": ids}
                moved = len(conn.execute(sql.REQUEUE_DEAD, params).fetchall())
        except (
            psycopg.errors.CheckViolation,
            psycopg.errors.FeatureNotSupported,
            psycopg.errors.UniqueViolation,
        ) as exc:
            query, why, note, fix = _REFUSED_REQUEUE[type(exc)]
            bad = [r["id"] for r in conn.execute(query, params).fetchall()]
            named = " ".join(map(str, bad)) or "ID"
            constraint = exc.diag.constraint_name or "header_names is multidimensional"
            raise ConfigError(
                f"dead rows {named} cannot be re-queued: {why} ({constraint}"
                f"{note}); {fix}, or `outbox dead discard {named}`"
            ) from None
        if moved:
            conn.execute(sql.WAKE_ALL_SLOTS)  # a relay publishes them now, not at its next poll
        return moved


def discard(db: str, ids: list[int]) -> int:
    """Delete dead rows for good, all of the named ones or none."""
    with _session(db, "outbox-discard") as conn, conn.transaction():
        _locked(conn, ids)
        return len(conn.execute(sql.DISCARD_DEAD, {"ids": ids}).fetchall())


def renew_identity(db: str) -> tuple[str, str]:
    """Give this database a new outbox identity (a copy's fix, I9): (old id, new id).

    Refused while a relay of this database runs: it would keep the old transactional ids
    until it restarts, and go on fencing the original's relays."""
    with _session(db, "outbox-identity") as conn, conn.transaction():
        # The relays' start-up lock: a relay that read the old identity and starts (or
        # reconnects) after this commits sees the change there and stops, naming it.
        conn.execute(sql.GUARD_SLOT_COUNT, {"namespace": GUARD_NAMESPACE})
        old = conn.execute(sql.READ_IDENTITY).fetchone()  # the lock serialises renews too
        if old is None:
            raise NotMigrated("the outbox has no identity row yet: run `outbox migrate` first")
        live = conn.execute(
            sql.LIVE_RELAYS,
            {"slot_namespace": SLOT_NAMESPACE, "count_namespace": COUNT_NAMESPACE},
        ).fetchone()
        running = int(str(live["n"])) if live is not None else 0
        if running:
            raise ConfigError(
                f"relays of this database are running ({running} connections hold slot "
                "locks): stop them first, with SIGTERM so that no batch is left in flight (a "
                "running relay keeps the old transactional ids until it restarts), then run "
                "`outbox identity renew` again"
            )
        new = conn.execute(sql.RENEW_IDENTITY).fetchone()
        assert new is not None
        return str(old["outbox_id"]), str(new["outbox_id"])
