"""Hypothesis profiles: the full suite's, and the inner loop's (``dev.py test --quick``).

Both drop Hypothesis's own timing checks (the per-example deadline and the too-slow health
check): on a machine whose other work takes a core they fail examples that are merely slow,
never a wrong answer. The quick profile runs a quarter of the examples; the full run keeps
every count the tests ask for.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings

SUITE = "suite"
QUICK = "quick"
QUICK_SHARE = 10  # the quick profile runs 1/QUICK_SHARE of the examples

settings.register_profile(SUITE, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile(
    QUICK,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    max_examples=100 // QUICK_SHARE,
)
settings.load_profile(SUITE)  # ``--hypothesis-profile=quick`` replaces it at configure


def examples(full: int) -> int:
    """``full`` examples in the full suite, its share in the quick profile (read when the test
    module is imported, after the profile is loaded)."""
    return max(1, full * settings().max_examples // 100)
