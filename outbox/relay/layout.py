"""The outbox's identity and its slot layout, as the relays of one database agree on them.

Every relay of one outbox announces, under shared advisory locks on its control session, its
slot count and the settings the others must share (transactional-id prefix, state topic,
guarantee), and refuses to run beside one that announces others (I8, I9). A changed slot
count is adopted only after the old layout's slots are settled. All through a
``ControlSession``, so each decision is tested with a scripted session.
"""

from __future__ import annotations

import logging
import threading
import uuid
import zlib
from collections.abc import Callable
from typing import NamedTuple

from confluent_kafka import KafkaException
from psycopg.errors import UndefinedTable

from outbox import sql
from outbox.errors import ConfigError, SlotLost, TransientError
from outbox.locks import (
    COUNT_NAMESPACE,
    GUARANTEE_NAMESPACE,
    GUARD_NAMESPACE,
    PREFIX_NAMESPACE,
    STATE_TOPIC_NAMESPACE,
)
from outbox.relay.config import Guarantee, RelayConfig
from outbox.relay.database import ControlSession
from outbox.relay.marker import MarkerReading, judge_marker
from outbox.relay.marker_reader import MarkerReader
from outbox.relay.worker import RelayStats

log = logging.getLogger("outbox.relay")

GUARANTEES = list(Guarantee)


class Announced(NamedTuple):
    namespace: int
    value: int
    option: str


def _lock_value(text: str) -> int:
    """A setting as an advisory lock's second key (a non-negative int4, as pg_locks shows it)."""
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


def announced_settings(prefix: str, state_topic: str, guarantee: Guarantee) -> list[Announced]:
    """What a relay announces beside its slot count, so a relay of the same outbox with other
    values is refused in one line: (lock namespace, value, the option and its value)."""
    return [
        Announced(
            PREFIX_NAMESPACE, _lock_value(prefix), f"--transactional-id-prefix (in use: {prefix})"
        ),
        Announced(STATE_TOPIC_NAMESPACE, _lock_value(state_topic), f"--state-topic={state_topic}"),
        Announced(GUARANTEE_NAMESPACE, GUARANTEES.index(guarantee), f"--guarantee={guarantee}"),
    ]


