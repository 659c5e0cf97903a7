"""Runnable examples for kafka-outbox (used by docker-compose.yml)."""
