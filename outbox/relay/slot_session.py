"""The slot's database session over psycopg: every statement a slot worker runs.

The worker's connection holds the slot's advisory lock, so a lost connection is a lost slot:
every method here turns a lost connection into ``SlotLost`` and a refusal on a live one into
``DatabaseRefused`` (retried, the slot kept, I12). Supporting another PostgreSQL driver in the
relay means another class with these methods (``seams.SlotSession``).
"""

from __future__ import annotations

import contextlib
import math
import select
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import psycopg
from psycopg.rows import tuple_row

from outbox import sql
from outbox.db import redact
from outbox.errors import BatchRollback, DatabaseRefused, SlotLost
from outbox.locks import GUARD_NAMESPACE, SLOT_NAMESPACE
from outbox.relay import deliveries
from outbox.relay.fences import SlotLockState
from outbox.relay.marker import Marker, recoverable
from outbox.relay.rows import Row, from_stored_bytes


def delete_recovered(
    conn: psycopg.Connection[dict[str, Any]],
    marker: Marker,
    shards: Sequence[int],
    *,
    record: bool = False,
) -> int:
    """Delete the rows that are the marker's very events, among ``shards`` (in a transaction):
    their Kafka transaction committed, only their delete was lost (I4). Nothing else (I9).
    With ``record``, the delivery record gets them too, without partition and offset."""
    found = conn.execute(
        sql.RECOVERY_CANDIDATES, {"ids": list(marker.ids), "shards": list(shards)}
    ).fetchall()
    doomed = recoverable(marker, [(r["id"], r["event_id"]) for r in found])
    if not doomed:
        return 0
    cur = conn.execute(
        sql.DELETE_RECOVERED_AND_RECORD if record else sql.DELETE_RECOVERED,
        {"ids": [i for i, _ in doomed], "event_ids": [e for _, e in doomed]},
    )
    return cur.rowcount


