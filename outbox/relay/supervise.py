"""``outbox relay --processes N``: one command that runs N relay processes.

One relay process is bound by the GIL; N processes split the slots between them
through the same advisory locks as relays on different hosts, so this needs no
new coordination. The supervisor restarts a child that dies and forwards
SIGTERM/SIGINT, so the children finish their batches before it exits.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

log = logging.getLogger("outbox.supervise")

# Options the supervisor handles itself and must not pass on: name -> takes a value.
_OWN_OPTIONS = {"--processes": True, "--metrics-port": True}


def child_argv(argv: Sequence[str]) -> list[str]:
    """The command line for a child: the same, without the supervisor's own options."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in _OWN_OPTIONS:
            skip = _OWN_OPTIONS[name] and "=" not in arg
            continue
        out.append(arg)
    return out


def child_env(base: dict[str, str], index: int, metrics_port: int | None) -> dict[str, str]:
    """Children run one process each; child i serves metrics on ``metrics_port + i``."""
    env = {**base, "OUTBOX_PROCESSES": "1"}
    env.pop("OUTBOX_METRICS_PORT", None)
    if metrics_port is not None:
        env["OUTBOX_METRICS_PORT"] = str(metrics_port + index)
    return env


def supervise(argv: Sequence[str], processes: int, metrics_port: int | None, once: bool) -> int:
    """Run ``processes`` relays until stopped; the exit code is the worst child's."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("%s: stopping %d relay processes", signal.Signals(signum).name, processes)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    command = [sys.executable, "-m", "outbox.cli", *child_argv(argv)]

    def spawn(i: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(command, env=child_env(dict(os.environ), i, metrics_port))

    children = [spawn(i) for i in range(processes)]
    restarts = [0] * processes
    not_before = [0.0] * processes
    worst = 0
    while not stop.is_set():
        running = 0
        for i, child in enumerate(children):
            code = child.poll()
            if code is None:
                running += 1
                continue
            if once:
                worst = max(worst, code)
                continue
            if time.monotonic() < not_before[i]:
                continue
            restarts[i] += 1
            log.warning("relay process %d exited with %s; starting it again", child.pid, code)
            not_before[i] = time.monotonic() + min(30.0, 2.0 ** restarts[i])
            children[i] = spawn(i)
            running += 1
        if once and running == 0:
            return worst
        stop.wait(0.5)
    for child in children:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
    for child in children:
        try:
            worst = max(worst, child.wait(120))
        except subprocess.TimeoutExpired:
            child.kill()
            worst = max(worst, 1)
    return worst
