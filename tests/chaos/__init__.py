"""Chaos test of the whole pipeline: writers, relays and consumers under seeded faults.

``python -m tests.chaos --events N --seconds S --seed X`` runs it (see
docs/chaos.md); ``tests/acceptance/test_chaos.py`` runs it at a small size.
"""
