"""The relay daemon: moves committed outbox rows to Kafka, exactly once per slot.

- ``coordinator``: ``Relay``, which owns the slots (advisory locks), the LISTEN session and the
  recovery of each slot before its worker starts;
- ``worker``: ``SlotWorker``, one thread per slot: claim, produce, commit, delete; it is handed a
  ``SlotContext``, not its coordinator;
- ``batching``: pure decisions (fair share, claim-ahead, poll backoff);
- ``marker``: the recovery marker and the verdict on a marker read back (I4, I9);
- ``classify``: how each librdkafka error is answered (retry, bury, hold the topic, stop);
- ``config``: ``RelayConfig`` and the producer configuration rules;
- ``metrics``: the relay's Prometheus instruments; ``supervise``: restart the daemon as a child.

The names the old ``outbox.relay`` module had are re-exported here."""

from outbox.locks import COUNT_NAMESPACE, GUARD_NAMESPACE, SLOT_NAMESPACE
from outbox.relay.config import (
    Guarantee,
    ProducerPlan,
    Profile,
    RelayConfig,
)
from outbox.relay.coordinator import (
    MARKER_READ_TIMEOUT,
    Relay,
    notified_slot,
)
from outbox.relay.worker import (
    HEADER_ALLOWANCE,
    RelayStats,
    Row,
    SlotContext,
    SlotWorker,
    delete_recovered,
)

__all__ = [
    "COUNT_NAMESPACE",
    "GUARD_NAMESPACE",
    "HEADER_ALLOWANCE",
    "MARKER_READ_TIMEOUT",
    "SLOT_NAMESPACE",
    "Guarantee",
    "ProducerPlan",
    "Profile",
    "Relay",
    "RelayConfig",
    "RelayStats",
    "Row",
    "SlotContext",
    "SlotWorker",
    "delete_recovered",
    "notified_slot",
]