def _readable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` is readable (or hung up, or no longer open) within ``timeout`` seconds.
    poll(), not select(): select() refuses a descriptor of 1024 (FD_SETSIZE) or more, which a
    relay with many slots has (each a connection and a producer's broker sockets)."""
    if not hasattr(select, "poll"):  # Windows: its select() takes any socket
        return bool(select.select([fd], [], [], timeout)[0])
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(math.ceil(timeout * 1000)))


class PsycopgSlotSession:
    """A slot worker's statements on its own psycopg connection (autocommit, dict rows)."""

    def __init__(self, conn: psycopg.Connection[dict[str, Any]]) -> None:
        self.conn = conn
        self._claims: dict[tuple[int, ...], str] = {}
        # Text as stored, decoded here: see sql.claim_batch.
        self._stored_bytes = conn.info.parameter_status("server_encoding") == "SQL_ASCII"

    @contextlib.contextmanager
    def _held(self) -> Iterator[None]:
        """If the connection is lost, so is the slot (its lock and open transaction with it)."""
        try:
            yield
        except psycopg.OperationalError as exc:
            raise SlotLost(f"database connection lost: {redact(str(exc))}") from None
        except psycopg.Error as exc:
            # A server that ends the session says why in an error of another class (an
            # idle-in-transaction timeout is an InternalError): the connection is gone all
            # the same.
            if self.conn.closed or self.conn.broken:
                raise SlotLost(f"database connection lost: {redact(str(exc))}") from None
            reason = " ".join(str(exc.diag.message_primary or exc).split())
            raise DatabaseRefused(
                f"the database refused the slot's work ({type(exc).__name__}: "
                f"{redact(reason, 300)})"
            ) from None

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """The batch's transaction; ``BatchRollback`` inside ends it quietly, without a commit.

        A connection lost at the COMMIT after a Kafka commit loses the slot; the next owner's
        recovery deletes the rows (I4). psycopg lets its ``Rollback`` out only when the
        rollback itself failed: the connection is gone, and so is the slot.
        """
        with self._held():
            try:
                with self.conn.transaction():
                    try:
                        yield
                    except BatchRollback:
                        raise psycopg.Rollback from None
            except psycopg.Rollback:
                raise SlotLost("database connection lost while rolling a batch back") from None

    def claim(
        self,
        shards: Sequence[int],
        *,
        limit: int,
        held: Sequence[str],
        max_value_bytes: int,
        max_bytes: int,
    ) -> list[Row]:
        key = tuple(shards)
        statement = self._claims.get(key) or self._claims.setdefault(
            key, sql.claim_batch(key, stored_bytes=self._stored_bytes)
        )
        params = sql.claim_params(
            limit=limit, held=held, max_value_bytes=max_value_bytes, max_bytes=max_bytes
        )
        # Binary: bytea arrives as bytes, not hex text to decode for every row.
        with self._held(), self.conn.cursor(row_factory=tuple_row, binary=True) as cur:
            cur.execute(statement, params, prepare=True)
            return list(map(from_stored_bytes if self._stored_bytes else Row._make, cur.fetchall()))

    def delete(self, ids: Sequence[int]) -> set[int]:
        with self._held(), self.conn.cursor(row_factory=tuple_row, binary=True) as cur:
            cur.execute(sql.DELETE_EVENTS, {"ids": list(ids)}, prepare=True)
            return {row[0] for row in cur.fetchall()}

    def record_deliveries(self, rows: Sequence[Row], placed: Mapping[int, tuple[int, int]]) -> None:
        """Where the batch went, in the transaction that deletes it: one statement."""
        with self._held():
            deliveries.record(self.conn, rows, placed)

    def draft_record(self, rows: Sequence[Row]) -> deliveries.Draft:
        return deliveries.draft(rows, self.conn.info.encoding)

    @contextlib.contextmanager
    def recording(
        self,
        rows: Sequence[Row],
        placed: Mapping[int, tuple[int, int]] | None,
        drafted: deliveries.Draft | None = None,
    ) -> Iterator[None]:
        """The record's INSERT, completed before the block (the Kafka commit) runs
        (``deliveries.recording``), in the batch's transaction."""
        with self._held(), deliveries.recording(self.conn, rows, placed, drafted):
            yield

    def bury(self, row_id: int, error: str) -> None:
        """Move a row to the dead table, in a transaction of its own (I6)."""
        with self._held(), self.conn.transaction():
            # A dead row of an older table (ids repeat after TRUNCATE ... RESTART IDENTITY)
            # gives its id up to this one, which keeps its order for a re-queue.
            self.conn.execute(sql.FREE_DEAD_ID, {"id": row_id})
            self.conn.execute(sql.MOVE_TO_DEAD, {"id": row_id, "error": error})

    def recover(self, marker: Marker, shards: Sequence[int], *, record: bool) -> int:
        with self._held(), self.conn.transaction():
            return delete_recovered(self.conn, marker, shards, record=record)

    def lock_state(self, slot: int, slots: int) -> SlotLockState | None:
        """What the connection says after a fence; None if it cannot tell (gone)."""
        try:
            row = self.conn.execute(
                sql.SLOT_LOCK_STATE,
                {
                    "namespace": SLOT_NAMESPACE,
                    "slot": slot,
                    "guard": GUARD_NAMESPACE,
                    "slots": slots,
                },
            ).fetchone()
        except psycopg.Error:
            return None
        if row is None:
            return None
        return SlotLockState(bool(row["holds_slot"]), bool(row["layout_changing"]))

    def heartbeat(self) -> bool:
        """One word to the server; False once the connection is gone (the worker finds out at
        its next statement)."""
        try:
            self.conn.execute(sql.HEARTBEAT)
        except psycopg.Error:
            return not (self.conn.closed or self.conn.broken)
        return True

    def wait_for_news(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the server to speak on this connection while no
        statement of the worker's is waiting for an answer; True if it did (or the connection
        is gone), for the heartbeat to find out what it said. A restarted server or a
        terminated backend sends its FATAL and closes the connection: the slot's lock is
        gone that instant, and another relay may take the slot (I3)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                if not _readable(self.conn.fileno(), left):
                    return False
                # Readable: the answer to a statement of the worker's, or the server
                # speaking unprompted. psycopg holds the connection's lock until a
                # statement's answer is read: once we hold it, anything left is unprompted.
                if not self.conn.lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                    return False
                try:
                    if _readable(self.conn.fileno(), 0):
                        return True
                finally:
                    self.conn.lock.release()
            except (OSError, ValueError, psycopg.Error):
                return True  # closed under us: the heartbeat says so
        return False

    def release(self, slot: int) -> None:
        """Give the slot's lock back and close the connection; a lost one released it."""
        with contextlib.suppress(psycopg.Error):
            if not self.conn.closed:
                self.conn.execute(sql.UNLOCK_SLOT, {"namespace": SLOT_NAMESPACE, "slot": slot})
                self.conn.close()
