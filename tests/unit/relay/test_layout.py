"""The outbox identity and the slot layout the relays of one outbox agree on (I8, I9).

A scripted ``ControlSession`` answers the named statements of ``outbox.sql`` (what other
relays announce, the identity row, the member count); a scripted ``MarkerReader`` answers
marker reads. The advisory locks themselves are covered by the integration tests.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from psycopg.errors import UndefinedTable

from outbox import sql
from outbox.errors import ConfigError, SlotLost, TransientError
from outbox.locks import (
    COUNT_NAMESPACE,
    GUARANTEE_NAMESPACE,
    PREFIX_NAMESPACE,
    STATE_TOPIC_NAMESPACE,
)
from outbox.relay.config import Guarantee, RelayConfig
from outbox.relay.layout import GUARANTEES, SlotLayout
from outbox.relay.marker import Marker
from outbox.relay.worker import GUARD_NAMESPACE, RelayStats

OUTBOX = uuid.UUID("00000000-0000-4000-8000-000000000001")
OTHER = uuid.UUID("00000000-0000-4000-8000-000000000002")


@dataclass
class Rows:
    rows: list[dict[str, Any]]

    def fetchone(self) -> dict[str, Any] | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[dict[str, Any]]:
        return self.rows


@dataclass
class Session:
    """The control session: ``others`` maps a lock namespace to what other relays announce."""

    identity: dict[str, Any] | None = field(
        default_factory=lambda: {"outbox_id": OUTBOX, "slot_count": 4}
    )
    others: dict[int, list[int]] = field(default_factory=dict)
    members: int = 1
    migrated: bool = True
    executed: list[tuple[str, Mapping[str, Any] | None, bool]] = field(default_factory=list)
    in_transaction: bool = False

    def execute(self, query: Any, params: Mapping[str, Any] | None = None, /) -> Rows:
        self.executed.append((query, params, self.in_transaction))
        if query == sql.ENSURE_IDENTITY and not self.migrated:
            raise UndefinedTable('relation "outbox_identity" does not exist')
        if query == sql.READ_IDENTITY:
            return Rows([self.identity] if self.identity else [])
        if query == sql.OTHER_SLOT_COUNTS:
            assert params is not None
            return Rows([{"slots": v} for v in self.others.get(params["namespace"], [])])
        if query == sql.COUNT_RELAYS:
            return Rows([{"n": self.members}])
        return Rows([])

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.in_transaction = True
        try:
            yield
        finally:
            self.in_transaction = False

    def ran(self, query: str) -> list[Mapping[str, Any] | None]:
        return [params for q, params, _ in self.executed if q == query]


def _config(**overrides: Any) -> RelayConfig:
    fields: dict[str, Any] = {"dsn": "postgresql://h/db", "bootstrap_servers": "k", "slots": 4}
    return RelayConfig(**(fields | overrides))


@dataclass
class Layout:
    layout: SlotLayout
    refused: list[BaseException]
    stats: RelayStats


def _layout(**overrides: Any) -> Layout:
    refused: list[BaseException] = []
    stats = RelayStats()
    layout = SlotLayout(_config(**overrides), stats=stats, refuse=refused.append)
    layout.outbox_id = OUTBOX
    return Layout(layout, refused, stats)


def _announce(layout: SlotLayout, session: Session) -> tuple[bool, list[int]]:
    settled: list[int] = []
    first_run = layout.announce(session, settle=settled.append)
    return first_run, settled


# -- identity ------------------------------------------------------------------------------


def test_i9_the_identity_is_read_from_the_database_and_names_the_transactional_ids() -> None:
    layout = SlotLayout(_config(), stats=RelayStats(), refuse=lambda exc: None)
    session = Session()
    assert layout.load_identity(session) == OUTBOX
    assert session.ran(sql.ENSURE_IDENTITY), "an outbox made from outbox.metadata has no row"
    assert layout.transactional_id(3) == f"outbox-{OUTBOX.hex[:12]}-3"


def test_i8_tables_older_than_the_identity_stop_the_relay_naming_outbox_migrate() -> None:
    layout = _layout().layout
    with pytest.raises(ConfigError, match="run `outbox migrate` first"):
        layout.load_identity(Session(migrated=False))


def test_i9_an_identity_renewed_after_it_was_read_stops_the_relay() -> None:
    session = Session(identity={"outbox_id": OTHER, "slot_count": 4})
    with pytest.raises(ConfigError, match=f"identity changed from {OUTBOX} to {OTHER}"):
        _announce(_layout().layout, session)
    assert not session.ran(sql.RECORD_SLOT_COUNT)


# -- the announced layout ------------------------------------------------------------------


def test_i8_a_relay_with_another_slot_count_is_refused_naming_both() -> None:
    session = Session(others={COUNT_NAMESPACE: [8]})
    with pytest.raises(ConfigError, match="--slots=4, but a running relay uses --slots=8"):
        _announce(_layout().layout, session)
    assert not session.ran(sql.LOCK_SLOT_COUNT), "announced beside another slot count"


@pytest.mark.parametrize(
    ("namespace", "option"),
    [
        (PREFIX_NAMESPACE, "--transactional-id-prefix \\(in use: outbox-"),
        (STATE_TOPIC_NAMESPACE, "--state-topic=outbox.relay-state"),
        (GUARANTEE_NAMESPACE, "--guarantee=exactly-once, .* \\(--guarantee=at-least-once\\)"),
    ],
)
def test_i9_a_relay_of_this_outbox_with_another_shared_setting_is_refused(
    namespace: int, option: str
) -> None:
    others = {namespace: [GUARANTEES.index(Guarantee.AT_LEAST_ONCE)]}
    with pytest.raises(ConfigError, match=f"{option}.*must use the same"):
        _announce(_layout().layout, Session(others=others))


def test_i9_the_count_and_shared_settings_are_announced_under_the_guard_lock() -> None:
    session = Session()
    _announce(_layout().layout, session)
    guard = session.executed[0]
    assert guard[0] == sql.GUARD_SLOT_COUNT
    assert guard[1] == {"namespace": GUARD_NAMESPACE}
    locks = [(q, p, tx) for q, p, tx in session.executed if q == sql.LOCK_SLOT_COUNT]
    namespaces = [p["namespace"] for _, p, _ in locks if p is not None]
    assert namespaces == [
        COUNT_NAMESPACE,
        PREFIX_NAMESPACE,
        STATE_TOPIC_NAMESPACE,
        GUARANTEE_NAMESPACE,
    ]
    assert all(tx for _, _, tx in session.executed), "a statement outside the guard's transaction"


@pytest.mark.parametrize(
    ("recorded", "prefix", "first_run"),
    [
        (None, None, True),  # a new outbox, default ids: no marker can exist but its own
        (None, "team-a", False),  # an explicit prefix may carry another outbox's markers
        (4, None, False),  # relays ran before: their markers must be read
    ],
)
def test_i4_only_a_new_outboxs_relay_with_default_ids_skips_reading_markers(
    recorded: int | None, prefix: str | None, first_run: bool
) -> None:
    session = Session(identity={"outbox_id": OUTBOX, "slot_count": recorded})
    assert _announce(_layout(transactional_id_prefix=prefix).layout, session)[0] is first_run


@pytest.mark.parametrize(
    ("recorded", "guarantee", "settled", "records"),
    [
        (4, Guarantee.EXACTLY_ONCE, [], False),  # the same layout: nothing to settle
        (2, Guarantee.EXACTLY_ONCE, [2], True),  # changed: the old slots first, then record
        (None, Guarantee.EXACTLY_ONCE, [], True),  # the first layout: nothing before it
        (2, Guarantee.AT_LEAST_ONCE, [], True),  # no markers, no transactions to settle
    ],
)
def test_i4_a_changed_slot_count_is_recorded_only_after_the_old_layout_is_settled(
    recorded: int | None, guarantee: Guarantee, settled: list[int], records: bool
) -> None:
    session = Session(identity={"outbox_id": OUTBOX, "slot_count": recorded})
    calls: list[str] = []

    def settle(before: int) -> None:
        assert not session.ran(sql.RECORD_SLOT_COUNT), "recorded before the old layout settled"
        calls.append(f"settle {before}")

    _layout(guarantee=guarantee).layout.announce(session, settle=settle)
    assert calls == [f"settle {n}" for n in settled]
    assert session.ran(sql.RECORD_SLOT_COUNT) == ([{"slots": 4}] if records else [])


def test_i8_a_layout_that_cannot_be_settled_is_not_recorded() -> None:
    session = Session(identity={"outbox_id": OUTBOX, "slot_count": 2})

    def settle(before: int) -> None:
        raise TransientError("Kafka is away")

    with pytest.raises(TransientError):
        _layout().layout.announce(session, settle=settle)
    assert not session.ran(sql.RECORD_SLOT_COUNT)


@pytest.mark.parametrize(("counted", "members"), [(0, 1), (1, 1), (3, 3)])
def test_i3_the_members_counted_include_this_relay(counted: int, members: int) -> None:
    session = Session(members=counted)
    assert _layout().layout.count_members(session) == members
    assert session.ran(sql.COUNT_RELAYS) == [{"namespace": COUNT_NAMESPACE, "slots": 4}]


# -- a slot's last marker ------------------------------------------------------------------


def _marker(outbox: uuid.UUID, tid: str, slot: int = 0, slots: int = 4) -> bytes:
    return Marker.of_batch(outbox, tid, slot, slots, [(1, uuid.uuid4())]).encode()


@dataclass
class Markers:
    """A scripted marker reader: slot -> the raw marker (an exception: the read fails)."""

    found: dict[int, bytes | Exception]
    reads: list[tuple[int, str, bool]] = field(default_factory=list)

    def read(
        self,
        slot: int,
        tid: str,
        interrupt: threading.Event,
        *,
        committed: bool = True,
        since: int = 0,
    ) -> bytes | None:
        self.reads.append((slot, tid, committed))
        found = self.found.get(slot)
        if isinstance(found, Exception):
            raise found
        return found

    def ends(self, partitions: int) -> dict[int, int]:
        return dict.fromkeys(range(partitions), 0)

    def close(self) -> None:
        pass


def test_i9_an_explicit_prefix_another_outbox_uses_is_refused_before_any_fence() -> None:
    layout = _layout(transactional_id_prefix="shared").layout
    markers = Markers({0: TransientError("busy"), 2: _marker(OTHER, "shared-2", slot=2)})
    with pytest.raises(ConfigError, match=f"also used by outbox {OTHER}.*--replaces-outbox"):
        layout.refuse_a_shared_prefix(markers, threading.Event())
    assert [r[:2] for r in markers.reads] == [(0, "shared-0"), (1, "shared-1"), (2, "shared-2")]
    assert not any(committed for *_, committed in markers.reads), "open transactions unseen"


def test_i9_an_explicit_prefix_is_not_refused_for_a_replaced_outbox() -> None:
    layout = _layout(transactional_id_prefix="shared", replaces_outbox=OTHER).layout
    layout.refuse_a_shared_prefix(Markers({1: _marker(OTHER, "shared-1", 1)}), threading.Event())


def test_i9_the_default_prefix_is_unique_to_the_outbox_and_needs_no_check() -> None:
    markers = Markers({})
    _layout(transactional_id_prefix=None).layout.refuse_a_shared_prefix(markers, threading.Event())
    assert markers.reads == []


def test_i9_another_outboxs_marker_under_an_explicit_prefix_stops_the_relay() -> None:
    made = _layout(transactional_id_prefix="shared")
    with pytest.raises(SlotLost):
        made.layout.judge(_marker(OTHER, "shared-0"), 0, "shared-0", 4)
    [refusal] = made.refused
    assert isinstance(refusal, ConfigError)
    assert f"--replaces-outbox {OTHER}" in str(refusal)


def test_i9_a_marker_that_is_not_this_slots_is_ignored_and_counted() -> None:
    made = _layout()
    tid = made.layout.transactional_id(0)
    reading = made.layout.judge(_marker(OUTBOX, tid, slot=1), 0, tid, 4)
    assert reading.marker is None
    assert made.stats.markers_ignored == 1
    assert not made.refused


def test_i9_a_marker_of_an_old_layout_is_ignored_as_expected_and_not_counted() -> None:
    made = _layout()
    tid = made.layout.transactional_id(0)
    reading = made.layout.judge(_marker(OUTBOX, tid, slots=2), 0, tid, 4)
    assert reading.marker is None
    assert reading.expected
    assert made.stats.markers_ignored == 0


def test_i4_this_slots_own_marker_is_applied() -> None:
    made = _layout()
    tid = made.layout.transactional_id(0)
    reading = made.layout.judge(_marker(OUTBOX, tid), 0, tid, 4)
    assert reading.marker is not None
    assert reading.marker.ids == (1,)
