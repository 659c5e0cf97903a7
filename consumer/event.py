"""What a handler receives: the ``Event`` value object, value decoding and typed events.

Decoding follows the ``content-type`` header that ``outbox.publish`` sets:
JSON becomes dicts/lists, text becomes ``str``, anything else stays ``bytes``.
Typed events are opt-in through an ``EventTypes`` registry keyed by a type
header (``event-type``): only classes registered there are ever instantiated,
and nothing is ever imported by a name found in a message (the safe version of
the Java JSON deserializer's "trusted packages").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Literal, TypeVar, overload

from outbox.codec import CONTENT_TYPE_HEADER, EVENT_ID_HEADER, JSON
from outbox.errors import ConfigError, OutboxError

EVENT_TYPE_HEADER = "event-type"

T = TypeVar("T")
Factory = Callable[[Any], Any]


class UndecodableEvent(OutboxError):
    """The value cannot be decoded as its content type says: it goes straight to the DLT."""


class UnknownEventType(UndecodableEvent):
    """The type header names a type nobody registered: refused, never instantiated."""


@dataclass(frozen=True, slots=True)
class Record:
    """A Kafka record as received, before decoding (what ``dedup_key`` gets)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    timestamp_ms: int | None = None
    defect: str | None = None
    """Why the client could not hand over part of the record (its headers): a dead letter."""

    @classmethod
    def from_kafka(cls, msg: Any) -> Record:
        """From a ``confluent_kafka.Message``; never raises because of the record's bytes.

        The client decodes header names as UTF-8 and raises on any other bytes: such a
        record keeps no headers and carries the reason in ``defect``.
        """
        ts_type, ts = msg.timestamp()
        defect = None
        try:
            headers = tuple((name, value or b"") for name, value in (msg.headers() or ()))
        except Exception as exc:
            headers = ()
            defect = f"the record's headers cannot be read ({type(exc).__name__}: {exc})"
        return cls(
            topic=msg.topic(),
            partition=msg.partition(),
            offset=msg.offset(),
            key=msg.key(),
            value=msg.value(),
            headers=headers,
            timestamp_ms=ts if ts_type != 0 else None,  # 0: TIMESTAMP_NOT_AVAILABLE
            defect=defect,
        )

    def header(self, name: str) -> str | None:
        """The last value of header ``name`` (case-insensitive) as text, or None."""
        return _header(self.headers, name)

    def raw_header(self, name: str) -> bytes | None:
        """The last value of header ``name`` (case-insensitive) as its bytes, or None."""
        return _raw_header(self.headers, name)

    @property
    def position(self) -> str:
        """``topic/partition/offset``: unique per record, the dedup key of last resort."""
        return f"{self.topic}/{self.partition}/{self.offset}"


def _raw_header(headers: Iterable[tuple[str, bytes]], name: str) -> bytes | None:
    found: bytes | None = None
    wanted = name.lower()
    for key, value in headers:
        if key.lower() == wanted:
            found = value
    return found


def _header(headers: Iterable[tuple[str, bytes]], name: str) -> str | None:
    found = _raw_header(headers, name)
    return None if found is None else found.decode("utf-8", "replace")


@dataclass(frozen=True, slots=True)
class Event:
    """One decoded event, as the handler sees it.

    ``id`` is the dedup key: the ``outbox-event-id`` header, else the
    consumer's ``dedup_key()``, else ``topic/partition/offset``. ``headers``
    is read-only and keeps the last value of a repeated header.
    """

    id: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: Any
    raw: bytes | None
    headers: Mapping[str, bytes] = field(default_factory=lambda: MappingProxyType({}))
    timestamp: datetime | None = None

    @property
    def type(self) -> str | None:
        """The ``event-type`` header, if the producer set one."""
        return self.header(EVENT_TYPE_HEADER)

    @property
    def content_type(self) -> str | None:
        return self.header(CONTENT_TYPE_HEADER)

    def header(self, name: str) -> str | None:
        """Header ``name`` (case-insensitive) as text, or None."""
        return _header(self.headers.items(), name)


