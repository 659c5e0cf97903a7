"""The write path: an event becomes a row in the caller's own transaction (I1).

Nothing here opens a connection, commits, or talks to Kafka: the event commits
or rolls back with the business data. The relay is woken by at most one
``NOTIFY`` per transaction and shard, whose payload is the shard, so only the
slot owning it wakes up; with ``notify=False`` the relay finds rows by polling.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from types import EllipsisType
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, TextClause, bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, BYTEA
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.orm import Session
from sqlalchemy.types import Text

from outbox import sql
from outbox.codec import EncodedEvent, Headers, JsonDefault, encode_event
from outbox.errors import ConfigError, NotMigrated
from outbox.schema import NOTIFY_CHANNEL
from outbox.tracing import current_trace_headers

if TYPE_CHECKING:  # the asyncio extension needs greenlet, so only apublish imports it
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession


DEFAULT_MAX_MESSAGE_BYTES = 1_000_000


@dataclass(frozen=True, slots=True)
class PublishSettings:
    """Process-wide write-path settings; change them with ``configure()``."""

    notify: bool = True
    # Kafka's default message.max.bytes: a larger value would also make the relay claim
    # (and hold) rows of unbounded size. Raise it with configure(max_message_bytes=...).
    max_message_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES
    json_default: JsonDefault | None = None
    """Your encoder for values ``json`` cannot write, tried before the built-in ones."""

    def __post_init__(self) -> None:
        if self.max_message_bytes is not None and self.max_message_bytes <= 0:
            raise ConfigError(
                f"max_message_bytes={self.max_message_bytes} must be a positive byte count "
                "(the producer's message.max.bytes, default 1000000) or None for no check"
            )


_settings = PublishSettings()
_KEY = "kafka_outbox_notified"


def configure(
    *,
    notify: bool | None = None,
    max_message_bytes: int | None = -1,
    json_default: JsonDefault | EllipsisType | None = ...,
) -> PublishSettings:
    """Set the write-path defaults for this process; returns the settings now in force.

    ``json_default`` is called for values ``json`` cannot write, like
    ``json.dumps(default=...)``: return a JSON-able stand-in, or raise TypeError to
    leave the object to the built-in conversions; None removes it.
    """
    global _settings
    changes: dict[str, Any] = {}
    if notify is not None:
        changes["notify"] = notify
    if max_message_bytes != -1:
        changes["max_message_bytes"] = max_message_bytes
    if not isinstance(json_default, EllipsisType):
        if json_default is not None and not callable(json_default):
            raise ConfigError(f"json_default={json_default!r} must be a function, or None")
        changes["json_default"] = json_default
    _settings = replace(_settings, **changes)
    return _settings


def _statement(sql_text: str) -> TextClause:
    return text(sql_text).bindparams(
        bindparam("header_names", type_=ARRAY(Text)),
        bindparam("header_values", type_=ARRAY(BYTEA)),
    )


# (caller's event_id?, notify?) -> statement. ON CONFLICT costs a speculative insertion,
# ~3 % of a small request, so ids publish() generated itself skip it.
_STATEMENTS = {
    (False, False): _statement(sql.INSERT_NEW_EVENT),
    (False, True): _statement(sql.INSERT_NEW_EVENT_AND_NOTIFY),
    (True, False): _statement(sql.INSERT_EVENT),
    (True, True): _statement(sql.INSERT_EVENT_AND_NOTIFY),
}


def _params(event: EncodedEvent) -> dict[str, Any]:
    return {
        "event_id": event.event_id,
        "topic": event.topic,
        "shard": event.shard,
        "key": event.key,
        "value": event.value,
        "header_names": event.header_names,
        "header_values": event.header_values,
        "channel": NOTIFY_CHANNEL,
    }


@dataclass(frozen=True, slots=True)
class _Write:
    """What one publish() executes: the statement, its parameters, and whether it notifies."""

    statement: TextClause
    params: dict[str, Any]
    event_id: uuid.UUID
    shard: int
    notifies: bool


def _prepare(
    target: Session | Connection,
    *,
    topic: str,
    key: str | bytes | None,
    value: object,
    headers: Headers | None,
    event_id: uuid.UUID | None,
    notify: bool | None,
    json_default: JsonDefault | None,
) -> _Write:
    """Validate and encode (before any SQL), and pick the statement: one NOTIFY per tx and shard."""
    event = encode_event(
        topic=topic,
        key=key,
        value=value,
        headers=headers,
        event_id=event_id,
        max_message_bytes=_settings.max_message_bytes,
        context_headers=current_trace_headers(),
        json_default=json_default if json_default is not None else _settings.json_default,
    )
    wants = _settings.notify if notify is None else notify
    notifies = wants and _needs_notify(target, event.shard)
    statement = _STATEMENTS[event_id is not None, notifies]
    return _Write(statement, _params(event), event.event_id, event.shard, notifies)


def _info_and_tx(target: Session | Connection) -> tuple[dict[Any, Any], object | None]:
    return target.info, target.get_transaction()


def _needs_notify(target: Session | Connection, shard: int) -> bool:
    info, tx = _info_and_tx(target)
    seen = info.get(_KEY)
    return tx is None or seen is None or seen[0]() is not tx or shard not in seen[1]


def _remember_notify(target: Session | Connection, shard: int) -> None:
    """Note the shard as notified in this transaction (a weak reference: no leak after it)."""
    info, tx = _info_and_tx(target)
    if tx is None:
        return
    seen = info.get(_KEY)
    if seen is None or seen[0]() is not tx:
        info[_KEY] = (weakref.ref(tx), {shard})
    else:
        seen[1].add(shard)


_MISSING_SCHEMA = {"42P01", "42703"}  # undefined_table, undefined_column


@contextmanager
def _schema_checked() -> Iterator[None]:
    """The library's own error, with the fix, when the outbox tables are missing or old."""
    try:
        yield
    except ProgrammingError as exc:
        if getattr(exc.orig, "sqlstate", None) in _MISSING_SCHEMA:
            raise NotMigrated(str(exc.orig).splitlines()[0]) from exc
        raise


