"""Throwaway servers for the demo, the tests and the benchmarks: never for production.

- ``servers``: ``EmbeddedPostgres`` and ``EmbeddedBroker`` (Tansu);
- ``kafka_cluster``: a 3-node Apache Kafka KRaft cluster fetched with Maven;
- ``demo``: ``outbox demo``, the whole path end to end on these servers;
- ``process``: the start/stop/watchdog plumbing the server classes share.

The names the old ``outbox.embedded`` module had are re-exported here."""

from outbox.embedded.servers import (
    BrokerNotFoundError,
    EmbeddedBroker,
    EmbeddedPostgres,
    EmbeddedServiceError,
    PostgresNotFoundError,
    free_port,
)

__all__ = [
    "BrokerNotFoundError",
    "EmbeddedBroker",
    "EmbeddedPostgres",
    "EmbeddedServiceError",
    "PostgresNotFoundError",
    "free_port",
]
