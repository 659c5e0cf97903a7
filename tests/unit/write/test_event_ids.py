"""publish()'s own event ids: UUIDv7s that increase within a process and never repeat, so the
delivery record's and the consumers' indexes append; a caller's own id of any version works."""

from __future__ import annotations

import ctypes
import itertools
import os
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from outbox.codec import encode_event
from outbox.event_ids import TAIL_BITS, EventIds, compose, new_event_id, random_start
from outbox.partitioner import SHARD_COUNT, shard_for


def _scripted(values: list[int]) -> Callable[[], int]:
    it: Iterator[int] = iter(values)
    return lambda: next(it)


def test_ids_are_version_7_of_the_rfc_variant_and_carry_the_time() -> None:
    before = time.time_ns() // 1_000_000
    event_id = new_event_id()
    after = time.time_ns() // 1_000_000
    assert event_id.version == 7
    assert event_id.variant == uuid.RFC_4122
    assert before <= event_id.int >> 80 <= after


def test_ids_strictly_increase_as_postgresql_orders_uuids() -> None:
    """PostgreSQL compares uuids byte by byte: the order of ``bytes``."""
    ids = [new_event_id() for _ in range(50_000)]
    assert all(a.bytes < b.bytes for a, b in itertools.pairwise(ids))


def test_ids_count_on_within_a_millisecond_and_when_the_clock_goes_back() -> None:
    ms = 1_700_000_000_000
    clock = [ms * 1_000_000, ms * 1_000_000 + 5, (ms - 3) * 1_000_000, (ms + 1) * 1_000_000]
    ids = EventIds(now_ns=_scripted(clock), start=_scripted([100, 7]))
    made = [ids() for _ in clock]
    assert made == [compose(ms, 100), compose(ms, 101), compose(ms, 102), compose(ms + 1, 7)]
    assert made == sorted(made)


def test_a_full_millisecond_borrows_the_next_one() -> None:
    ms = 1_700_000_000_000
    top = (1 << TAIL_BITS) - 1
    ids = EventIds(now_ns=_scripted([ms * 1_000_000] * 2), start=_scripted([top, 9]))
    assert [ids(), ids()] == [compose(ms, top), compose(ms + 1, 9)]


def test_the_random_start_leaves_room_to_count() -> None:
    starts = [random_start() for _ in range(1000)]
    assert all(0 <= s < 1 << (TAIL_BITS - 1) for s in starts)
    assert max(starts) > 1 << (TAIL_BITS - 4)  # random over 73 bits, not a small number


def test_compose_refuses_what_does_not_fit() -> None:
    with pytest.raises(ValueError, match="out of range"):
        compose(1 << 48, 0)
    with pytest.raises(ValueError, match="out of range"):
        compose(0, 1 << TAIL_BITS)


def test_ids_are_unique_and_increasing_across_threads() -> None:
    per_thread, threads = 20_000, 8
    made: list[list[uuid.UUID]] = [[] for _ in range(threads)]
    go = threading.Barrier(threads)

    def make(out: list[uuid.UUID]) -> None:
        go.wait()
        out.extend(new_event_id() for _ in range(per_thread))

    workers = [threading.Thread(target=make, args=(out,)) for out in made]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len({u for out in made for u in out}) == per_thread * threads
    for out in made:
        assert all(a < b for a, b in itertools.pairwise(out))


def _libc_fork() -> int:
    """fork() as C code calls it (an embedding server, a C extension): Python's at-fork
    handlers do not run in the child. ``PyDLL`` keeps the GIL during the call (``CDLL`` would
    let another thread take it, and the child would wait for that thread forever)."""
    libc = ctypes.PyDLL(None, use_errno=True)
    pid = int(libc.fork())
    if pid < 0:
        raise OSError(ctypes.get_errno(), "fork")
    return pid


def _children_ids(fork: Callable[[], int]) -> tuple[set[uuid.UUID], set[uuid.UUID]]:
    """100 ids made by the parent and 100 by a child ``fork`` made, on a frozen clock (both
    count within one millisecond) after the parent made one."""
    frozen = 1_700_000_000_000 * 1_000_000
    ids = EventIds(now_ns=lambda: frozen)
    ids()  # the parent has a last id the child inherits
    read, write = os.pipe()
    pid = fork()
    if pid == 0:  # the child: send its ids and leave at once
        try:
            os.write(write, b"".join(ids().bytes for _ in range(100)))
        finally:
            os._exit(0)
    os.close(write)
    parent = {ids() for _ in range(100)}
    data = b""
    deadline = time.monotonic() + 60
    try:
        while True:
            ready, _, _ = select.select([read], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                pytest.fail(f"the forked child {pid} sent {len(data)} of 1600 bytes in 60 s")
            if not (chunk := os.read(read, 65536)):
                break
            data += chunk
    finally:
        os.close(read)
        if len(data) < 1600:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return parent, {uuid.UUID(bytes=data[i : i + 16]) for i in range(0, len(data), 16)}


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_does_not_make_its_parents_next_ids() -> None:
    """A child copies its parent's last id: counting on from it would repeat the parent's next
    ids."""
    parent, child = _children_ids(os.fork)
    assert len(child) == 100
    assert not parent & child


def _ids_of_a_child_forked_by_c_code() -> None:
    """Run in a fresh interpreter (see the test below): prints the parent's and the child's
    ids as two lines of hex."""
    parent, child = _children_ids(_libc_fork)
    for ids in (parent, child):
        print(" ".join(sorted(u.hex for u in ids)))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs libc fork")
def test_a_child_forked_by_c_code_does_not_make_its_parents_next_ids() -> None:
    """A process forked by C code runs none of Python's at-fork handlers: the ids must still
    notice that they are another process's now, or parent and child make the same ids (the
    consumers would drop one of two events as a duplicate).

    The fork happens in a fresh, single-threaded interpreter: in this one, the test runner's
    threads take part in the GIL's hand-over, and a child forked behind Python's back waits
    forever for a thread it does not have (it did, in CI, in 9 of 200 forks with the GIL held).
    """
    code = f"from {__name__} import _ids_of_a_child_forked_by_c_code as f; f()"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).parents[3],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    parent, child = ({uuid.UUID(h) for h in line.split()} for line in done.stdout.splitlines())
    assert len(parent) == len(child) == 100
    assert not parent & child


def test_unkeyed_events_with_these_ids_spread_over_every_shard() -> None:
    counts = [0] * SHARD_COUNT
    for _ in range(SHARD_COUNT * 200):
        counts[shard_for(None, new_event_id())] += 1
    assert min(counts) > 100  # 200 each on average


def test_publish_makes_v7_ids_and_keeps_a_callers_own_id_of_any_version() -> None:
    common = {"topic": "orders", "key": None, "value": None, "headers": None}
    made = encode_event(**common, event_id=None, max_message_bytes=None)  # type: ignore[arg-type]
    assert made.event_id.version == 7
    for own in (uuid.uuid4(), uuid.uuid1(), uuid.UUID(int=5)):
        event = encode_event(**common, event_id=own, max_message_bytes=None)  # type: ignore[arg-type]
        assert event.event_id == own
