"""Loopback peers and probes the suites share: a base for threaded servers (plain or TLS),
a backend that answers with its tag, free ports, waiting for a port to listen, and the
"refused" check (the tunnel closed or reset the app's connection, relaying nothing).

Kept apart from conftest.py so the fixtures there stay few; the test files import these.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path
from typing import Any


class Listener:
    """Base for threaded loopback servers, plain or TLS (``cert``): ``handle(s)`` runs in a thread
    per connection with a socket or, with ``cert``, an SSLSocket after the handshake.
    ``on_accept(conn)`` runs in the accept thread first (for counts that must not lag).
    An exception a connection ends with is kept in ``errors`` (its repr)."""

    timeout: float = 120.0  # each connection's socket timeout

    def __init__(
        self, cert: Path | None = None, backlog: int = 256, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.ctx: ssl.SSLContext | None = None
        if cert is not None:
            self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.ctx.load_cert_chain(str(cert))
        self.errors: list[str] = []
        self.connections = 0
        self.handshakes = 0
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(backlog)
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self.on_accept(conn)
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        s: Any = conn
        try:
            conn.settimeout(self.timeout)
            if self.ctx is not None:
                s = self.ctx.wrap_socket(conn, server_side=True)
                self.handshakes += 1
            self.handle(s)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self.errors.append(repr(exc))
        finally:
            s.close()
            conn.close()

    def on_accept(self, conn: socket.socket) -> None:
        """Called in the accept thread for each new connection, before ``handle``."""

    def handle(self, s: Any) -> None:
        raise NotImplementedError

    @staticmethod
    def end(s: Any) -> None:
        """Our side is done: close_notify (TLS) or a FIN (plain)."""
        with contextlib.suppress(OSError, ssl.SSLError, ValueError):
            if isinstance(s, ssl.SSLSocket):
                s.unwrap()
            else:
                s.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()


class TagServer(Listener):
    """A backend that answers every connection with its tag, then echoes one read."""

    def __init__(self, tag: bytes, host: str = "127.0.0.1", port: int = 0) -> None:
        self.tag = tag
        super().__init__(host=host, port=port)

    def handle(self, s: Any) -> None:
        s.sendall(self.tag)
        with contextlib.suppress(OSError):
            s.sendall(s.recv(1000))

    @property
    def count(self) -> int:
        return self.connections


_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port of ``host`` nobody uses at the moment (connect() to it is refused), and never
    one this process handed out before: the kernel may give the same free port to two binds
    in a row, and `port, status = free_port(), free_port()` must be two ports."""
    while True:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 20) -> None:
    """Poll until ``proc`` (``what``) listens on the loopback ``port``; fail if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        assert proc.poll() is None, f"{what} exited {proc.returncode}"
        assert time.monotonic() < deadline, f"{what} did not listen on {port} within {timeout:g} s"
        time.sleep(0.05)


def refused(port: int, half_close: bool = False) -> bool:
    """True when the tunnel closes (or resets) the app's connection relaying nothing back;
    ``half_close``: the app sends its FIN after its few bytes (a client-mode tunnel may
    wait for it)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
            s.sendall(b"hello")
            if half_close:
                s.shutdown(socket.SHUT_WR)
            return s.recv(100) == b""
    except ConnectionError:
        return True
