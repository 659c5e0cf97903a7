"""The one rule that names a slot's Kafka ``transactional.id``: ``<prefix>-<slot>``.

Pure and relay-free, so the relay, its recovery and ``outbox status`` (which shows the default
prefix) cannot drift apart: a relay that named a slot differently would neither fence the
slot's previous owner (I4) nor find its recovery marker.
"""

from __future__ import annotations

import uuid


def default_prefix(outbox_id: uuid.UUID) -> str:
    """``outbox-<first 12 hex digits of the identity>``: 48 random bits per outbox, so two
    outboxes sharing a Kafka cluster with default settings never fence each other (I9)."""
    return f"outbox-{outbox_id.hex[:12]}"


def prefix_of(explicit: str | None, outbox_id: uuid.UUID) -> str:
    """The prefix given with ``--transactional-id-prefix``, else the outbox's default."""
    return explicit or default_prefix(outbox_id)


def transactional_id(prefix: str, slot: int | str) -> str:
    """Stable per slot, so a new owner of the slot fences the previous one (I4)."""
    return f"{prefix}-{slot}"
