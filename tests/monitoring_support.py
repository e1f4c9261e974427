"""Helpers for the monitoring tests (test_top, test_alerts, test_prometheus): traffic that keeps
flowing through a real tunnel, a status server to read.

Optional system tools (tmux, prometheus) go through conftest.need_tool: a skip here, a
failure in CI.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from conftest import Tunnel, TunnelFactory

STATUS_LINE = r"Status server listening on http://([\d.]+):(\d+)"


T = TypeVar("T")


def poll(what: str, check: Callable[[], T | None], timeout: float = 60.0, every: float = 0.2) -> T:
    """Call ``check()`` until it returns something truthy; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def start_with_status(tunnels: TunnelFactory, body: str | Path, **env: str) -> tuple[Tunnel, str]:
    """`pytunnel run` (a config's text or file) with a status server on a free loopback port:
    (tunnel, "HOST:PORT")."""
    conf = body if isinstance(body, Path) else tunnels.conf(body)
    t = tunnels.start(conf, mode="run", extra_env={"PYTUNNEL_STATUS": "127.0.0.1:0", **env})
    t.wait_for("Accepting new connections|All \\d+ workers accept connections")
    m = t.wait_for(STATUS_LINE)
    return t, f"{m.group(1)}:{m.group(2)}"


class Traffic:
    """Bounded load through TLS services until ``stop()`` (or ``seconds``, whichever first).

    ``stream(port)`` holds one TLS connection open and echoes 16 KiB chunks through it;
    ``churn(port)`` opens short TLS connections, each followed by a plain-text "handshake"
    that fails (protocol_error), so connections end and handshakes fail all the time.
    """

    def __init__(self, ca: Path, seconds: float = 240.0) -> None:
        self.ctx = ssl.create_default_context(cafile=str(ca))
        self.deadline = time.monotonic() + seconds
        self.done = threading.Event()
        self.threads: list[threading.Thread] = []
        self.streaming = 0  # streams whose TLS connection is up
        self.lock = threading.Lock()

    def _running(self) -> bool:
        return not self.done.is_set() and time.monotonic() < self.deadline

    def _spawn(self, target: Callable[[int], None], port: int) -> None:
        thread = threading.Thread(target=target, args=(port,), daemon=True)
        thread.start()
        self.threads.append(thread)

    def stream(self, port: int) -> None:
        self._spawn(self._stream, port)

    def churn(self, port: int) -> None:
        self._spawn(self._churn, port)

    def _stream(self, port: int) -> None:
        chunk = os.urandom(16384)
        with (
            socket.create_connection(("127.0.0.1", port), timeout=30) as raw,
            self.ctx.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            with self.lock:
                self.streaming += 1
            while self._running():
                s.sendall(chunk)
                got = 0
                while got < len(chunk):
                    data = s.recv(65536)
                    assert data, "the tunnel closed a stream"
                    got += len(data)
                self.done.wait(0.02)

    def _churn(self, port: int) -> None:
        while self._running():
            try:
                with (
                    socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                    self.ctx.wrap_socket(raw, server_hostname="localhost") as s,
                ):
                    s.sendall(b"ping")
                    s.recv(16)
                with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                    raw.sendall(b"HELO not-tls\r\n" * 8)
                    raw.recv(16)
            except OSError:
                pass
            self.done.wait(0.1)

    def stop(self) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(30)
