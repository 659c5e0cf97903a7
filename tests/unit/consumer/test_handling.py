"""I11: the pure decisions at the boundary with the user's handler (no services)."""

from __future__ import annotations

import inspect
from collections.abc import Generator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy import exc as sa_exc

from consumer import RetryLater, RetryPolicy, load_consumer_class
from consumer.config import horizon_warning
from consumer.deadletter import dead_letter_headers
from consumer.event import Record, outbox_event_id
from consumer.handling import HandlerMisdeclared, handler_is_async, refuse_result
from consumer.retry import Action, Fault, Reason, classify
from outbox.errors import ConfigError


class SaveFailed(Exception):
    pass


def _lost_connection() -> sa_exc.OperationalError:
    error = sa_exc.OperationalError("SELECT 1", {}, psycopg.OperationalError("server closed"))
    error.connection_invalidated = True
    return error


def _with_sqlstate(code: str) -> sa_exc.OperationalError:
    orig = psycopg.OperationalError("x")
    orig.sqlstate = code
    return sa_exc.OperationalError("SELECT 1", {}, orig)


def _raise(error: BaseException) -> None:
    raise error


def _save(cause: BaseException, explicit: bool) -> None:
    try:
        _raise(cause)
    except BaseException as exc:
        if explicit:
            raise SaveFailed("could not save") from exc
        raise SaveFailed("could not save")  # noqa: B904 - the implicit __context__ case


def _wrapped(cause: BaseException, *, explicit: bool = True) -> SaveFailed:
    try:
        _save(cause, explicit)
    except SaveFailed as wrapped:
        return wrapped
    raise AssertionError("not raised")


@pytest.mark.parametrize("explicit", [True, False], ids=["from-cause", "implicit-context"])
def test_i11_a_wrapped_lost_connection_is_the_databases_fault(explicit: bool) -> None:
    wrapped = _wrapped(_lost_connection(), explicit=explicit)
    assert classify(wrapped) is Fault.DATABASE
    decision = RetryPolicy(attempts=1).decide(wrapped, failures=0)
    assert (decision.action, decision.counted) == (Action.RETRY, False)


def test_i11_a_wrapped_ordinary_error_stays_the_records_fault() -> None:
    assert classify(_wrapped(KeyError("customer"))) is Fault.RECORD


def test_i11_retry_later_is_never_charged_and_its_delay_is_kept() -> None:
    policy = RetryPolicy(attempts=1)
    for error in (RetryLater("down", delay=7.5), _wrapped(RetryLater("down", delay=7.5))):
        decision = policy.decide(error, failures=5)
        assert (decision.action, decision.counted, decision.delay) == (Action.RETRY, False, 7.5)
    default = policy.decide(RetryLater(), failures=0)
    assert default.action is Action.RETRY
    assert default.delay > 0


def test_i11_retry_later_refuses_a_negative_delay() -> None:
    with pytest.raises(ValueError, match="delay"):
        RetryLater(delay=-1)


@pytest.mark.parametrize("code", ["57014", "55P03", "53200", "25P03"])
def test_i11_timeouts_and_resource_errors_are_ambiguous(code: str) -> None:
    assert classify(_with_sqlstate(code)) is Fault.AMBIGUOUS


def test_i11_a_client_side_operational_error_is_ambiguous() -> None:
    error = sa_exc.OperationalError("INSERT", {}, psycopg.OperationalError("too many params"))
    assert classify(error) is Fault.AMBIGUOUS


