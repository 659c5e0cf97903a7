"""Process plumbing shared by the throwaway servers (`servers`, `kafka_cluster`).

- `Service`: the context-manager and interpreter-exit cleanup every server class has;
- `ProcessGroup`: a server process in its own process group, with its output file and a
  watchdog, stopped by signalling the whole group;
- `Watchdog`: a tiny separate process that kills a service (and removes its files) if the
  Python process that started it dies without stopping it, e.g. when CI kills a hung run.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

__all__ = ["ProcessGroup", "Service", "Watchdog"]


# --------------------------------------------------------------------------- watchdog

# Runs in a separate process: blocks on a pipe whose only write end lives in the owning
# Python process. EOF without the "disarm" word means the owner died without stopping
# the service, so the watchdog kills the service and removes its files.
_WATCHDOG_SCRIPT = r"""
import json, os, shutil, signal, sys, time
signal.signal(signal.SIGINT, signal.SIG_IGN)
spec = json.loads(sys.argv[2])
fd = int(sys.argv[3])
seen = b""
while True:
    chunk = os.read(fd, 64)
    if not chunk:
        break
    seen += chunk
    if b"disarm" in seen:
        sys.exit(0)

def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

pidfile = spec.get("pidfile")
if pidfile:
    try:
        with open(pidfile) as f:
            pid = int(f.readline())
    except (OSError, ValueError):
        pid = 0
    if pid > 0 and alive(pid):
        os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + 10
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
pgid = spec.get("pgid")
if pgid:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass
if spec.get("rmtree"):
    # Dying server processes may still be writing into the tree: retry for a while.
    for _ in range(40):
        shutil.rmtree(spec["rmtree"], ignore_errors=True)
        if not os.path.lexists(spec["rmtree"]):
            break
        time.sleep(0.25)
"""


class Watchdog:
    """Cleans up a service if its owner is SIGKILLed, which atexit cannot cover."""

    def __init__(
        self, *, pidfile: Path | None = None, pgid: int | None = None, rmtree: Path | None = None
    ) -> None:
        spec = {
            "pidfile": str(pidfile) if pidfile else None,
            "pgid": pgid,
            "rmtree": str(rmtree) if rmtree else None,
        }
        self._write_fd: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        if not sys.executable:
            return  # embedded interpreter without a python binary: rely on atexit only
        read_fd, write_fd = os.pipe()
        try:
            # The script comes in on stdin so `ps` shows a readable command line.
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-I",
                    "-",
                    "kafka-outbox-watchdog",
                    json.dumps(spec),
                    str(read_fd),
                ],
                pass_fds=(read_fd,),
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # Ctrl-C in a terminal must not kill it first
            )
            assert self._proc.stdin is not None
            self._proc.stdin.write(_WATCHDOG_SCRIPT.encode())
            self._proc.stdin.close()
        except OSError:
            os.close(write_fd)
            return
        finally:
            os.close(read_fd)
        self._write_fd = write_fd

    def disarm(self) -> None:
        if self._write_fd is not None:
            with contextlib.suppress(OSError):
                os.write(self._write_fd, b"disarm")
            os.close(self._write_fd)
            self._write_fd = None
        if self._proc is not None:
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None


# --------------------------------------------------------------------------- lifecycle


class Service(abc.ABC):
    """A server that `with` starts and stops, and that is stopped at interpreter exit too.

    Subclasses call `_register_atexit()` when `start()` begins to own resources and
    `_unregister_atexit()` once `_shut_down()` has released them; a SIGKILLed owner, which
    atexit cannot cover, is the watchdog's job.
    """

    _atexit_registered = False

    @abc.abstractmethod
    def start(self) -> Self:
        """Start (or restart) the server and wait until it is ready."""

    @abc.abstractmethod
    def _shut_down(self) -> None:
        """Stop everything and remove the files: what `with` and interpreter exit call."""

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._shut_down()

    def _register_atexit(self) -> None:
        if not self._atexit_registered:
            atexit.register(self._shut_down)
            self._atexit_registered = True

    def _unregister_atexit(self) -> None:
        if self._atexit_registered:
            atexit.unregister(self._shut_down)
            self._atexit_registered = False


class ProcessGroup:
    """A server process started in its own process group, appending to `output`.

    Signals go to the whole group, so whatever the server forks goes down with it; a
    watchdog kills the group (and removes `rmtree`) if this Python process dies first.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        output: Path,
        banner: str,
        env: Mapping[str, str] | None = None,
        rmtree: Path | None = None,
    ) -> None:
        self._output = output.open("ab")
        try:
            self._output.write(banner.encode())
            self._output.flush()
            self.proc = subprocess.Popen(
                list(args),
                stdin=subprocess.DEVNULL,
                stdout=self._output,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # its own process group, for send() and the watchdog
            )
        except BaseException:
            self._output.close()
            raise
        self._watchdog = Watchdog(pgid=self.proc.pid, rmtree=rmtree)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def send(self, sig: signal.Signals) -> None:
        """Signal the group, if its leader is still running."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def reap(self, deadline: float) -> None:
        """Wait for the leader until `deadline`, then SIGKILL the group; disarm the watchdog
        and close the output file. Safe to call again."""
        try:
            self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._watchdog.disarm()
        self._output.close()
