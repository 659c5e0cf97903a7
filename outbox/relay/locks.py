"""The advisory-lock namespaces of a relay's slots (the first key of ``pg_advisory_lock``)."""

SLOT_NAMESPACE = 0x6F757462  # 'outb': advisory lock class for slots
GUARD_NAMESPACE = 0x6F757464  # 'outd': serialises the slot-count check, announcement, settling
