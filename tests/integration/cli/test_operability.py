"""Metrics, health endpoints, trace context capture, JSON logs."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Callable

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from outbox import publish
from outbox.cli.health import HealthServer
from outbox.logs import JsonFormatter
from tests.conftest import RelayHandle
from tests.support import wait_for


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_relay_serves_metrics_liveness_and_readiness(
    engine: Engine, topic: str, start_relay: Callable[..., RelayHandle]
) -> None:
    handle = start_relay(slots=2)
    relay = handle.relay
    server = HealthServer(
        host="127.0.0.1",
        port=0,
        registry=relay.metrics.registry,
        live=relay.liveness,
        ready=relay.readiness,
    ).start()
    try:
        assert _get(server.port, "/healthz")[0] == 200
        wait_for(lambda: _get(server.port, "/readyz")[0] == 200, what="relay ready")
        with Session(engine) as session, session.begin():
            for i in range(7):
                publish(session, topic=topic, key=str(i), value={"i": i})
        wait_for(lambda: relay.stats.published == 7, what="events published")
        status, body = _get(server.port, "/metrics")
        assert status == 200
        assert "outbox_relay_events_published_total 7.0" in body
        assert "outbox_relay_slots_owned 2.0" in body
        assert "outbox_relay_batch_size_count" in body
        assert "outbox_pending_rows" in body
        assert _get(server.port, "/nope")[0] == 404
        handle.stop()
        assert _get(server.port, "/healthz")[0] == 503
    finally:
        server.stop()


def test_pending_rows_and_lag_are_exported_per_topic(
    engine: Engine, topic: str, relay_config: Callable[..., object]
) -> None:
    from outbox.relay import Relay

    with Session(engine) as session, session.begin():
        for i in range(3):
            publish(session, topic=topic, key=str(i), value="v")
    relay = Relay(relay_config())  # type: ignore[arg-type]
    from prometheus_client import generate_latest

    body = generate_latest(relay.metrics.registry).decode()
    assert f'outbox_pending_rows{{topic="{topic}"}} 3.0' in body
    assert f'outbox_oldest_pending_age_seconds{{topic="{topic}"}}' in body


def test_trace_context_is_captured_when_the_event_is_written(engine: Engine) -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    provider = TracerProvider()
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("request") as span, Session(engine) as session:
        with session.begin():
            publish(session, topic="t", key="k", value="in a trace")
        trace_id = format(span.get_span_context().trace_id, "032x")
    with Session(engine) as session, session.begin():
        publish(session, topic="t", key="k", value="no trace")
    with engine.connect() as conn:
        rows = conn.execute(
            text("SELECT header_names, header_values FROM outbox_events ORDER BY id")
        ).all()
    traced = dict(zip(rows[0].header_names, map(bytes, rows[0].header_values), strict=True))
    assert trace_id in traced["traceparent"].decode()
    assert "traceparent" not in rows[1].header_names
    assert trace.get_current_span().get_span_context().is_valid is False


def test_json_logs_carry_context_and_never_secrets() -> None:
    record = logging.LogRecord(
        "outbox.relay",
        logging.WARNING,
        __file__,
        1,
        "cannot connect to postgresql://app:hunter2@db/app",
        None,
        None,
    )
    record.slot = 3
    line = json.loads(JsonFormatter().format(record))
    assert line["slot"] == 3
    assert line["level"] == "WARNING"
    assert "hunter2" not in json.dumps(line)
