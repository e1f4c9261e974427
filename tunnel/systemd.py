"""systemd integration in the standard library: sd_notify and socket activation.

``Type=notify``: when ``NOTIFY_SOCKET`` is set, pytunnel sends ``READY=1`` once it
accepts connections, ``RELOADING=1`` (with ``MONOTONIC_USEC``, as ``Type=notify-reload``
wants) then ``READY=1`` around a SIGHUP reload, ``STOPPING=1`` when it starts draining,
and a ``STATUS=`` line with each.

Socket activation: when ``LISTEN_PID`` is this process, the ``LISTEN_FDS`` sockets
starting at fd 3 are used instead of binding; each is matched to the service whose
``accept`` address it is bound to (``LISTEN_FDNAMES`` may name the service instead).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Mapping

SD_LISTEN_FDS_START = 3


def notify(*lines: str, env: Mapping[str, str] | None = None) -> bool:
    """Send ``lines`` to ``NOTIFY_SOCKET``; False when there is none (or it fails)."""
    env = os.environ if env is None else env
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto("\n".join(lines).encode(), address)
    except OSError:
        return False
    return True


def ready(status: str) -> bool:
    return notify("READY=1", f"STATUS={status}")


def reloading() -> bool:
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}", "STATUS=Reloading the configuration")


def stopping(status: str) -> bool:
    return notify("STOPPING=1", f"STATUS={status}")


class Activation:
    """The sockets systemd passed in, taken one by one as services claim them."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self.sockets: list[tuple[socket.socket, str]] = []
        if env.get("LISTEN_PID") != str(os.getpid()):
            return
        try:
            count = int(env.get("LISTEN_FDS", "0"))
        except ValueError:
            return
        names = env.get("LISTEN_FDNAMES", "").split(":")
        for i in range(count):
            fd = SD_LISTEN_FDS_START + i
            try:
                sock = socket.socket(fileno=fd)
            except OSError:
                continue
            os.set_inheritable(fd, False)
            self.sockets.append((sock, names[i] if i < len(names) else ""))
        # children (exec = ..., workers) must not think these are theirs
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            with contextlib.suppress(KeyError):
                del os.environ[var]

    def take(self, service: str, host: str | None, port: int, path: str | None) -> socket.socket | None:
        """The passed socket for this accept address (or named after the service), if any."""
        for i, (sock, name) in enumerate(self.sockets):
            if _matches(sock, name, service, host, port, path):
                del self.sockets[i]
                return sock
        return None

    def leftovers(self) -> list[str]:
        out = []
        for sock, name in self.sockets:
            with contextlib.suppress(OSError):
                out.append(f"fd {sock.fileno()} ({name or _sockname(sock)})")
        return out


def _sockname(sock: socket.socket) -> str:
    try:
        addr = sock.getsockname()
    except OSError:
        return "?"
    if isinstance(addr, tuple):
        return f"{addr[0]}:{addr[1]}"
    return str(addr)


def _matches(
    sock: socket.socket, name: str, service: str, host: str | None, port: int, path: str | None
) -> bool:
    try:
        addr = sock.getsockname()
    except OSError:
        return False
    if path is not None:
        return sock.family == socket.AF_UNIX and addr == path
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(addr, tuple):
        return False
    if name and name == service and (port == 0 or addr[1] == port):
        return True
    if addr[1] != port:
        return False
    if host in (None, "", "0.0.0.0", "::"):  # noqa: S104 - any-address accept
        return True
    try:
        wanted = {info[4][0] for info in socket.getaddrinfo(host, port, sock.family, socket.SOCK_STREAM)}
    except OSError:
        return False
    return addr[0] in wanted
