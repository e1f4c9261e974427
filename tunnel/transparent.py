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
from collections.abc import Callable
from typing import Any

from tunnel.addr import format_sockaddr, original_destination
from tunnel.logs import log

# linux/in.h, linux/in6.h
SOL_IP = 0
IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75

#: an upstream target as ``upstream.Upstream.targets`` lists them: (family, sockaddr, name)
Target = tuple[int, Any, str | None]
#: a connection's log function: ``say(level, text)``
Say = Callable[..., None]


class TransparentError(Exception):
    """No target can work for this connection (no client socket, no capability, no original
    destination): the caller fails the connection with this text."""


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


def _nat_clash(transport: Any, target: Any) -> bool:
    """The client's connection was NATed (REDIRECT/DNAT) and its original destination is this
    very target: an upstream from the client's own port would have the same addresses as the
    client's conntrack entry, which would take it for the client's connection and NAT it too."""
    sock = transport.get_extra_info("socket")
    if sock is None or not isinstance(target, tuple):
        return False
    try:
        _family, orig, how = destination_of(sock)
        local = tuple(sock.getsockname())
    except OSError:
        return False
    return how == "SO_ORIGINAL_DST" and orig[:2] == tuple(target[:2]) and orig[:2] != local[:2]


def bind_source(transport: Any, sock: socket.socket, family: int, target: Any, mode: str, say: Say) -> bool:
    """``source``: bind the upstream socket to the client's address (stunnel's connect_init);
    ``transport`` is the client's (accepted) one.

    False when this target cannot be used (the caller closes the socket and tries the next);
    raises TransparentError when no target can work (no client socket, no capability).
    """
    peer = transport.get_extra_info("peername") if transport is not None else None
    if not isinstance(peer, tuple) or len(peer) < 2:
        raise TransparentError("Transparent source needs a socket")
    host, port = str(peer[0]), int(peer[1])
    peer_family = socket.AF_INET6 if ":" in host else socket.AF_INET
    addr: tuple[Any, ...]
    if peer_family == socket.AF_INET6 and family == socket.AF_INET and host.lower().startswith("::ffff:"):
        host, peer_family = host[7:], socket.AF_INET  # a v4 client on a dual-stack listener
    if peer_family != family:
        say(7, f"Cannot assign an AF={peer_family} address an AF={family} socket")
        return False
    addr = (host, port, 0, int(peer[3])) if family == socket.AF_INET6 and len(peer) >= 4 else (host, port)
    try:
        enable(sock, family)
    except OSError as exc:
        raise TransparentError(setsockopt_error(exc, family, mode)) from None
    say(6, f"{option_name(family)} socket option set")
    if port >= 1024 and _nat_clash(transport, target):
        say(6, "the client's NATed connection has the same addresses: not binding the original port")
        port = 0
    if port >= 1024:  # stunnel's security check: never a privileged port
        try:
            sock.bind(addr)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                say(3, f"bind (original port) {format_sockaddr(addr)}: {exc.strerror} ({exc.errno})")
                return False
        else:
            say(6, "bind succeeded on the original port")
            return True
    try:
        sock.bind((host, 0, *addr[2:]))
    except OSError as exc:
        say(3, f"bind (ephemeral port) {host}: {exc.strerror} ({exc.errno})")
        return False
    say(6, "bind succeeded on an ephemeral port")
    return True


def destination_of(sock: Any) -> tuple[int, tuple[Any, ...], str]:
    """Where the client meant to go: (family, sockaddr, how it was found).

    SO_ORIGINAL_DST first (``addr.original_destination``), which conntrack answers for a
    REDIRECT/DNAT; a TPROXY-delivered socket has no NAT entry (or an un-NATed one): its own
    local address is the destination.  Raises the OSError of SO_ORIGINAL_DST otherwise."""
    try:
        family, addr = original_destination(sock)
    except OSError as exc:
        error = exc
    else:
        return family, addr, "SO_ORIGINAL_DST"
    transparent = False
    with contextlib.suppress(OSError):
        if sock.family == socket.AF_INET6:
            transparent = bool(sock.getsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT))
        else:
            transparent = bool(sock.getsockopt(SOL_IP, IP_TRANSPARENT))
    if transparent:
        return int(sock.family), tuple(sock.getsockname()), "TPROXY"
    raise error


def _is_local(family: int, host: str) -> bool:
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((host, 0))
        except OSError:
            return False
    return True


def _ours(ports: set[int], family: int, addr: tuple[Any, ...], local: tuple[Any, ...]) -> bool:
    """The client reached this very listener (``ports``: the service's listening ports) without
    any redirection: connecting to the "original" destination would connect to ourselves."""
    if tuple(addr[:2]) != tuple(local[:2]):
        return False
    return addr[1] in ports and _is_local(family, str(addr[0]))


def destination_targets(transport: Any, ports: set[int], say: Say) -> list[Target]:
    """``destination``: the one upstream target, the original destination of the client's
    (accepted) ``transport``; raises TransparentError when there is none."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        raise TransparentError("Transparent destination needs a TCP client socket")
    try:
        family, addr, how = destination_of(sock)
        ours = _ours(ports, family, addr, tuple(sock.getsockname()))
        if ours and how == "TPROXY":  # a transparent listener reached directly: no NAT entry
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT))
    except OSError as exc:
        code = exc.errno or errno.ENOENT
        raise TransparentError(
            f"getsockopt SO_ORIGINAL_DST: {os.strerror(code)} ({code}): the connection was not "
            "redirected here (no REDIRECT, DNAT or TPROXY rule matched it)"
        ) from None
    shown = format_sockaddr(addr)
    if ours:  # conntrack tracks even an un-NATed connection: its "original" destination is us
        raise TransparentError(
            f"transparent destination: the original destination {shown} is this service's own "
            "listening address (the connection was not redirected): not connecting to ourselves"
        )
    say(6, f"transparent destination: original destination {shown} ({how})")
    return [(family, addr, str(addr[0]))]
