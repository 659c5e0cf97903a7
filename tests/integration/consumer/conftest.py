"""Fixtures shared by the consumer's integration tests (defined beside the I5/I7 tests)."""

from tests.integration.consumer.test_consumer_effects import env, start_consumer

__all__ = ["env", "start_consumer"]
