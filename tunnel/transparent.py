"""stunnel's ``transparent = none|source|destination|both`` (Linux only).

* ``source`` (legacy ``yes``): the upstream connection leaves from the client's own address.
  As stunnel does (``client.c``: ``connect_init``), the upstream socket gets IP_TRANSPARENT
  (IPV6_TRANSPARENT) and is bound to the client's IP and -- when it is 1024 or above -- to the
  client's port, falling back to an ephemeral port when that one is in use.  ``local = IP``
  wins over it, as in stunnel.  The replies come back only with TPROXY-style policy routing on
  the host (``docs/transparent.md``): pytunnel sets up no routing.
* ``destination``: the upstream is where the client meant to go, the address an iptables/nft
  REDIRECT or DNAT rule hid (``SO_ORIGINAL_DST``, ``IP6T_SO_ORIGINAL_DST`` for IPv6), or, for
  a connection a TPROXY rule delivered, the accepted socket's own local address.  Such a
  service has no ``connect`` (stunnel counts ``transparent = destination`` as an endpoint).
  Its listening sockets get IP_TRANSPARENT, which TPROXY needs to deliver to them.
* ``both``: the two together.

Setting IP_TRANSPARENT needs CAP_NET_ADMIN (or CAP_NET_RAW); without it every connection fails with one error
line that says so.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sys
from typing import TYPE_CHECKING, Any

from tunnel.addr import format_sockaddr
from tunnel.logs import log
from tunnel.reasons import CloseReason

if TYPE_CHECKING:
    from tunnel.relay import Connection

# linux/in.h, linux/in6.h, linux/netfilter_ipv4.h, linux/netfilter_ipv6/ip6_tables.h
SOL_IP = 0
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80

#: an upstream target as ``Service._targets`` lists them: (family, sockaddr, name)
Target = tuple[int, Any, str | None]

CAPABILITY_HINT = (
    "needs CAP_NET_ADMIN (Linux also accepts CAP_NET_RAW): run pytunnel as root without setuid, "
    "or grant the capability (systemd: AmbientCapabilities=CAP_NET_ADMIN)"
)


def uses_source(mode: str | None) -> bool:
    return mode in ("source", "both")


def uses_destination(mode: str | None) -> bool:
    return mode in ("destination", "both")


def option_name(family: int) -> str:
    return "IPV6_TRANSPARENT" if family == socket.AF_INET6 else "IP_TRANSPARENT"


def enable(sock: Any, family: int) -> None:
    """IP_TRANSPARENT (IPV6_TRANSPARENT on an IPv6 socket); raises OSError (EPERM without
    CAP_NET_ADMIN)."""
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
    else:
        sock.setsockopt(SOL_IP, IP_TRANSPARENT, 1)


def setsockopt_error(exc: OSError, family: int, mode: str) -> str:
    """stunnel's ``setsockopt IP_TRANSPARENT: TEXT (ERRNO)``, plus what to do about EPERM."""
    code = exc.errno or 0
    text = f"setsockopt {option_name(family)}: {os.strerror(code)} ({code})"
    if code in (errno.EPERM, errno.EACCES):
        text += f": transparent = {mode} {CAPABILITY_HINT}"
    return text


def prepare_listener(sock: socket.socket, family: int, mode: str, service: str) -> None:
    """At bind: IP_TRANSPARENT on a ``destination``/``both`` listener (TPROXY delivers only to
    transparent sockets; REDIRECT and DNAT work without it), and for ``source`` a probe that
    says at start-up when the capability is missing.  Never fails the bind."""
    if family not in (socket.AF_INET, socket.AF_INET6) or mode == "none":
        return
    if uses_destination(mode):
        try:
            enable(sock, family)
        except OSError as exc:
            log.ui(
                4,
                f"Service [{service}]: {setsockopt_error(exc, family, mode)}; TPROXY cannot deliver "
                "to this listener (REDIRECT and DNAT still work)",
            )
        else:
            log.ui(7, f"Service [{service}]: {option_name(family)} set on the listening socket")
    if uses_source(mode):
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                enable(probe, family)
            except OSError as exc:
                log.ui(
                    3,
                    f"Service [{service}]: {setsockopt_error(exc, family, mode)}; every connection "
                    "of this service will fail",
                )


def _accepted(conn: Connection) -> Any:
    """The transport of the client's (accepted) side, or None."""
    side = conn.plain if conn.service.settings.client else conn.tls
    return side.transport if side is not None else None


def _nat_clash(transport: Any, target: Any) -> bool:
    """The client's connection was NATed (REDIRECT/DNAT) and its original destination is this
    very target: an upstream from the client's own port would have the same addresses as the
    client's conntrack entry, which would take it for the client's connection and NAT it too."""
    sock = transport.get_extra_info("socket")
    if sock is None or not isinstance(target, tuple):
        return False
    try:
        _family, orig, how = original_destination(sock)
        local = tuple(sock.getsockname())
    except OSError:
        return False
    return how == "SO_ORIGINAL_DST" and orig[:2] == tuple(target[:2]) and orig[:2] != local[:2]


