"""The small seam between the relay and the PostgreSQL driver.

Accepts a SQLAlchemy URL (``postgresql+psycopg://``), a libpq URL
(``postgresql://``, ``postgres://``) or a libpq key=value DSN, and never lets a
password reach a log line or an error message.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import unquote

import psycopg
from psycopg.adapt import Buffer, Loader
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import Format
from psycopg.rows import dict_row
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from outbox.errors import ConfigError

# The two secret rules, as the regexes they replace say them (the reference in
# tests/unit/consumer/test_hostile.py), found in linear time: the regexes scan to the end
# of the line (or text) from every candidate start, quadratic on a long hostile header.
_URL_USER = re.compile(r"://[^:/?#\s]*:")
_KV_PREFIX = re.compile(r"""password["']?\s*[=:]\s*""", re.IGNORECASE)
_SPACE = re.compile(r"\s")
_CUT_MARK = "..."


def _url_secrets(text: str, truncated: bool) -> Iterator[tuple[int, int]]:
    """``scheme://user:PASSWORD@host``: per line, from the first ``://user:`` to the line's
    LAST '@' (the user part may hold '@'; '@', ':', '/' or spaces in the password never
    leave a tail behind). The last line of a truncated text is redacted to its end."""
    start, n = 0, len(text)
    while start <= n:
        end = text.find("\n", start)
        if end < 0:
            end = n
        at = n if truncated and end == n else text.rfind("@", start, end)
        if at >= 0:
            m = _URL_USER.search(text, start, at)
            if m is not None:
                yield m.end(), at
        start = end + 1


def _closing_quote(text: str, i: int, quote: str) -> int:
    """Index of the quote closing a value that starts at ``i``, or -(index + 1) where the
    scan stopped: backslash escapes any character but a newline."""
    n = len(text)
    while i < n:
        c = text[i]
        if c == quote:
            return i
        if c == "\\":
            if i + 1 >= n or text[i + 1] == "\n":
                return -(i + 1)
            i += 2
        else:
            i += 1
    return -(n + 1)


def _kv_secrets(text: str, truncated: bool) -> Iterator[tuple[int, int]]:
    """``password=...`` and ``"password": "..."``: a quoted value (escapes allowed) or the
    run of non-space characters after the ``=``/``:``."""
    n = len(text)
    pos = 0
    # A scan for quote q that failed at f: any later quoted value opening before f fails too
    # (its opening quote was escaped on the failed scan's path, so it follows that path).
    failed = {"'": -1, '"': -1}
    while True:
        m = _KV_PREFIX.search(text, pos)
        if m is None:
            return
        s = m.end()
        if s >= n:
            pos = m.start() + 1
            continue
        quote = text[s]
        if quote in failed:
            close = -1 if s < failed[quote] else _closing_quote(text, s + 1, quote)
            if close >= 0:
                yield s, close + 1
                pos = close + 1
                continue
            if s >= failed[quote]:
                failed[quote] = -close - 1
            if truncated and failed[quote] >= n:
                yield s, n
                return
        space = _SPACE.search(text, s)
        end = space.start() if space is not None else n
        yield s, end
        pos = end


def _replace(text: str, spans: Iterator[tuple[int, int]]) -> str:
    parts: list[str] = []
    last = 0
    for start, end in spans:
        parts += [text[last:start], "***"]
        last = end
    parts.append(text[last:])
    return "".join(parts)


def redact(text: str, limit: int | None = None) -> str:
    """Hide passwords in anything that may hold a DSN (URLs and key=value strings).

    Linear in ``len(text)``. With ``limit``, the text is cut to that many characters
    FIRST (an error message may quote a megabyte header) and the cut end is redacted
    to its end when a password may run past it.
    """
    truncated = limit is not None and len(text) > limit
    if truncated:
        assert limit is not None
        text = text[:limit]
    text = _replace(text, _url_secrets(text, truncated))
    text = _replace(text, _kv_secrets(text, truncated))
    return text + _CUT_MARK if truncated else text


