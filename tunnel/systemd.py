"""systemd integration in the standard library: sd_notify and socket activation.

``Type=notify``: when ``NOTIFY_SOCKET`` is set, pytunnel sends ``READY=1`` once it
accepts connections, ``RELOADING=1`` (with ``MONOTONIC_USEC``, as ``Type=notify-reload``
wants) then ``READY=1`` around a SIGHUP reload, ``STOPPING=1`` when it starts draining,
and a ``STATUS=`` line with each.

Socket activation: when ``LISTEN_PID`` is this process, the ``LISTEN_FDS`` sockets
starting at fd 3 are used instead of binding.  stunnel 5.68 hands them out by order (the
n-th ``accept`` line of the file takes fd 3+n, whatever it is bound to) and refuses to
start with more sockets than ``accept`` lines.  pytunnel gives the same answer for every
unit where the order and the addresses agree, and a better one where they do not: a socket
goes first to the service ``LISTEN_FDNAMES`` names (``FileDescriptorName=``), then to the
accept line whose address it is bound to, and only then, by order, to an accept line left
without one (logged, since the addresses differ).
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
        self._plan: dict[Claim, list[socket.socket]] = {}
        self.by_order: list[tuple[Claim, socket.socket]] = []
        self.count = 0
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

        self.count = len(self.sockets)

    def plan(self, claims: list[Claim]) -> None:
        """Assign the passed sockets to the accept lines ``claims`` (service, host, port, path),
        given in configuration order: by name, then by address, then by order."""
        free = list(self.sockets)
        open_claims = list(claims)
        services = {c[0] for c in claims}

        def give(claim: Claim, pick: tuple[socket.socket, str]) -> None:
            free.remove(pick)
            open_claims.remove(claim)
            self._plan.setdefault(claim, []).append(pick[0])

        for claim in list(open_claims):
            named = next((f for f in free if f[1] and f[1] == claim[0]), None)
            if named is not None:
                give(claim, named)
        for claim in list(open_claims):
            bound = next((f for f in free if f[1] not in services and _matches(f[0], *claim[1:])), None)
            if bound is not None:
                give(claim, bound)
        for claim in list(open_claims):
            spare = next((f for f in free if f[1] not in services), None)
            if spare is None:
                break
            give(claim, spare)
            self.by_order.append((claim, spare[0]))
        self.sockets = free

    def take(self, service: str, host: str | None, port: int, path: str | None) -> socket.socket | None:
        """The passed socket :meth:`plan` gave this accept line, if any."""
        got = self._plan.get((service, host, port, path))
        return got.pop(0) if got else None

    def leftovers(self) -> list[str]:
        """Passed sockets no accept line took (stunnel refuses to start with any)."""
        out = []
        for sock, name in self.sockets:
            with contextlib.suppress(OSError):
                out.append(f"fd {sock.fileno()} ({name or sockname(sock)})")
        return out


Claim = tuple[str, str | None, int, str | None]


def sockname(sock: socket.socket) -> str:
    try:
        addr = sock.getsockname()
    except OSError:
        return "?"
    if isinstance(addr, tuple):
        return f"{addr[0]}:{addr[1]}"
    return str(addr)


def _matches(sock: socket.socket, host: str | None, port: int, path: str | None) -> bool:
    """Is ``sock`` bound to this accept address?"""
    try:
        addr = sock.getsockname()
    except OSError:
        return False
    if path is not None:
        return sock.family == socket.AF_UNIX and addr == path
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or not isinstance(addr, tuple):
        return False
    if addr[1] != port:
        return False
    if host in (None, "", "0.0.0.0", "::"):  # noqa: S104 - any-address accept
        return True
    try:
        wanted = {info[4][0] for info in socket.getaddrinfo(host, port, sock.family, socket.SOCK_STREAM)}
    except OSError:
        return False
    return addr[0] in wanted