def bind_source(conn: Connection, sock: socket.socket, family: int, target: Any) -> bool:
    """``source``: bind the upstream socket to the client's address (stunnel's connect_init).

    False when this target cannot be used (the caller closes the socket and tries the next);
    the connection itself is failed when no target can work (no client socket, no capability).
    """
    mode = conn.service.settings.transparent
    transport = _accepted(conn)
    peer = transport.get_extra_info("peername") if transport is not None else None
    if not isinstance(peer, tuple) or len(peer) < 2:
        conn.fail(CloseReason.CONNECT_FAILED, "Transparent source needs a socket")
        return False
    host, port = str(peer[0]), int(peer[1])
    peer_family = socket.AF_INET6 if ":" in host else socket.AF_INET
    addr: tuple[Any, ...]
    if peer_family == socket.AF_INET6 and family == socket.AF_INET and host.lower().startswith("::ffff:"):
        host, peer_family = host[7:], socket.AF_INET  # a v4 client on a dual-stack listener
    if peer_family != family:
        conn.log(7, f"Cannot assign an AF={peer_family} address an AF={family} socket")
        return False
    addr = (host, port, 0, int(peer[3])) if family == socket.AF_INET6 and len(peer) >= 4 else (host, port)
    try:
        enable(sock, family)
    except OSError as exc:
        conn.fail(CloseReason.CONNECT_FAILED, setsockopt_error(exc, family, mode))
        return False
    conn.log(6, f"{option_name(family)} socket option set")
    if port >= 1024 and _nat_clash(transport, target):
        conn.log(6, "the client's NATed connection has the same addresses: not binding the original port")
        port = 0
    if port >= 1024:  # stunnel's security check: never a privileged port
        try:
            sock.bind(addr)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                conn.log(3, f"bind (original port) {format_sockaddr(addr)}: {exc.strerror} ({exc.errno})")
                return False
        else:
            conn.log(6, "bind succeeded on the original port")
            return True
    try:
        sock.bind((host, 0, *addr[2:]))
    except OSError as exc:
        conn.log(3, f"bind (ephemeral port) {host}: {exc.strerror} ({exc.errno})")
        return False
    conn.log(6, "bind succeeded on an ephemeral port")
    return True


def _parse_sockaddr(raw: bytes) -> tuple[int, tuple[Any, ...]]:
    family = int.from_bytes(raw[0:2], sys.byteorder)
    port = int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET6:
        flow = int.from_bytes(raw[4:8], "big")
        scope = int.from_bytes(raw[24:28], sys.byteorder)
        return socket.AF_INET6, (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, flow, scope)
    return socket.AF_INET, (socket.inet_ntop(socket.AF_INET, raw[4:8]), port)


def original_destination(sock: Any) -> tuple[int, tuple[Any, ...], str]:
    """Where the client meant to go: (family, sockaddr, how it was found).

    SO_ORIGINAL_DST first (IPv6 then IPv4, as stunnel asks), which conntrack answers for a
    REDIRECT/DNAT; a TPROXY-delivered socket has no NAT entry (or an un-NATed one): its own
    local address is the destination.  Raises the OSError of SO_ORIGINAL_DST otherwise."""
    error: OSError | None = None
    levels = [(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)] if sock.family == socket.AF_INET6 else []
    levels.append((SOL_IP, SO_ORIGINAL_DST, 16))
    for level, name, size in levels:
        try:
            raw = sock.getsockopt(level, name, size)
        except OSError as exc:
            error = error or exc
            continue
        family, addr = _parse_sockaddr(raw)
        return family, addr, "SO_ORIGINAL_DST"
    transparent = False
    with contextlib.suppress(OSError):
        if sock.family == socket.AF_INET6:
            transparent = bool(sock.getsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT))
        else:
            transparent = bool(sock.getsockopt(SOL_IP, IP_TRANSPARENT))
    if transparent:
        return int(sock.family), tuple(sock.getsockname()), "TPROXY"
    assert error is not None
    raise error


def _is_local(family: int, host: str) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
    return True


def _ours(conn: Connection, family: int, addr: tuple[Any, ...], local: tuple[Any, ...]) -> bool:
    """The client reached this very listener without any redirection: connecting to the
    "original" destination would connect to ourselves, over and over."""
    if tuple(addr[:2]) != tuple(local[:2]):
        return False
    ports = {lst.sock.getsockname()[1] for lst in conn.service.listeners if lst.endpoint.path is None}
    return addr[1] in ports and _is_local(family, str(addr[0]))


def destination_targets(conn: Connection) -> list[Target] | None:
    """``destination``: the one upstream target, the client's original destination; None (and
    the connection failed) when there is none."""
    transport = _accepted(conn)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        conn.fail(CloseReason.CONNECT_FAILED, "Transparent destination needs a TCP client socket")
        return None
    try:
        family, addr, how = original_destination(sock)
        ours = _ours(conn, family, addr, tuple(sock.getsockname()))
        if ours and how == "TPROXY":  # a transparent listener reached directly: no NAT entry
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
    except OSError as exc:
        code = exc.errno or errno.ENOENT
        conn.fail(
            CloseReason.CONNECT_FAILED,
            f"getsockopt SO_ORIGINAL_DST: {os.strerror(code)} ({code}): the connection was not "
            "redirected here (no REDIRECT, DNAT or TPROXY rule matched it)",
        )
        return None
    shown = format_sockaddr(addr)
    if ours:  # conntrack tracks even an un-NATed connection: its "original" destination is us
        conn.fail(
            CloseReason.CONNECT_FAILED,
            f"transparent destination: the original destination {shown} is this service's own "
            "listening address (the connection was not redirected): not connecting to ourselves",
        )
        return None
    conn.log(6, f"transparent destination: original destination {shown} ({how})")
    return [(family, addr, str(addr[0]))]