def _secrets(db: str) -> set[str]:
    """Every spelling of the passwords in ``db`` that a driver message might echo."""
    found = {db[start:end] for start, end in _url_secrets(db, False)}
    for start, end in _kv_secrets(db, False):
        secret = db[start:end]
        if secret[:1] in {"'", '"'}:
            secret = re.sub(r"\\(.)", r"\1", secret[1:-1])
        found.add(secret)
    found |= {unquote(s) for s in found}
    return {s for s in found if s and s != "***"}


_BACKENDS = {"postgresql", "postgres"}


def _scrub(message: str, db: str) -> str:
    """``redact`` plus removal of the passwords of ``db`` wherever they appear."""
    message = redact(message)
    for secret in sorted(_secrets(db), key=len, reverse=True):
        message = message.replace(secret, "***")
    return message


def _check_authority(db: str) -> None:
    authority = db.split("://", 1)[1].split("/", 1)[0]
    if authority.count("@") > 1:
        raise ConfigError(
            f"--db {redact(db)!r} has more than one '@' before the host: percent-encode "
            "'@' as %40 in the user name or password"
        )


def _parse_url(db: str) -> URL:
    _check_authority(db)
    try:
        url = make_url(db)
    except (ArgumentError, ValueError) as exc:
        raise ConfigError(
            f"--db {redact(db)!r} is not a database URL ({_scrub(str(exc), db)}); "
            "use postgresql+psycopg://user:password@host:5432/dbname"
        ) from None
    if url.get_backend_name() not in _BACKENDS:
        raise ConfigError(
            f"--db {redact(db)!r} is not PostgreSQL; the outbox needs postgresql+psycopg://..."
        )
    return url


def _check_libpq(dsn: str, shown: str) -> None:
    try:
        conninfo_to_dict(dsn)
    except psycopg.ProgrammingError as exc:
        raise ConfigError(
            f"--db {redact(shown)!r} is not a valid DSN: {_scrub(str(exc), shown)}"
        ) from None


def _split_host_port(entry: str) -> tuple[str, str]:
    if entry.startswith("/"):  # a Unix socket directory
        return entry, ""
    host, sep, port = entry.rpartition(":")
    if not sep or not port.isdigit():
        return entry.strip("[]"), ""
    return host.strip("[]"), port


def libpq_dsn(db: str) -> str:
    """A DSN psycopg understands (checked, not used): libpq forms pass through untouched,
    a SQLAlchemy URL becomes a key=value string."""
    db = db.strip()
    if not db:
        raise ConfigError("--db is empty: pass postgresql+psycopg://user@host/dbname")
    if "://" not in db:
        _check_libpq(db, db)
        return db
    scheme = db.split("://", 1)[0].lower()
    if scheme in _BACKENDS:
        # Already a libpq URL: pass it on untouched (multi-host lists included).
        _check_authority(db)
        _check_libpq(db, db)
        return db
    url = _parse_url(db)
    # Built by libpq's own quoting rules: SQLAlchemy's rendering leaves spaces in
    # a password unencoded, which libpq then misreads.
    params: dict[str, str | int | None] = {
        "user": url.username,
        "password": url.password,
        "host": url.host,
        "port": url.port,
        "dbname": url.database,
    }
    for name, value in url.query.items():
        values = [value] if isinstance(value, str) else list(value)
        if name == "host" and url.host is None:
            # SQLAlchemy's multi-host form: ?host=h1:5432&host=h2:5433
            hosts, ports = zip(*(_split_host_port(v) for v in values), strict=True)
            params["host"] = ",".join(hosts)
            if any(ports):
                params["port"] = ",".join(ports)
        else:
            params[name] = ",".join(values)
    dsn = make_conninfo("", **{k: v for k, v in params.items() if v is not None})
    _check_libpq(dsn, db)
    return dsn


