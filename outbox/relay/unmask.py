"""confluent-kafka's errors as themselves, when one of its callbacks masked them.

While a call such as ``flush()`` has a ``KafkaException`` pending (a fenced producer's fatal
error), confluent-kafka may still serve a Python callback (the ``logger`` setting, a delivery
report). Python then raises ``SystemError: ... returned a result with an exception set``,
chained from the real error: the fencing reached the worker as a crash with a traceback instead
of a lost slot. ``unmasked()`` raises the real error.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from confluent_kafka import KafkaException


@contextmanager
def unmasked() -> Iterator[None]:
    try:
        yield
    except SystemError as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, KafkaException):
            raise cause from None
        raise
