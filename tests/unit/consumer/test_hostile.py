"""I10, the pure parts: whatever bytes and headers a record carries, decoding fails into a
dead letter, keys and dead-letter headers are storable, error texts are bounded and
redacted in linear time, tracing headers never fail an event, and transient database
faults are told apart by SQLSTATE."""

from __future__ import annotations

import logging
import re
import time
from datetime import timedelta
from typing import Any

import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import exc as sa_exc

from consumer import Record, UndecodableEvent
from consumer.deadletter import (
    ENCODED_HEADER_PREFIX,
    MAX_ERROR_MESSAGE,
    dead_letter_headers,
    describe,
    error_message,
    original_header_name,
)
from consumer.dedup import HASHED_PREFIX, MAX_KEY_LENGTH, normalise_key
from consumer.event import decode_value, outbox_event_id
from consumer.retry import Reason, is_infrastructure_error, transient_sqlstate
from outbox.codec import encode_headers
from outbox.db import redact
from outbox.tracing import restored_context
from tests.hypothesis_profiles import examples


def _record(value: bytes | None, headers: list[tuple[str, bytes]] | None = None) -> Record:
    return Record("orders.v1", 0, 7, b"k", value, tuple(headers or []), 1_700_000_000_000)


# -- every decoding failure is an UndecodableEvent (a dead letter), never a crash -------------


@pytest.mark.parametrize(
    ("raw", "content_type", "cause"),
    [
        (b"[" * 5000, "application/json", "RecursionError"),
        (b"1" * 6000, "application/json", "ValueError"),
        (b'{"n": ' + b"9" * 6000 + b"}", "application/json", "ValueError"),
        (b"\xff\xfe", "text/plain; charset=idna", "UnicodeDecodeError"),
        (b"xn--a", "text/plain; charset=idna", "UnicodeError"),
        (b"abc", "text/plain; charset=rot13", "LookupError"),
        (b"abc", "text/plain; charset=base64", "LookupError"),
        (b"abc", "text/plain; charset=undefined", "UnicodeError"),
        (b"abc", "text/plain; charset=" + "x" * 20_000, "LookupError"),
    ],
    ids=[
        "5000-brackets",
        "6000-digit-int",
        "6000-digit-field",
        "idna-bytes",
        "idna-punycode",
        "not-a-text-codec",
        "bytes-codec",
        "undefined-codec",
        "20kb-charset",
    ],
)
def test_i10_every_decoding_failure_is_an_undecodable_event(
    raw: bytes, content_type: str, cause: str
) -> None:
    with pytest.raises(UndecodableEvent, match=cause) as caught:
        decode_value(raw, content_type)
    assert len(str(caught.value)) < 600  # the error quotes a bounded part of the record


def test_i10_unreadable_headers_become_a_defect_of_the_record_not_an_exception() -> None:
    class Message:
        """What confluent_kafka hands over for a header name that is not UTF-8."""

        def timestamp(self) -> tuple[int, int]:
            return (1, 5)

        def topic(self) -> str:
            return "t"

        def partition(self) -> int:
            return 0

        def offset(self) -> int:
            return 3

        def key(self) -> None:
            return None

        def value(self) -> bytes:
            return b"{}"

        def headers(self) -> Any:
            return b"\xff".decode()

    record = Record.from_kafka(Message())
    assert record.headers == ()
    assert record.defect is not None
    assert "UnicodeDecodeError" in record.defect


# -- dedup keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "hashed"),
    [
        ("3f1c0a4e-1b2c-4d5e-8f90-123456789abc", False),
        ("order-42/é", False),
        ("x" * MAX_KEY_LENGTH, False),
        ("x" * (MAX_KEY_LENGTH + 1), True),
        ("abc\x00def", True),
        ("tab\there", True),
        ("line\nbreak", True),
        ("del\x7f", True),
        ("c1-\x85", True),
        ("bytes-\udcff", True),  # an undecodable byte, surrogate-escaped
        ("lone-\ud800", True),
    ],
)
def test_i10_keys_with_control_characters_or_too_long_are_hashed(key: str, hashed: bool) -> None:
    stored = normalise_key(key)
    assert stored.startswith(HASHED_PREFIX) is hashed
    assert stored == normalise_key(key)  # deterministic
    assert "\x00" not in stored
    stored.encode()  # storable as UTF-8 text