class SlotLayout:
    """This relay's view of its outbox: identity, transactional ids, the announced layout,
    and the verdict on a slot's last marker."""

    def __init__(
        self,
        config: RelayConfig,
        *,
        stats: RelayStats,
        refuse: Callable[[BaseException], None],
    ) -> None:
        """``refuse``: stop the whole relay with an error (a marker of another outbox)."""
        self.config = config
        self.stats = stats
        self.refuse = refuse
        self.outbox_id = uuid.UUID(int=0)  # read from the database when the relay starts

    def transactional_id(self, slot: int | str) -> str:
        """``<prefix>-<slot>``; the default prefix is unique to this outbox (I9)."""
        return self.config.transactional_id(slot, self.outbox_id)

    def load_identity(self, conn: ControlSession) -> uuid.UUID:
        """This outbox's identity (created by ``outbox migrate``, or here for tables made
        from ``outbox.metadata``)."""
        try:
            conn.execute(sql.ENSURE_IDENTITY)
            row = conn.execute(sql.READ_IDENTITY).fetchone()
        except UndefinedTable:
            raise ConfigError(
                "the outbox tables predate the outbox identity (table outbox_identity is "
                "missing): run `outbox migrate` first"
            ) from None
        assert row is not None
        self.outbox_id = uuid.UUID(str(row["outbox_id"]))
        return self.outbox_id

    def announce(self, conn: ControlSession, settle: Callable[[int], None]) -> bool:
        """Check and announce the slot count under one lock: of relays started together
        with different ``--slots``, only the first runs. A new layout is adopted only
        after ``settle(old slot count)`` fenced and recovered the old one's slots.
        True: this is the outbox's first relay with default transactional ids."""
        slots = self.config.slots
        params = {"namespace": COUNT_NAMESPACE, "slots": slots}
        with conn.transaction():
            conn.execute(sql.GUARD_SLOT_COUNT, {"namespace": GUARD_NAMESPACE})
            others = conn.execute(sql.OTHER_SLOT_COUNTS, params).fetchall()
            if others:
                raise ConfigError(
                    f"--slots={slots}, but a running relay uses --slots="
                    f"{others[0]['slots']}: every relay of one database must use the same slot "
                    "count (stop the others first to change it)"
                )
            conn.execute(sql.LOCK_SLOT_COUNT, params)
            self._announce_settings(conn)
            row = conn.execute(sql.READ_IDENTITY).fetchone()
            if row is not None and uuid.UUID(str(row["outbox_id"])) != self.outbox_id:
                # `outbox identity renew` ran after this relay read the identity (it is
                # serialised with this check by the same lock): the transactional ids and
                # markers of this process are the old identity's.
                raise ConfigError(
                    f"the outbox identity changed from {self.outbox_id} to {row['outbox_id']} "
                    "while this relay was starting or reconnecting (`outbox identity renew`): "
                    "start the relay again to use the new one"
                )
            before = row["slot_count"] if row else None
            first_run = before is None and self.config.transactional_id_prefix is None
            if before != slots:
                if before is not None and self.config.guarantee is Guarantee.EXACTLY_ONCE:
                    settle(int(before))
                conn.execute(sql.RECORD_SLOT_COUNT, {"slots": slots})
        return first_run

    def _announce_settings(self, conn: ControlSession) -> None:
        """Refuse to run beside a relay of this outbox with another prefix, state topic or
        guarantee (under the caller's guard lock), then announce this relay's."""
        for item in announced_settings(
            self.config.tid_prefix(self.outbox_id), self.config.state_topic, self.config.guarantee
        ):
            params = {"namespace": item.namespace, "slots": item.value}
            others = conn.execute(sql.OTHER_SLOT_COUNTS, params).fetchall()
            if others:
                theirs = ""
                if item.namespace == GUARANTEE_NAMESPACE:
                    theirs = f" (--guarantee={GUARANTEES[int(others[0]['slots'])]})"
                same = "--transactional-id-prefix, --state-topic and --guarantee"
                raise ConfigError(
                    f"{item.option}, but a running relay of this outbox uses another value"
                    f"{theirs}: every relay of one outbox must use the same {same} (stop the "
                    "others first to change them)"
                )
            conn.execute(sql.LOCK_SLOT_COUNT, params)

    def count_members(self, conn: ControlSession) -> int:
        """How many relays (this one included) announce this slot count."""
        row = conn.execute(
            sql.COUNT_RELAYS, {"namespace": COUNT_NAMESPACE, "slots": self.config.slots}
        ).fetchone()
        return max(1, int(row["n"])) if row else 1

    def shared_prefix(self, tid: str, other: uuid.UUID) -> ConfigError:
        return ConfigError(
            f"--transactional-id-prefix={self.config.transactional_id_prefix}: the "
            f"transactional id {tid} is also used by outbox {other} (this is outbox "
            f"{self.outbox_id}); two outboxes fencing each other lose events. Give each "
            "outbox its own prefix, or drop the option to use the default derived from the "
            "outbox identity. If that outbox is gone (this outbox was re-created or moved), "
            f"start once with --replaces-outbox {other}"
        )

    def refuse_a_shared_prefix(self, markers: MarkerReader, stop: threading.Event) -> None:
        """An explicit prefix another outbox uses too is refused BEFORE its transactional
        ids are fenced: the newest marker under each of them, committed or not, must not
        name another outbox."""
        if self.config.transactional_id_prefix is None:
            return
        for slot in range(self.config.slots):
            tid = self.transactional_id(slot)
            try:
                raw = markers.read(slot, tid, stop, committed=False)
            except (KafkaException, TransientError) as exc:
                log.warning("slot %d: could not check the prefix now (%s)", slot, exc)
                continue  # the slot's recovery checks it again, after fencing
            if raw is None:
                continue
            reading = judge_marker(
                raw,
                outbox_id=self.outbox_id,
                tid=tid,
                slot=slot,
                slots=self.config.slots,
                explicit_prefix=True,
                replaces=self.config.replaces_outbox,
            )
            if reading.conflict is not None:
                raise self.shared_prefix(tid, reading.conflict)

    def judge(self, raw: bytes, slot: int, tid: str, slots: int) -> MarkerReading:
        """What to do with a slot's last marker; a conflict stops the relay (I9)."""
        reading = judge_marker(
            raw,
            outbox_id=self.outbox_id,
            tid=tid,
            slot=slot,
            slots=slots,
            explicit_prefix=self.config.transactional_id_prefix is not None,
            replaces=self.config.replaces_outbox,
        )
        if reading.conflict is not None:
            exc = self.shared_prefix(tid, reading.conflict)
            self.refuse(exc)
            raise SlotLost(str(exc))
        if reading.ignored is not None and reading.expected:
            log.info("slot %d: the recovery marker under %s is %s", slot, tid, reading.ignored)
        elif reading.ignored is not None:
            self.stats.add(markers_ignored=1)
            log.warning(
                "slot %d: ignored the recovery marker under %s: %s; it deletes nothing",
                slot,
                tid,
                reading.ignored,
            )
        return reading
