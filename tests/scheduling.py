"""The order xdist hands the tests out: the longest unit of work first, from measured durations.

With a few workers and a few tests that take a minute or more, the run ends when the last long
test ends: started last, it runs alone while the other workers are idle (the long tail). Started
first, it runs beside the many short ones. So `tests/conftest.py` orders the collection by the
expected seconds of each xdist unit (a group of `xdist_group_of`, or one test), longest first,
and `BrokerGroups` hands the units out in that order (longest processing time first).

The expected seconds come from the last run on this checkout (pytest's cache, written at the
end of every xdist run) over `durations.json` (committed, so that a clean clone, e.g. CI, orders
its first run too). ``python -m tests.scheduling`` rewrites `durations.json` from the cache.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

DURATIONS_FILE = Path(__file__).with_name("durations.json")
CACHE_KEY = "outbox/durations"
"""Where a run leaves the seconds of every test it ran (setup + call + teardown), in pytest's
cache (``.pytest_cache/v/outbox/durations``)."""

UNKNOWN_SECONDS = 1.0
"""A test never measured (new, renamed): after the long ones, before the many short unit tests."""
UNIT_TEST_SECONDS = 0.05
KEPT_SECONDS = 2.0
"""`durations.json` keeps the tests that took at least this long: the rest is short enough for
any order."""


def expected_seconds(nodeid: str, measured: Mapping[str, float]) -> float:
    """How long a test should take: its last measurement, else a guess from where it lives."""
    if nodeid in measured:
        return measured[nodeid]
    return UNIT_TEST_SECONDS if nodeid.startswith("tests/unit/") else UNKNOWN_SECONDS


def longest_first(
    nodeids: Sequence[str], unit_of: Callable[[str], str], measured: Mapping[str, float]
) -> list[int]:
    """The indexes of ``nodeids`` in the order to hand them out: units by their expected seconds
    (the sum of their tests), longest first; the tests of a unit together, in their own order;
    ties in the order given (sorting is stable)."""
    totals: dict[str, float] = {}
    first_seen: dict[str, int] = {}
    for index, nodeid in enumerate(nodeids):
        unit = unit_of(nodeid)
        totals[unit] = totals.get(unit, 0.0) + expected_seconds(nodeid, measured)
        first_seen.setdefault(unit, index)
    return sorted(
        range(len(nodeids)),
        key=lambda i: (-totals[unit_of(nodeids[i])], first_seen[unit_of(nodeids[i])], i),
    )


def merged(committed: Mapping[str, float], last_run: Mapping[str, float]) -> dict[str, float]:
    """The committed durations, overridden by those of the last run on this checkout."""
    return {**committed, **last_run}


def kept(durations: Mapping[str, float]) -> dict[str, float]:
    """What `durations.json` holds: the tests of at least `KEPT_SECONDS`, rounded, sorted."""
    return {
        nodeid: round(seconds, 1)
        for nodeid, seconds in sorted(durations.items())
        if seconds >= KEPT_SECONDS
    }


def read_committed(path: Path = DURATIONS_FILE) -> dict[str, float]:
    """`durations.json`, or nothing when it is missing or unreadable (the order is only a
    speed-up: a bad file must not stop a test run)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): float(v) for k, v in data.items() if isinstance(v, int | float)}


def main(argv: list[str]) -> int:
    """Rewrite `durations.json` from the last xdist run's cache (``python -m tests.scheduling``)."""
    cache = Path(argv[0]) if argv else Path(".pytest_cache/v") / CACHE_KEY
    try:
        last_run = json.loads(cache.read_text())
    except (OSError, ValueError) as exc:
        print(f"no durations in {cache} ({exc}): run `python3 dev.py test` first", file=sys.stderr)
        return 1
    durations = kept(merged(read_committed(), last_run))
    DURATIONS_FILE.write_text(json.dumps(durations, indent=1) + "\n")
    print(f"{DURATIONS_FILE}: {len(durations)} tests of {KEPT_SECONDS:.0f} s or more")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