class EventTypes:
    """Registry of typed events: type-header value -> class (or factory).

    Only what is registered here is ever instantiated. ``unknown`` says what
    happens to a JSON event whose type header names nothing registered:
    ``"reject"`` (default) dead-letters it as undecodable, ``"dict"`` hands
    the plain dict to the handler. Events without the header stay plain JSON.
    """

    def __init__(
        self, header: str = EVENT_TYPE_HEADER, *, unknown: Literal["reject", "dict"] = "reject"
    ) -> None:
        if not header or not isinstance(header, str):
            raise ConfigError(
                f"EventTypes(header={header!r}) must name a header, e.g. 'event-type'"
            )
        if unknown not in ("reject", "dict"):
            raise ConfigError(f"EventTypes(unknown={unknown!r}) must be 'reject' or 'dict'")
        self.header = header
        self.unknown = unknown
        self._types: dict[str, tuple[type[Any] | None, Factory]] = {}

    @overload
    def register(self, name: str) -> Callable[[type[T]], type[T]]: ...
    @overload
    def register(self, name: str, cls: type[T]) -> type[T]: ...
    @overload
    def register(self, name: str, *, factory: Factory) -> None: ...

    def register(
        self, name: str, cls: type[T] | None = None, *, factory: Factory | None = None
    ) -> Callable[[type[T]], type[T]] | type[T] | None:
        """Trust ``cls`` (or ``factory``) for events whose type header is ``name``.

        Usable as ``@types.register("OrderPlaced")`` on a class. A class is built
        with ``model_validate(doc)`` when it has one (pydantic), else ``cls(**doc)``.
        """
        if not isinstance(name, str) or not name.strip():
            raise ConfigError(f"event type name {name!r} must be a non-empty str")
        if factory is not None:
            if cls is not None or not callable(factory):
                raise ConfigError(f"register {name!r} with a class or a callable factory, not both")
            self._add(name, None, factory)
            return None
        if cls is None:

            def decorate(klass: type[T]) -> type[T]:
                self.register(name, klass)
                return klass

            return decorate
        if not isinstance(cls, type):
            raise ConfigError(
                f"event type {name!r}: {cls!r} is not a class; pass factory=... for a function"
            )
        self._add(name, cls, _class_factory(cls))
        return cls

    def _add(self, name: str, cls: type[Any] | None, factory: Factory) -> None:
        existing = self._types.get(name)
        if existing is not None and (existing[0] is None or existing[0] is not cls):
            raise ConfigError(
                f"event type {name!r} is already registered to {existing[0] or existing[1]!r}; "
                "one name, one type"
            )
        self._types[name] = (cls, factory)

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def names(self) -> list[str]:
        return sorted(self._types)

    def decode(self, type_name: str | None, doc: Any) -> Any:
        """Build the registered type for ``type_name`` from decoded JSON ``doc``."""
        if type_name is None:
            return doc
        entry = self._types.get(type_name)
        if entry is None:
            if self.unknown == "dict":
                return doc
            raise UnknownEventType(
                f"event type {_cut(type_name, 200)!r} is not registered "
                f"(known: {', '.join(self.names()) or 'none'}); "
                f"register it with EventTypes.register({_cut(type_name, 200)!r}, cls)"
            )
        try:
            return entry[1](doc)
        except Exception as exc:
            raise UndecodableEvent(
                f"cannot build event type {type_name!r} from its JSON value: {_brief(exc)}"
            ) from exc


def _class_factory(cls: type[Any]) -> Factory:
    validate: Factory | None = getattr(cls, "model_validate", None)
    if callable(validate):
        return validate

    def build(doc: Any) -> Any:
        if not isinstance(doc, dict):
            raise TypeError(f"expected a JSON object for {cls.__name__}, got {type(doc).__name__}")
        return cls(**doc)

    return build


def _media_type(content_type: str) -> tuple[str, dict[str, str]]:
    kind, *params = (part.strip() for part in content_type.split(";"))
    options = {}
    for param in params:
        name, _, value = param.partition("=")
        options[name.strip().lower()] = value.strip().strip('"')
    return kind.lower(), options


def decode_value(
    raw: bytes | None,
    content_type: str | None,
    *,
    type_name: str | None = None,
    types: EventTypes | None = None,
    default_content_type: str = JSON,
) -> Any:
    """Decode a record value by its content type; raises ``UndecodableEvent``."""
    if raw is None:
        return None  # a tombstone
    kind, options = _media_type(content_type or default_content_type)
    if kind == JSON or kind.endswith("+json"):
        try:
            doc = json.loads(raw)
        except Exception as exc:
            # Not only JSONDecodeError: RecursionError (thousands of '['), ValueError (an
            # int of thousands of digits), UnicodeDecodeError, MemoryError. (I10)
            raise UndecodableEvent(f"value is not valid JSON ({_brief(exc)})") from None
        return types.decode(type_name, doc) if types is not None else doc
    if kind.startswith("text/"):
        charset = options.get("charset", "utf-8")
        try:
            return raw.decode(charset)
        except Exception as exc:
            # LookupError (unknown or not a text codec), UnicodeError (e.g. idna), ...
            raise UndecodableEvent(
                f"value is not valid {_cut(charset, 100)} text ({_brief(exc)})"
            ) from None
    # application/octet-stream, or a format this library does not know (Avro,
    # Protobuf...): the handler gets the bytes and decodes them itself.
    return raw


def decode_event(
    record: Record,
    event_id: str,
    *,
    types: EventTypes | None = None,
    default_content_type: str = JSON,
) -> Event:
    """The ``Event`` for ``record``; raises ``UndecodableEvent`` when its value cannot be read."""
    type_header = types.header if types is not None else EVENT_TYPE_HEADER
    value = decode_value(
        record.value,
        record.header(CONTENT_TYPE_HEADER),
        type_name=record.header(type_header),
        types=types,
        default_content_type=default_content_type,
    )
    return Event(
        id=event_id,
        topic=record.topic,
        partition=record.partition,
        offset=record.offset,
        key=record.key,
        value=value,
        raw=record.value,
        headers=MappingProxyType(dict(record.headers)),
        timestamp=(
            datetime.fromtimestamp(record.timestamp_ms / 1000, tz=UTC)
            if record.timestamp_ms is not None
            else None
        ),
    )


def outbox_event_id(record: Record) -> str | None:
    """The id ``outbox.publish`` gave the event, if this record came through the outbox.

    Bytes that are not UTF-8 stay distinct (surrogate escapes), so two different
    broken ids never share a dedup key; ``dedup.normalise_key`` hashes such keys.
    """
    raw = record.raw_header(EVENT_ID_HEADER)
    if raw is None:
        return None
    value = raw.decode("utf-8", "surrogateescape")  # not stripped: "a1 " and "a1" differ
    return value or None


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _brief(error: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an exception, short (its message may quote the whole record)."""
    try:
        message = str(error)
    except Exception:
        message = "<unprintable>"
    return f"{type(error).__name__}: {_cut(message, limit)}"
