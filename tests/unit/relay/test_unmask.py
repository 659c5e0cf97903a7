"""``unmasked``: a Kafka error that confluent-kafka masked as a SystemError comes out as itself."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException

from outbox.relay.unmask import unmasked


def test_a_system_error_chained_from_a_kafka_error_is_raised_as_that_kafka_error() -> None:
    fenced = KafkaException(KafkaError(KafkaError._FENCED, fatal=True))
    with pytest.raises(KafkaException) as got, unmasked():
        raise SystemError("returned a result with an exception set") from fenced
    assert got.value is fenced
    assert got.value.args[0].code() == KafkaError._FENCED


def test_any_other_system_error_is_left_as_it_is() -> None:
    with pytest.raises(SystemError, match="unrelated"), unmasked():
        raise SystemError("unrelated") from ValueError("not Kafka")
