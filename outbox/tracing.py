"""W3C trace context across the outbox, via the OpenTelemetry API when it is installed.

The context is captured when the event is *written* (inside the request's
span), not when it is relayed, so one trace spans request -> outbox -> Kafka ->
handler. Without OpenTelemetry this costs one cached import check.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from functools import cache
from types import ModuleType
from typing import Any

TRACE_HEADERS = ("traceparent", "tracestate")
MAX_TRACE_HEADER = 512
"""W3C caps traceparent at 55 and tracestate at 512 characters: anything longer is not one."""

log = logging.getLogger("outbox.tracing")


@cache
def _propagate() -> ModuleType | None:
    try:
        from opentelemetry import propagate
    except ImportError:
        return None
    module: ModuleType = propagate
    return module


def current_trace_headers() -> list[tuple[str, bytes]]:
    """``traceparent``/``tracestate`` of the current span, or nothing outside a trace."""
    propagate = _propagate()
    if propagate is None:
        return []
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return [(name, carrier[name].encode()) for name in TRACE_HEADERS if name in carrier]


def _carrier(headers: Mapping[str, bytes | str]) -> dict[str, str]:
    carrier = {}
    for name in TRACE_HEADERS:
        value = headers.get(name)
        if value is None:
            continue
        text = value.decode("utf-8") if isinstance(value, bytes) else value
        if len(text) > MAX_TRACE_HEADER:
            raise ValueError(f"{name} is {len(text)} characters long")
        carrier[name] = text
    return carrier


def _extracted(propagate: Any, headers: Mapping[str, bytes | str]) -> Any | None:
    """The context the trace headers describe, or None (with a debug log) when they do not
    parse: a tracing header never fails the event that carries it (I10)."""
    from opentelemetry import trace

    try:
        ctx = propagate.extract(_carrier(headers))
        valid = trace.get_current_span(ctx).get_span_context().is_valid
    except Exception as exc:
        problem = str(exc)
    else:
        if valid:
            return ctx
        problem = "not a W3C traceparent"
    raw = headers.get("traceparent")
    log.debug("ignoring the trace context of an event (%s): traceparent=%.80r", problem, raw)
    return None


@contextlib.contextmanager
def restored_context(headers: Mapping[str, bytes | str]) -> Iterator[None]:
    """Run the block inside the trace context an event was written with (if it parses)."""
    propagate = _propagate()
    if propagate is None or "traceparent" not in headers:
        yield
        return
    from opentelemetry import context

    ctx = _extracted(propagate, headers)
    if ctx is None:
        yield
        return
    token = context.attach(ctx)
    try:
        yield
    finally:
        context.detach(token)