def test_i11_an_ambiguous_fault_is_waited_out_within_the_budget_or_while_the_db_is_sick() -> None:
    policy = RetryPolicy(attempts=1, stuck_budget=10.0)
    timeout = _with_sqlstate("57014")
    probes: list[bool] = []

    def healthy() -> bool:
        probes.append(True)
        return True

    within = policy.decide(timeout, 0, stuck_for=9.0, database_healthy=healthy)
    assert (within.action, within.counted) == (Action.RETRY, False)
    assert probes == []  # no probe while within the budget
    sick = policy.decide(timeout, 0, stuck_for=600.0, database_healthy=lambda: False)
    assert (sick.action, sick.counted) == (Action.RETRY, False)
    stuck = policy.decide(timeout, 0, stuck_for=10.0, database_healthy=healthy)
    assert (stuck.action, stuck.reason) == (Action.DEAD_LETTER, Reason.STUCK)


def test_i11_a_lost_connection_is_never_stuck() -> None:
    decision = RetryPolicy(stuck_budget=0).decide(_lost_connection(), 0, stuck_for=1e6)
    assert decision.action is Action.RETRY


class _Sync:
    def handle(self, session: Any, event: Any) -> None:
        return None


class _Async:
    async def handle(self, session: Any, event: Any) -> None:
        return None


class _Generator:
    def handle(self, session: Any, event: Any) -> Generator[None, None, None]:
        yield


class _AsyncGenerator:
    async def handle(self, session: Any, event: Any) -> Any:
        yield


def test_i11_handler_kinds_are_told_apart_and_generators_refused() -> None:
    assert handler_is_async(_Sync, _Sync.handle) is False
    assert handler_is_async(_Async, _Async.handle) is True
    for cls in (_Generator, _AsyncGenerator):
        with pytest.raises(HandlerMisdeclared, match="generator"):
            handler_is_async(cls, cls.handle)


def test_i11_a_plain_handler_returning_a_coroutine_or_generator_is_refused() -> None:
    async def later() -> None:
        return None

    def gen() -> Generator[None, None, None]:
        yield

    coroutine = later()
    with pytest.raises(HandlerMisdeclared, match="async def"):
        refuse_result(_Sync, coroutine)
    assert inspect.getcoroutinestate(coroutine) == "CORO_CLOSED"  # no "never awaited" warning
    with pytest.raises(HandlerMisdeclared):
        refuse_result(_Sync, gen())
    refuse_result(_Sync, None)
    refuse_result(_Sync, 42)  # any other value is ignored, as before


def _record(headers: tuple[tuple[str, bytes], ...], topic: str = "orders") -> Record:
    return Record(topic=topic, partition=0, offset=1, key=None, value=b"{}", headers=headers)


def test_i11_event_ids_are_not_stripped_so_foreign_ids_stay_distinct() -> None:
    assert outbox_event_id(_record((("outbox-event-id", b"a1 "),))) == "a1 "
    assert outbox_event_id(_record((("outbox-event-id", b"a1"),))) == "a1"
    assert outbox_event_id(_record((("outbox-event-id", b""),))) is None


def test_i11_a_users_own_dlt_headers_travel_with_the_dead_letter() -> None:
    record = _record((("dlt-tenant", b"acme"), ("dlt-reason", b"from an earlier dead letter")))
    headers = dead_letter_headers(
        record, group_id="g", key="k", error=ValueError("x"), attempts=1, reason=Reason.STUCK
    )
    assert ("dlt-tenant", b"acme") in headers
    assert [v for n, v in headers if n == "dlt-reason"] == ["stuck"]


def test_i11_a_compacted_topic_warns_unless_dedup_records_are_kept_forever() -> None:
    configs = {"cleanup.policy": "compact", "retention.ms": "604800000", "segment.ms": "1000"}
    warning = horizon_warning("orders", timedelta(days=14), configs)
    assert warning is not None
    assert "compact" in warning
    assert horizon_warning("orders", None, configs) is None


@pytest.mark.parametrize("name", ["consumer", "outbox"])
def test_i11_a_user_module_hiding_the_librarys_package_gets_an_error_that_says_so(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / f"{name}.py").write_text("class Projector: ...\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=f"has the name of kafka-outbox's own package '{name}'"):
        load_consumer_class(f"{name}:Projector")
