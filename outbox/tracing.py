"""W3C trace context across the outbox, via the OpenTelemetry API when it is installed.

The context is captured when the event is *written* (inside the request's
span), not when it is relayed, so one trace spans request -> outbox -> Kafka ->
handler. Without OpenTelemetry this costs one cached import check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from functools import cache
from types import ModuleType

TRACE_HEADERS = ("traceparent", "tracestate")


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


@contextlib.contextmanager
def restored_context(headers: Mapping[str, bytes | str]) -> Iterator[None]:
    """Run the block inside the trace context an event was written with."""
    propagate = _propagate()
    if propagate is None or "traceparent" not in headers:
        yield
        return
    from opentelemetry import context

    carrier = {
        k: v.decode() if isinstance(v, bytes) else v
        for k, v in headers.items()
        if k in TRACE_HEADERS
    }
    token = context.attach(propagate.extract(carrier))
    try:
        yield
    finally:
        context.detach(token)