SESSION_ENCODING = "UTF8"
"""The client encoding of the library's own sessions (relay, CLI, migrate, consume), whatever
the DSN, PGCLIENTENCODING or the database say: under SQL_ASCII psycopg hands text over as
bytes, so every topic and header name would be bytes (the relay would bury each row as
poison, verify find every event lost, SQLAlchemy fail on its first connection)."""


class _StoredText(Loader):
    """Text as the bytes stored, read as UTF-8 with each undecodable byte shown as ``\\xNN``."""

    def load(self, data: Buffer) -> str:
        return bytes(data).decode("utf-8", "backslashreplace")


class _StoredTextBinary(_StoredText):
    format = Format.BINARY


def show_stored_text(conn: psycopg.Connection[Any]) -> None:
    """In a SQL_ASCII database, make ``conn`` read text that is not UTF-8 instead of failing.

    Such a database stores any bytes in a text column, and a UTF8 session is refused every
    result holding a row with others (the relay buries such rows, I6). The operator's views
    must still show them: the session takes the stored bytes (client encoding SQL_ASCII) and
    decodes them here. Other databases are left as they are."""
    if conn.info.parameter_status("server_encoding") != "SQL_ASCII":
        return
    conn.execute("SET client_encoding TO 'SQL_ASCII'")
    for name in ("text", "varchar", "bpchar", "name", '"char"'):
        conn.adapters.register_loader(name, _StoredText)
        conn.adapters.register_loader(name, _StoredTextBinary)


def sqlalchemy_url(db: str) -> str:
    """A SQLAlchemy URL on psycopg 3, from either form the CLI accepts (URL or key=value)."""
    db = db.strip()
    if not db:
        raise ConfigError("--db is empty: pass postgresql+psycopg://user@host/dbname")
    if "://" in db:
        url = _parse_url(db)
        return url.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    _check_libpq(db, db)
    params = conninfo_to_dict(db)
    port = params.pop("port", None)
    try:
        port_number = int(port) if port is not None else None
    except ValueError:
        raise ConfigError(
            f"--db {redact(db)!r}: port={port!r} is not one number; "
            "use a postgresql+psycopg:// URL for several hosts"
        ) from None
    url = URL.create(
        "postgresql+psycopg",
        username=_str_or_none(params.pop("user", None)),
        password=_str_or_none(params.pop("password", None)),
        host=_str_or_none(params.pop("host", None)),
        port=port_number,
        database=_str_or_none(params.pop("dbname", None)),
        query={k: str(v) for k, v in params.items()},
    )
    return url.render_as_string(hide_password=False)


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


# Answers from the server that no retry will change (libpq reports no SQLSTATE for them).
_REFUSED_FOR_GOOD = (
    "password authentication failed",
    "authentication failed",
    "no pg_hba.conf entry",
    "does not exist",
    "password is required",
)


def connect(
    db: str,
    *,
    application_name: str,
    autocommit: bool = True,
    params: Mapping[str, str] | None = None,
) -> psycopg.Connection[dict[str, object]]:
    """A dedicated session: advisory locks and LISTEN need one (not a transaction pooler).

    ``params``: more libpq connection parameters (e.g. the relay's keepalives). The client
    encoding is ``SESSION_ENCODING``."""
    dsn = libpq_dsn(db)
    if params:
        dsn = make_conninfo(dsn, **params)
    try:
        return psycopg.connect(
            dsn,
            autocommit=autocommit,
            application_name=application_name,
            row_factory=dict_row,
            connect_timeout=10,
            client_encoding=SESSION_ENCODING,
        )
    except psycopg.OperationalError as exc:
        message = _scrub(str(exc), db)
        if any(sign in message for sign in _REFUSED_FOR_GOOD):
            raise ConfigError(
                f"PostgreSQL refused the connection: {message}; fix --db (user, password, "
                "database name) or the server's pg_hba.conf"
            ) from None
        raise ConnectionError(f"cannot connect to PostgreSQL: {message}") from None