def publish(
    session: Session | Connection,
    *,
    topic: str,
    key: str | bytes | None,
    value: object,
    headers: Headers | None = None,
    event_id: uuid.UUID | None = None,
    notify: bool | None = None,
    json_default: JsonDefault | None = None,
) -> uuid.UUID:
    """Write an event through ``session``'s current transaction and return its id.

    Never commits. Publishing an ``event_id`` that is still pending is ignored
    (the first payload wins); consumers deduplicate by the same id afterwards.
    ``value``: bytes as they are, str as text, anything else as JSON (Decimal,
    datetime, UUID, Enum, dataclasses and pydantic models included); ``json_default``
    converts what else you pass, for this call (else ``configure(json_default=...)``).
    Raises ``NotMigrated`` when the outbox tables are missing.
    """
    if not isinstance(session, Session | Connection):
        raise TypeError(
            "publish() needs the Session or Connection of your own transaction, got "
            f"{type(session).__name__}: the event must commit or roll back with your business "
            "data (use apublish() for AsyncSession/AsyncConnection)"
        )
    write = _prepare(
        session,
        topic=topic,
        key=key,
        value=value,
        headers=headers,
        event_id=event_id,
        notify=notify,
        json_default=json_default,
    )
    with _schema_checked():
        session.execute(write.statement, write.params)
    if write.notifies:
        _remember_notify(session, write.shard)
    return write.event_id


async def apublish(
    session: AsyncSession | AsyncConnection,
    *,
    topic: str,
    key: str | bytes | None,
    value: object,
    headers: Headers | None = None,
    event_id: uuid.UUID | None = None,
    notify: bool | None = None,
    json_default: JsonDefault | None = None,
) -> uuid.UUID:
    """``publish()`` for ``AsyncSession``/``AsyncConnection``: same rules, same row."""
    from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

    if not isinstance(session, AsyncSession | AsyncConnection):
        raise TypeError(
            "apublish() needs the AsyncSession or AsyncConnection of your own transaction, "
            f"got {type(session).__name__}"
        )
    sync: Session | Connection = (
        session.sync_session if isinstance(session, AsyncSession) else session.sync_connection  # type: ignore[assignment]
    )
    write = _prepare(
        sync,
        topic=topic,
        key=key,
        value=value,
        headers=headers,
        event_id=event_id,
        notify=notify,
        json_default=json_default,
    )
    with _schema_checked():
        await session.execute(write.statement, write.params)
    if write.notifies:
        _remember_notify(sync, write.shard)
    return write.event_id
