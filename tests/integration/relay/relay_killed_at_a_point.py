"""A relay process that SIGKILLs itself at the worst moment around the delivery record:
``after`` = right after its first Kafka commit returned, before
the database transaction that deleted and recorded the batch commits; ``before`` = with the
record's INSERT done and the Kafka transaction still open.

Run as ``python -m tests.integration.relay.relay_killed_at_a_point '<json RelayConfig fields>'``
with an extra ``when`` field. It never exits on its own: it kills itself or is killed.
"""

from __future__ import annotations

import json
import os
import signal
import sys

from outbox.relay import Relay
from outbox.relay.config import RelayConfig
from tests.integration.relay.faults import Faults, FaultyProducer


def main() -> None:
    fields = json.loads(sys.argv[1])
    when = fields.pop("when")

    def commit(producer: FaultyProducer, timeout: float) -> None:
        if when == "after":
            producer.real.commit_transaction(timeout)
        os.kill(os.getpid(), signal.SIGKILL)

    Relay(RelayConfig(**fields), seams=Faults(commit=commit).seams()).run()


if __name__ == "__main__":
    main()
