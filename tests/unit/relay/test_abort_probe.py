"""The abort probe's memory of a cluster (pure: no answer needs a broker here)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from outbox.relay import abort_probe


@dataclass
class SilentBroker:
    """A transactional producer whose probe record gets no offset: no clear answer."""

    cluster_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    probes: int = 0

    def list_topics(self, topic: str, timeout: float) -> Any:
        return SimpleNamespace(cluster_id=self.cluster_id)

    def begin_transaction(self) -> None:
        self.probes += 1

    def produce(self, topic: str, *, on_delivery: Any, **_: Any) -> None:
        on_delivery(None, SimpleNamespace(offset=lambda: -1))

    def flush(self, timeout: float) -> int:
        return 0

    def abort_transaction(self, timeout: float) -> None:
        pass


def _ask(producer: SilentBroker, address: str = "broker:9092") -> bool | None:
    return abort_probe.aborts_hidden(
        producer, {}, "topic", 0, b"tid", timeout=1.0, remember_as=address
    )


def test_i12_a_cluster_without_a_clear_answer_is_not_probed_by_every_new_producer() -> None:
    """A slot restarting its producer again and again (fences, broker blips) must not wait the
    probe's timeout each time: the safe order holds for a while without asking."""
    first, second = SilentBroker(), SilentBroker()
    second.cluster_id = first.cluster_id

    assert _ask(first) is None  # no answer: the safe order (marker after every report)
    assert _ask(second) is None
    assert (first.probes, second.probes) == (1, 0)


def test_i12_no_clear_answer_from_one_cluster_does_not_spare_another_its_probe() -> None:
    first, other = SilentBroker(), SilentBroker()
    _ask(first)
    _ask(other)
    assert other.probes == 1
