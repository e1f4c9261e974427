"""``socket = a:/l:/r:OPTION=VALUE`` read back from the live sockets of a running tunnel.

The test takes a copy of each of the tunnel's socket descriptors with ``pidfd_getfd``
(Linux >= 5.6; the tunnel is our child, so we may) and asks the kernel with
``getsockopt``: the listening socket (a:), the accepted client socket (l:) and the socket
to the upstream (r:), while a connection is open.  Both implementations, the same config.
"""

from __future__ import annotations

import ctypes
import os
import socket
import ssl
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import Certs, EchoServer, Tunnel, TunnelFactory, cannot_run_here

SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture


def grab(pid: int, fd: int) -> int:
    """A copy of another process's descriptor, through pidfd_getfd(2)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        dup = int(libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0))
        if dup < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"pidfd_getfd({pid}, {fd}): {os.strerror(err)}")
        return dup
    finally:
        os.close(pidfd)


@dataclass
class LiveSockets:
    listener: socket.socket
    local: socket.socket
    remote: socket.socket


def tcp_sockets(pid: int) -> Iterator[socket.socket]:
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if not target.startswith("socket:"):
            continue
        try:
            sock = socket.socket(fileno=grab(pid, int(name)))
        except OSError:
            continue
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
            yield sock
        else:
            sock.close()


def live_sockets(tunnel: Tunnel, port: int, client: socket.socket, upstream_port: int) -> LiveSockets:
    found: dict[str, socket.socket] = {}
    for sock in tcp_sockets(tunnel.proc.pid):
        try:
            peer = sock.getpeername()
        except OSError:
            peer = None
        mine = sock.getsockname()[1] == port
        if mine and peer is None:
            found["listener"] = sock
        elif mine and peer == client.getsockname():
            found["local"] = sock
        elif peer is not None and peer[1] == upstream_port:
            found["remote"] = sock
        else:
            sock.close()
    assert set(found) == {"listener", "local", "remote"}, found
    return LiveSockets(**found)


def flag(sock: socket.socket, level: int, name: int) -> bool:
    return sock.getsockopt(level, name) != 0


def kernel_value(level: int, name: int, value: int) -> int:
    """What the kernel reports after setting ``value`` (SO_RCVBUF / SO_SNDBUF double it)."""
    with socket.socket() as probe:
        probe.setsockopt(level, name, value)
        return probe.getsockopt(level, name)


def check_socket_options_reach_the_kernel(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, mode: str
) -> None:
    if mode == "server":  # TLS from the client, plaintext to the upstream
        upstream_port, head = echo.port, f"cert = {certs.server_pem}\n"
    else:  # plaintext from the client, TLS to an upstream tunnel
        up = tunnels.start(
            tunnels.conf(
                f"[u]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
            )
        )
        upstream_port, head = up.port("u"), "client = yes\n"
    conf = tunnels.conf(
        f"[s]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{upstream_port}\n{head}"
        "socket = a:SO_RCVBUF=65536\nsocket = a:SO_KEEPALIVE=yes\n"
        "socket = l:SO_KEEPALIVE=yes\nsocket = l:TCP_KEEPIDLE=77\nsocket = l:TCP_KEEPINTVL=11\n"
        "socket = l:TCP_KEEPCNT=5\nsocket = l:SO_LINGER=1:7\nsocket = l:SO_SNDBUF=32768\n"
        "socket = r:TCP_NODELAY=no\nsocket = r:IP_TTL=42\nsocket = r:IP_TOS=32\n"
        "socket = r:SO_RCVBUF=40960\nsocket = r:SO_KEEPALIVE=yes\n"
    )
    t = tunnels.start(conf, impl=impl)
    port = t.port("s")
    raw = socket.create_connection(("127.0.0.1", port), timeout=15)
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    with ctx.wrap_socket(raw, server_hostname="localhost") if mode == "server" else raw as client:
        client.sendall(b"ping")
        assert client.recv(4) == b"ping"  # the upstream connection is open now
        live = live_sockets(t, port, client, upstream_port)
        try:
            sol, tcp, ip = socket.SOL_SOCKET, socket.IPPROTO_TCP, socket.IPPROTO_IP
            # a: the listening socket, with stunnel's default SO_REUSEADDR
            assert live.listener.getsockopt(sol, socket.SO_RCVBUF) == kernel_value(
                sol, socket.SO_RCVBUF, 65536
            )
            assert flag(live.listener, sol, socket.SO_KEEPALIVE)
            assert flag(live.listener, sol, socket.SO_REUSEADDR)
            # l: the accepted socket, with the default TCP_NODELAY
            assert flag(live.local, sol, socket.SO_KEEPALIVE)
            assert live.local.getsockopt(tcp, socket.TCP_KEEPIDLE) == 77
            assert live.local.getsockopt(tcp, socket.TCP_KEEPINTVL) == 11
            assert live.local.getsockopt(tcp, socket.TCP_KEEPCNT) == 5
            assert struct.unpack("ii", live.local.getsockopt(sol, socket.SO_LINGER, 8)) == (1, 7)
            assert live.local.getsockopt(sol, socket.SO_SNDBUF) == kernel_value(sol, socket.SO_SNDBUF, 32768)
            assert flag(live.local, tcp, socket.TCP_NODELAY)
            # r: the upstream socket; TCP_NODELAY = no overrides the default
            assert not flag(live.remote, tcp, socket.TCP_NODELAY)
            assert live.remote.getsockopt(ip, socket.IP_TTL) == 42
            assert live.remote.getsockopt(ip, socket.IP_TOS) == 32
            assert live.remote.getsockopt(sol, socket.SO_RCVBUF) == kernel_value(sol, socket.SO_RCVBUF, 40960)
            assert flag(live.remote, sol, socket.SO_KEEPALIVE)
            # and what was not configured stays the kernel's
            assert not flag(live.remote, sol, socket.SO_LINGER)
            with socket.socket() as fresh:
                assert live.local.getsockopt(ip, socket.IP_TTL) == fresh.getsockopt(ip, socket.IP_TTL)
        finally:
            for sock in (live.listener, live.local, live.remote):
                sock.close()


@pytest.mark.parametrize("mode", ["server", "client"])
def test_socket_options_reach_the_kernel(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, mode: str
) -> None:
    """Every kind of value (flag, int, linger) on each of the three sockets, with TLS on
    either side."""
    try:
        check_socket_options_reach_the_kernel(tunnels, certs, echo, impl, mode)
    except PermissionError as exc:  # pidfd_getfd needs ptrace rights over the child
        cannot_run_here(f"pidfd_getfd is not permitted here: {exc}")
