"""A TCP forwarder for tests: one local address in front of a real server.

It stands for what lies between a client and its server in production: a DNS name or a load
balancer that another server can answer behind (``switch``), or a slow network (``delay``:
each chunk of bytes is held that long, in both directions). No protocol is touched.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator


class Forwarder:
    """127.0.0.1:port forwarding every connection to ``target`` (``host:port``, the first of a
    comma-separated list)."""

    def __init__(self, target: str, *, delay: float = 0.0) -> None:
        self.target = target
        self.delay = delay
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.address = f"127.0.0.1:{self.port}"
        self.sockets: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, name="forwarder", daemon=True).start()

    def switch(self, target: str) -> None:
        """Point the address at ``target``; connections made before are cut."""
        with self.lock:
            self.target = target
            cut, self.sockets = self.sockets, []
        for sock in cut:
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        self.server.close()
        self.switch(self.target)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            with self.lock:
                host, port = self.target.split(",")[0].strip().rsplit(":", 1)
            try:
                upstream = socket.create_connection((host, int(port)), timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                if self.delay:
                    time.sleep(self.delay)  # the injected latency, not a synchronisation
                b.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@contextlib.contextmanager
def forwarding(target: str, *, delay: float = 0.0) -> Iterator[Forwarder]:
    forward = Forwarder(target, delay=delay)
    try:
        yield forward
    finally:
        forward.close()
