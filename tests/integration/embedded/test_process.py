"""ProcessGroup, the process handling Tansu and the Kafka nodes share: a stop reaches every
process of the group, and a server that ignores SIGTERM is killed at the deadline."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
import time
from pathlib import Path

from outbox.embedded.process import ProcessGroup
from tests.support import wait_for

# A stand-in server: forks a child, reports both pids, ignores SIGTERM when told to.
_SERVER = textwrap.dedent(
    """
    import signal, subprocess, sys, threading
    if sys.argv[1] == "ignore-term":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    child = subprocess.Popen([sys.executable, "-c", "import threading; threading.Event().wait()"])
    print("pids", __import__("os").getpid(), child.pid, flush=True)
    threading.Event().wait()
    """
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is as good as gone
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


def _start(tmp_path: Path, mode: str) -> tuple[ProcessGroup, int]:
    output = tmp_path / "server.log"
    group = ProcessGroup(
        [sys.executable, "-c", _SERVER, mode], output=output, banner="--- start #1\n"
    )
    line = wait_for(
        lambda: next((x for x in output.read_text().splitlines() if x.startswith("pids")), ""),
        timeout=30,
        what="the server to report its pids",
    )
    _, leader, child = line.split()
    assert int(leader) == group.pid
    return group, int(child)


def test_sigterm_to_the_group_takes_the_servers_children_with_it(tmp_path: Path) -> None:
    group, child = _start(tmp_path, "plain")
    assert group.running
    assert _alive(child)
    group.send(signal.SIGTERM)
    group.reap(time.monotonic() + 10)
    assert group.proc.returncode == -signal.SIGTERM
    assert not group.running
    wait_for(lambda: not _alive(child), timeout=10, what="the forked child to die")
    assert (tmp_path / "server.log").read_text().startswith("--- start #1\n")


def test_a_server_ignoring_sigterm_is_killed_at_the_deadline(tmp_path: Path) -> None:
    group, child = _start(tmp_path, "ignore-term")
    group.send(signal.SIGTERM)
    started = time.monotonic()
    group.reap(started + 0.5)
    assert group.proc.returncode == -signal.SIGKILL
    assert time.monotonic() - started < 10
    wait_for(lambda: not _alive(child), timeout=10, what="the forked child to die")
    group.send(signal.SIGTERM)  # a stopped group: nothing to signal, nothing raised
    group.reap(time.monotonic())  # and reaping again is harmless
