"""Every PostgreSQL advisory lock key the outbox takes, in one place.

The relay, the operator commands (``outbox status``, ``outbox identity renew``) and the
migrations must agree on these numbers, and the commands must read them without importing
the relay (and its Kafka client). So they live here, a module that imports nothing.

Two-key locks ``pg_advisory_lock(namespace, n)`` show in ``pg_locks`` as ``classid =
namespace, objid = n, objsubid = 2``; the one-key migration lock shows as ``objsubid = 1``,
so it never meets a namespace even where the numbers are equal. Each namespace is four
ASCII letters read as a big-endian integer ('outb' = 0x6F757462), easy to spot in pg_locks.
"""

from __future__ import annotations

SLOT_NAMESPACE = 0x6F757462
"""'outb': ``(SLOT_NAMESPACE, slot)`` is held by the relay that owns the slot."""
COUNT_NAMESPACE = 0x6F757463
"""'outc': shared ``(COUNT_NAMESPACE, slots)`` locks announce each relay's slot count."""
GUARD_NAMESPACE = 0x6F757464
"""'outd': ``(GUARD_NAMESPACE, 0)`` serialises the slot-count check, announcing and settling."""
# Shared locks announcing the settings every relay of one outbox must share: a relay with
# another prefix or state topic neither fences the others nor reads their markers, and one
# with another guarantee publishes beside them without the recovery marker.
PREFIX_NAMESPACE = 0x6F757470
"""'outp': the transactional-id prefix in use (shared, with the prefix's crc32 as value)."""
STATE_TOPIC_NAMESPACE = 0x6F757473
"""'outs': the state topic in use (shared, with the topic's crc32 as value)."""
GUARANTEE_NAMESPACE = 0x6F757467
"""'outg': the delivery guarantee in use (shared, with its index as value)."""
UPKEEP_NAMESPACE = 0x6F757476
"""'outv': ``(UPKEEP_NAMESPACE, 0)`` serialises the delivery record's partition upkeep."""
MIGRATION_LOCK = 0x6F757464
"""One-key lock (``pg_advisory_xact_lock(MIGRATION_LOCK)``): one migrator at a time."""