@given(st.binary(max_size=40), st.binary(max_size=40))
def test_i10_different_event_id_bytes_never_share_a_dedup_key(a: bytes, b: bytes) -> None:
    def key(raw: bytes) -> str | None:
        found = outbox_event_id(_record(None, [("outbox-event-id", raw)]))
        return None if found is None else normalise_key(found)

    if a.strip() != b.strip() and key(a) is not None and key(b) is not None:
        assert key(a) != key(b)


# -- dead-letter headers: any header accepted, originals recoverable -----------------------------


header_names = st.one_of(
    st.just(""),
    st.text(max_size=30),
    st.text(st.characters(codec="utf-8"), max_size=5).map(lambda s: s + "\x00" + s),
    st.binary(max_size=10).map(lambda b: b.decode("utf-8", "surrogateescape")),
    st.sampled_from(["content-type", "outbox-event-id", "Outbox-Event-Id", "dlt-reason"]),
)


@settings(max_examples=examples(300))
@given(st.lists(st.tuples(header_names, st.binary(max_size=50)), max_size=8))
def test_i10_dead_letter_headers_are_storable_and_keep_every_original(
    headers: list[tuple[str, bytes]],
) -> None:
    record = _record(b"[", headers)
    key = normalise_key(outbox_event_id(record) or record.position)
    out = dead_letter_headers(
        record,
        group_id="g",
        key=key,
        error=UndecodableEvent("x\x00\udcff"),
        attempts=0,
        reason=Reason.UNDECODABLE,
    )
    names, values = encode_headers(out)  # what publish() checks: raises if not storable
    assert all(name and "\x00" not in name for name in names)
    kept = [
        (original_header_name(n) if n.startswith(ENCODED_HEADER_PREFIX) else n, v)
        for n, v in zip(names, values, strict=True)
        if n.startswith(ENCODED_HEADER_PREFIX) or not n.startswith("dlt-")
    ]
    expected = [
        (n, v)
        for n, v in headers
        if not n.lower().startswith("dlt-")
        and n.lower() != "content-type"
        and not (n.lower() == "outbox-event-id" and v == key.encode("utf-8", "surrogateescape"))
    ]
    assert kept == expected
    if record.raw_header("content-type") is not None:
        assert dict(zip(names, values, strict=True))["dlt-original-content-type"] == (
            record.raw_header("content-type")
        )


def test_i10_an_empty_header_name_travels_base64_encoded() -> None:
    out = dead_letter_headers(
        _record(b"x", [("", b"v"), ("a\x00b", b"w")]),
        group_id="g",
        key="k",
        error=ValueError("x"),
        attempts=1,
        reason=Reason.RETRIES_EXHAUSTED,
    )
    assert out[:2] == [("dlt-header-b64:", b"v"), ("dlt-header-b64:YQBi", b"w")]
    assert original_header_name("dlt-header-b64:YQBi") == "a\x00b"


# -- error texts: bounded, redacted, linear ----------------------------------------------------

# The rules redact() had as regexes; its linear scanner must say exactly the same.
OLD_URL = re.compile(r"(?P<pre>://[^:/?#\s]*:)(?P<secret>[^\n]*)@")
OLD_KV = re.compile(
    r"""(?P<pre>password["']?\s*[=:]\s*)"""
    r"""(?P<secret>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\S+)""",
    re.IGNORECASE,
)


def _regex_redact(text: str) -> str:
    return OLD_KV.sub(r"\g<pre>***", OLD_URL.sub(r"\g<pre>***@", text))


pieces = st.sampled_from(
    [*":/@'\"\\\n =ax?#\r\t", "password", "PASSword", "://", "password='", 'password="', "é"]
)


@settings(max_examples=examples(3000))
@given(st.lists(pieces, max_size=40).map("".join))
def test_redact_hides_exactly_what_the_regex_rules_hid(text: str) -> None:
    assert redact(text) == _regex_redact(text)


