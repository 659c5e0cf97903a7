"""The relay daemon: moves committed outbox rows to Kafka, exactly once per slot.

- ``coordinator``: ``Relay``, which coordinates: lifecycle, the slots it owns (advisory locks),
  their workers, health;
- ``layout``: the outbox identity and the slot layout the relays of one outbox agree on;
- ``marker_reader``: reads a slot's last recovery marker back (``MarkerReader``);
- ``kafka_probe``: Kafka at start (settings, reachability, state topic);
- ``database``: the relay's PostgreSQL sessions (``ControlSession``, ``Connector``);
- ``listen``: NOTIFY wake-ups; ``backoff``: the one retry delay rule;
- ``worker``: ``SlotWorker``, one thread per slot: claim, produce, commit, delete; it is handed a
  ``SlotContext``, not its coordinator;
- ``seams``: the Protocols of what a worker uses of Kafka (``KafkaProducer``) and of its database
  (``SlotSession``, over psycopg in ``slot_session``), and ``Seams``, the factories a ``Relay``
  is given (the real clients by default);
- ``plans``: what a batch's failures mean, as a plan (bury, hold, narrow, raise); pure;
- ``publishers``: one publisher per delivery guarantee (exactly-once, at-least-once, at-most-once);
- ``rows``: the claimed ``Row`` and why no record can be built from some (the advisory-lock
  namespaces are in ``outbox.locks``, which the CLI reads without the relay);
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
from outbox.relay.coordinator import Relay
from outbox.relay.listen import notified_slot
from outbox.relay.marker_reader import MARKER_READ_TIMEOUT
from outbox.relay.seams import KafkaProducer, Seams, SlotSession
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
    "KafkaProducer",
    "ProducerPlan",
    "Profile",
    "Relay",
    "RelayConfig",
    "RelayStats",
    "Row",
    "Seams",
    "SlotContext",
    "SlotSession",
    "SlotWorker",
    "delete_recovered",
    "notified_slot",
]
