"""Endpoint parsing: stunnel's ``[HOST:]PORT``, ``[v6]:PORT`` and Unix socket paths."""

from __future__ import annotations

import ipaddress
import socket
import sys
from dataclasses import dataclass
from typing import Any

# linux/netfilter_ipv4.h, linux/netfilter_ipv6/ip6_tables.h
SOL_IP = 0
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80


@dataclass(frozen=True)
class Endpoint:
    """One ``accept``/``connect`` address as written in the configuration.

    ``host`` is ``None`` when only a port was given: stunnel then listens on all
    IPv4 addresses (``accept``) or connects to localhost (``connect``).
    """

    host: str | None
    port: int
    path: str | None = None  # Unix socket path; host/port unused then

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def display(self, default_host: str = "0.0.0.0") -> str:  # noqa: S104 - stunnel's default
        if self.path is not None:
            return self.path
        return f"{self.host or default_host}:{self.port}"


def parse_port(text: str) -> int:
    text = text.strip()
    if not text:
        raise ValueError("missing port (expected [HOST:]PORT)")
    digits = text[1:] if text.startswith("+") else text  # stunnel's strtol takes "+25"
    if digits.isascii() and digits.isdigit():
        port = int(digits)
        if port > 65535:
            raise ValueError(f"port {port} is out of range (0-65535)")
        return port
    try:
        return socket.getservbyname(text, "tcp")
    except OSError:
        raise ValueError(
            f"{text!r} is neither a port number nor a known service name "
            "(expected [HOST:]PORT, e.g. 127.0.0.1:2525)"
        ) from None


def parse_endpoint(value: str) -> Endpoint:
    """Parse stunnel's address syntax.

    ``PORT``; ``HOST:PORT`` split at the *last* colon (so ``::1:0`` is host ``::1``,
    port 0); ``[v6]:PORT``; an absolute path (or ``unix:PATH``) is a Unix socket.
    """
    value = value.strip()
    if not value:
        raise ValueError("empty address (expected [HOST:]PORT or /path/to/socket)")
    if value.startswith("/"):
        return Endpoint(host=None, port=0, path=value)
    if value.startswith("unix:"):
        path = value[5:]
        if not path:
            raise ValueError("empty Unix socket path after 'unix:'")
        return Endpoint(host=None, port=0, path=path)
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or value[end + 1 : end + 2] != ":":
            raise ValueError("bracketed IPv6 address needs the form [ADDR]:PORT")
        host = value[1:end]
        _check_ip6(host)
        return Endpoint(host=host, port=parse_port(value[end + 2 :]))
    if ":" not in value:
        if not (value.isascii() and value.isdigit()) and _looks_like_host(value):
            raise ValueError(f"{value!r}: missing port (expected HOST:PORT)")
        return Endpoint(host=None, port=parse_port(value))
    host, _, port = value.rpartition(":")
    if not host:
        raise ValueError("empty host before ':' (expected [HOST:]PORT)")
    return Endpoint(host=host, port=parse_port(port))


def _looks_like_host(value: str) -> bool:
    if "." in value:
        return True
    try:
        socket.getservbyname(value, "tcp")
    except OSError:
        return True
    return False


def _check_ip6(host: str) -> None:
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IPv6 address") from None


def format_sockaddr(addr: object) -> str:
    """Render a socket address the way stunnel logs it (``HOST:PORT``)."""
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    if isinstance(addr, str):
        return addr or "unnamed socket"
    return str(addr)


def _parse_sockaddr(raw: bytes) -> tuple[int, tuple[Any, ...]]:
    family = int.from_bytes(raw[0:2], sys.byteorder)
    port = int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET6:
        flow = int.from_bytes(raw[4:8], "big")
        scope = int.from_bytes(raw[24:28], sys.byteorder)
        return socket.AF_INET6, (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port, flow, scope)
    return socket.AF_INET, (socket.inet_ntop(socket.AF_INET, raw[4:8]), port)


def original_destination(sock: Any) -> tuple[int, tuple[Any, ...]]:
    """Where a REDIRECTed/DNATed client meant to go: (family, sockaddr), from conntrack.

    The one reader of SO_ORIGINAL_DST.  As stunnel's original_dst: IP6T_SO_ORIGINAL_DST
    first, then SO_ORIGINAL_DST (which also answers for a v4 client on a dual-stack
    socket); the OSError of the last one asked when neither knows the connection."""
    error: OSError | None = None
    for level, name, size in ((socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28), (SOL_IP, SO_ORIGINAL_DST, 16)):
        try:
            raw = sock.getsockopt(level, name, size)
        except OSError as exc:
            error = exc
            continue
        return _parse_sockaddr(raw)
    assert error is not None
    raise error
