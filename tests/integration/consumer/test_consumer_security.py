"""The consumer against a listener that requires SASL (Apache Kafka only)."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from consumer import Event, IdempotentConsumer
from outbox.errors import ConfigError
from tests.conftest import Broker
from tests.support import wait_for


class Ignore(IdempotentConsumer):
    def handle(self, session: Session, event: Event) -> None:
        pass


@pytest.mark.needs_apache_kafka
def test_i8_credentials_the_cluster_refuses_stop_the_consumer_naming_the_fix(
    engine: Engine, topic: str, broker: Broker
) -> None:
    """Before, a wrong SASL password logged a warning per backoff step forever, while the relay
    with the same mistake stopped at once with exit code 2."""
    secured = broker.cluster.sasl_client_config() | {"sasl.password": "NotThePassword"}
    bootstrap = secured.pop("bootstrap.servers")
    consumer = Ignore(engine, bootstrap, topics=[topic], group_id="refused", settings=secured)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            consumer.run()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: not thread.is_alive(), timeout=60, what="the consumer stopped")
    finally:
        consumer.stop.set()
        thread.join(30)
    [exc] = failure
    assert isinstance(exc, ConfigError)
    assert "refused the consumer's credentials" in str(exc)
    assert "NotThePassword" not in str(exc)
