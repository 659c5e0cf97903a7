"""Consumer settings that make a fresh group quick on the throwaway servers.

Shared by ``outbox demo``, ``outbox dev`` and the pytest plugin, so a consumer run against
them joins in seconds and sees millisecond latency without ``-X`` settings copied by hand.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

QUICK_JOIN: Mapping[str, str] = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "1000"}
"""A short session timeout: the group join takes ~3 s on Tansu instead of ~23 s (Apache
Kafka accepts it too: 6000 ms is its ``group.min.session.timeout.ms``)."""

TANSU_FETCH: Mapping[str, str] = {"fetch.wait.max.ms": "5"}
"""Tansu answers a fetch only when fetch.wait.max.ms (500 ms) expires, where Kafka answers as
soon as a record arrives: without this every record waits for Tansu's long poll."""


NEW_TOPICS: Mapping[str, str] = {"topic.metadata.refresh.interval.ms": "1000"}
"""A consumer started before its topic exists (the usual order in development: no event
published yet) sees the topic within a second of its first record, not after librdkafka's
5-minute metadata refresh."""


def consumer_settings(*, tansu: bool) -> dict[str, str]:
    """The librdkafka consumer settings for a group on these servers."""
    return {**QUICK_JOIN, **NEW_TOPICS, **(TANSU_FETCH if tansu else {})}


def write_settings_file(path: Path, settings: Mapping[str, str]) -> Path:
    """``key=value`` lines, the format of ``outbox consume --consumer-config``."""
    lines = ["# consumer settings for the throwaway servers of `outbox dev`"]
    lines += [f"{key}={value}" for key, value in sorted(settings.items())]
    path.write_text("\n".join(lines) + "\n")
    return path