@pytest.mark.parametrize(
    "unit",
    ["://a:", "password='x ", 'password="', "://u:p@", "password=x ", "p@://:'\\"],
)
def test_i10_redaction_is_linear_on_hostile_text(unit: str) -> None:
    """60 KB: the regexes took ~9 s on "://a:" repeated (quadratic); linear takes ~1 ms."""
    text = unit * (60_000 // len(unit))
    started = time.perf_counter()
    redact(text)
    assert time.perf_counter() - started < 1.0


def test_i10_error_texts_are_cut_before_redaction_and_stay_bounded() -> None:
    huge = ValueError("charset=" + "://a:" * 200_000)  # 1 MB
    started = time.perf_counter()
    message = error_message(huge)
    assert time.perf_counter() - started < 0.5
    assert len(message) <= MAX_ERROR_MESSAGE
    assert len(describe(huge)) <= 520


@pytest.mark.parametrize(
    "text",
    [
        "connect to postgresql://app:" + "s3cr3t" * 1000 + "@db/x failed",
        "host=db password='" + "s3 cr3t " * 1000 + "' dbname=x",
    ],
)
def test_i8_a_password_cut_in_the_middle_is_still_hidden(text: str) -> None:
    out = redact(text, limit=200)
    assert "cr3t" not in out
    assert out.endswith("...")


def test_i10_an_error_whose_str_raises_still_has_a_message() -> None:
    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    assert error_message(Unprintable()) == "Unprintable"


# -- tracing headers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "traceparent",
    [b"\xff\xfe", b"garbage", b"00-" + b"f" * 2000, b"x" * 600],
    ids=["not-utf8", "garbage", "too-long", "600-chars"],
)
def test_i10_a_traceparent_that_does_not_parse_is_ignored_with_a_debug_log(
    traceparent: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    from opentelemetry import trace

    with (
        caplog.at_level(logging.DEBUG, logger="outbox.tracing"),
        restored_context({"traceparent": traceparent}),
    ):
        assert not trace.get_current_span().get_span_context().is_valid
    assert "ignoring the trace context" in caplog.text


# -- transient database faults, by SQLSTATE ----------------------------------------------------


@pytest.mark.parametrize(
    ("code", "transient"),
    [
        ("55P03", True),  # lock_not_available (lock_timeout)
        ("57014", True),  # query_canceled (statement_timeout)
        ("25006", True),  # read_only_sql_transaction (failover)
        ("40001", True),  # serialization_failure
        ("40P01", True),  # deadlock_detected
        ("57P01", True),  # admin_shutdown
        ("57P02", True),  # crash_shutdown
        ("57P03", True),  # cannot_connect_now
        ("08006", True),  # connection_failure
        ("08003", True),  # connection_does_not_exist
        ("53300", True),  # too_many_connections
        ("53100", True),  # disk_full
        ("25P03", True),  # idle_in_transaction_session_timeout
        ("23505", False),  # unique_violation: the handler's own data
        ("23502", False),  # not_null_violation
        ("22P02", False),  # invalid_text_representation
        ("22021", False),  # character_not_in_repertoire (a NUL in text)
        ("42P01", False),  # undefined_table
        ("42501", False),  # insufficient_privilege
        ("40002", False),  # transaction_integrity_constraint_violation
        ("P0001", False),  # raise_exception in a trigger
    ],
)
def test_i10_transient_sqlstates_table(code: str, transient: bool) -> None:
    assert transient_sqlstate(code) is transient


@pytest.mark.parametrize(
    "error",
    [
        psycopg.errors.LockNotAvailable("canceling statement due to lock timeout"),
        psycopg.errors.QueryCanceled("canceling statement due to statement timeout"),
        psycopg.errors.ReadOnlySqlTransaction("cannot execute INSERT in a read-only transaction"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_i10_timeouts_and_read_only_are_never_charged_to_the_record(error: Exception) -> None:
    from consumer import RetryPolicy
    from consumer.retry import Action

    wrapped = sa_exc.OperationalError("INSERT", {}, error)
    assert is_infrastructure_error(wrapped)
    decision = RetryPolicy(attempts=1).decide(wrapped, failures=50, outages=50)
    assert decision.action is Action.RETRY
    assert not decision.counted


# -- a broker outage: one line per backoff step ---------------------------------------------------


@pytest.mark.parametrize(
    ("times", "admitted"),
    [
        ([0.0], [0]),
        ([0.0, 0.1, 0.5, 0.9], [0, None, None, None]),
        ([0.0, 0.5, 1.0, 2.0, 3.0], [0, None, 1, None, 1]),  # steps of 1, 2, 4 ... seconds
        (  # a failure every 10 ms for 10 s: lines at 0, 1, 3 and 7 s, with what was held back
            [i / 100 for i in range(1000)],
            [0] + [None] * 99 + [99] + [None] * 199 + [199] + [None] * 399 + [399] + [None] * 299,
        ),
        ([0.0, 500.0], [0, 0]),  # quiet for long: a new outage starts over
    ],
)
def test_i10_a_repeating_message_is_let_through_once_per_backoff_step(
    times: list[float], admitted: list[int | None]
) -> None:
    from consumer.throttle import Throttle

    throttle = Throttle(first_interval=1.0, max_interval=60.0)
    got = [throttle.admit("Connect to ipv4#127.0.0.1:9 failed (after 3ms)", t) for t in times]
    assert got == admitted


def test_i10_an_outage_of_ten_minutes_writes_a_handful_of_lines_per_message() -> None:
    from consumer.throttle import Throttle

    throttle = Throttle()
    lines = [
        t
        for t in range(0, 600_000, 5)  # a failure every 5 ms for 10 minutes
        if throttle.admit(f"Connect failed (after {t % 97}ms)", t / 1000) is not None
    ]
    assert len(lines) < 20  # 1, 2, 4 ... 60 s steps; 120 000 without the throttle


def test_i10_different_messages_are_not_held_back_by_each_other() -> None:
    from consumer.throttle import Throttle

    throttle = Throttle()
    assert throttle.admit("broker 1 down", 0.0) == 0
    assert throttle.admit("group coordinator moved", 0.1) == 0
    assert throttle.admit("broker 1 down", 0.2) is None


# -- the dedup window against the broker's redelivery horizon -------------------------------------

DAY_MS = 86_400_000
KAFKA_DEFAULTS = {"retention.ms": str(7 * DAY_MS), "segment.ms": str(7 * DAY_MS)}


@pytest.mark.parametrize(
    ("window", "configs", "expected"),
    [
        (
            timedelta(days=7),
            {"retention.ms": str(7 * DAY_MS), "segment.ms": str(7 * DAY_MS)},
            "14 days",
        ),
        (
            timedelta(days=14),
            {"retention.ms": str(7 * DAY_MS), "segment.ms": str(7 * DAY_MS)},
            None,
        ),
        (timedelta(hours=1), {"retention.ms": "3600000", "segment.ms": "600000"}, "1:10:00"),
        (timedelta(hours=2), {"retention.ms": "3600000", "segment.ms": "600000"}, None),
        (timedelta(days=30), {"retention.ms": "-1"}, "forever"),
        (None, {"retention.ms": "-1"}, None),  # dedup records kept forever
        (timedelta(hours=1), {}, None),  # the broker did not say: nothing to compare
        (timedelta(hours=1), {"retention.ms": "x"}, None),
        (timedelta(minutes=30), {"retention.ms": "3600000"}, "segment.ms=None"),
    ],
)
def test_i10_a_dedup_window_shorter_than_the_redelivery_horizon_is_named_with_both_values(
    window: timedelta | None, configs: dict[str, str], expected: str | None
) -> None:
    from consumer.config import horizon_warning

    warning = horizon_warning("orders.v1", window, configs)
    if expected is None:
        assert warning is None
    else:
        assert warning is not None
        assert expected in warning
        assert "orders.v1" in warning
        assert f"retention.ms={configs['retention.ms']}" in warning
        if window is not None:
            assert str(window) in warning
