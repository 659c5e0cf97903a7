"""I3: the advisory lock keys of slots, slot counts and the announced settings never meet."""

from __future__ import annotations

from outbox import locks


def test_i3_every_two_key_lock_namespace_is_distinct() -> None:
    namespaces = [
        value
        for name, value in vars(locks).items()
        if name.endswith("_NAMESPACE") and isinstance(value, int)
    ]
    assert len(namespaces) == 7
    assert len(set(namespaces)) == len(namespaces)
    assert all(0 < n < 2**31 for n in namespaces)  # pg_advisory_lock(int4, int4)
