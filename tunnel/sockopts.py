"""Socket options: the one table of every ``socket = a|l|r:NAME=VALUE`` stunnel knows on
Linux (its value kind and ``setsockopt`` level/name), how a line is read, stunnel's defaults,
how they are applied to a live socket, and the ``-sockets`` listing.  A leaf but for logs."""

from __future__ import annotations

import contextlib
import re
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

from tunnel.logs import log


class Opt(NamedTuple):
    kind: str  # flag, int, linger, timeval, string
    level: int
    optname: int


# stunnel's sock_opts_def[] as built for Linux
SOCKET_OPTIONS: dict[str, Opt] = {
    "SO_DEBUG": Opt("flag", socket.SOL_SOCKET, socket.SO_DEBUG),
    "SO_DONTROUTE": Opt("flag", socket.SOL_SOCKET, socket.SO_DONTROUTE),
    "SO_KEEPALIVE": Opt("flag", socket.SOL_SOCKET, socket.SO_KEEPALIVE),
    "SO_LINGER": Opt("linger", socket.SOL_SOCKET, socket.SO_LINGER),
    "SO_OOBINLINE": Opt("flag", socket.SOL_SOCKET, socket.SO_OOBINLINE),
    "SO_RCVBUF": Opt("int", socket.SOL_SOCKET, socket.SO_RCVBUF),
    "SO_SNDBUF": Opt("int", socket.SOL_SOCKET, socket.SO_SNDBUF),
    "SO_RCVLOWAT": Opt("int", socket.SOL_SOCKET, socket.SO_RCVLOWAT),
    "SO_SNDLOWAT": Opt("int", socket.SOL_SOCKET, socket.SO_SNDLOWAT),
    "SO_RCVTIMEO": Opt("timeval", socket.SOL_SOCKET, socket.SO_RCVTIMEO),
    "SO_SNDTIMEO": Opt("timeval", socket.SOL_SOCKET, socket.SO_SNDTIMEO),
    "SO_REUSEADDR": Opt("flag", socket.SOL_SOCKET, socket.SO_REUSEADDR),
    "SO_BINDTODEVICE": Opt("string", socket.SOL_SOCKET, getattr(socket, "SO_BINDTODEVICE", 25)),
    "TCP_KEEPCNT": Opt("int", socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPCNT", 6)),
    "TCP_KEEPIDLE": Opt("int", socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPIDLE", 4)),
    "TCP_KEEPINTVL": Opt("int", socket.IPPROTO_TCP, getattr(socket, "TCP_KEEPINTVL", 5)),
    "IP_TOS": Opt("int", socket.IPPROTO_IP, socket.IP_TOS),
    "IP_TTL": Opt("int", socket.IPPROTO_IP, socket.IP_TTL),
    "TCP_NODELAY": Opt("flag", socket.IPPROTO_TCP, socket.TCP_NODELAY),
    "IP_FREEBIND": Opt("flag", socket.IPPROTO_IP, getattr(socket, "IP_FREEBIND", 15)),
    "IPV6_V6ONLY": Opt("flag", socket.IPPROTO_IPV6, socket.IPV6_V6ONLY),
}
SOCKET_OPTIONS_ELSEWHERE = {
    "SO_EXCLUSIVEADDRUSE": "it exists only on Windows",
    "IP_BINDANY": "it exists only on FreeBSD",
    "IPV6_BINDANY": "it exists only on FreeBSD",
    "TCP_MAXSEG": "stunnel's Linux build does not offer it either (see `stunnel4 -sockets`)",
}


@dataclass(frozen=True)
class SocketOption:
    """One ``socket = WHERE:NAME=VALUE`` line, parsed (a plain value: no pydantic model to build
    at start-up)."""

    where: Literal["a", "l", "r"]
    name: str
    value: int | str | tuple[int, int]


def parse_socket_option(text: str) -> SocketOption:
    m = re.fullmatch(r"\s*([alr])\s*:\s*([A-Za-z0-9_]+)\s*=\s*(.*?)\s*", text)
    if not m:
        raise ValueError("expected a|l|r:OPTION=VALUE (e.g. l:TCP_NODELAY=1 or a:SO_REUSEADDR=yes)")
    where, name, raw = m.group(1), m.group(2).upper(), m.group(3)
    if name in SOCKET_OPTIONS_ELSEWHERE:
        raise ValueError(f"socket option {name} is not available here: {SOCKET_OPTIONS_ELSEWHERE[name]}")
    spec = SOCKET_OPTIONS.get(name)
    if spec is None:
        import difflib

        close = difflib.get_close_matches(name, list(SOCKET_OPTIONS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(f"unknown socket option {name!r}{hint}; `pytunnel -sockets` lists them")
    value: int | str | tuple[int, int]
    kind = spec.kind
    if kind == "flag":
        low = raw.lower()
        if low in ("yes", "1"):
            value = 1
        elif low in ("no", "0"):
            value = 0
        else:
            raise ValueError(f"{name} takes yes/no (or 1/0), not {raw!r}")
    elif kind == "int":
        if not re.fullmatch(r"-?[0-9]+", raw):
            raise ValueError(f"{name} takes a whole number, not {raw!r}")
        value = int(raw)
    elif kind in ("linger", "timeval"):
        parts = raw.split(":")  # the second part is optional (0), as stunnel reads it
        if len(parts) > 2 or not all(re.fullmatch(r"[0-9]+", p) for p in parts):
            form = "l_onoff[:l_linger]" if kind == "linger" else "seconds[:microseconds]"
            raise ValueError(f"{name} takes {form}, not {raw!r}")
        value = (int(parts[0]), int(parts[1]) if len(parts) == 2 else 0)
    else:
        if not raw:
            raise ValueError(f"{name} needs a value")
        value = raw
    return SocketOption(where=where, name=name, value=value)  # type: ignore[arg-type]


TCP_ONLY = {"TCP_NODELAY", "TCP_KEEPCNT", "TCP_KEEPIDLE", "TCP_KEEPINTVL"}
IP_ONLY = {"IP_TOS", "IP_TTL", "IP_FREEBIND"}


_DEFAULT_SOCKOPTS = {
    "a": [SocketOption(where="a", name="SO_REUSEADDR", value=1)],
    "l": [SocketOption(where="l", name="TCP_NODELAY", value=1)],
    "r": [SocketOption(where="r", name="TCP_NODELAY", value=1)],
}


def socket_options(configured: Iterable[SocketOption], where: str) -> list[SocketOption]:
    """stunnel's defaults (a:SO_REUSEADDR, l:/r:TCP_NODELAY) then the configured ones."""
    return _DEFAULT_SOCKOPTS[where] + [o for o in configured if o.where == where]


def for_transport(opts: list[SocketOption]) -> list[SocketOption]:
    """``opts`` less TCP_NODELAY when they end up setting it on, as uvloop does for every TCP
    transport anyway (the l: and r: default): one system call a side and, on a transport's
    socket, a Python socket object fewer per connection."""
    nodelay = [o for o in opts if o.name == "TCP_NODELAY"]
    if nodelay and nodelay[-1].value == 1:
        return [o for o in opts if o.name != "TCP_NODELAY"]
    return opts


def apply_socket_options(sock: Any, family: int, opts: list[SocketOption]) -> None:
    for opt in opts:
        if family == socket.AF_UNIX and opt.name in TCP_ONLY | IP_ONLY | {"IPV6_V6ONLY"}:
            continue
        if family == socket.AF_INET6 and opt.name in IP_ONLY and opt.name != "IP_FREEBIND":
            continue
        if family == socket.AF_INET and opt.name == "IPV6_V6ONLY":
            continue
        level, name = SOCKET_OPTIONS[opt.name].level, SOCKET_OPTIONS[opt.name].optname
        value = opt.value
        raw: int | bytes
        if isinstance(value, tuple):
            raw = struct.pack("ii", *value) if opt.name == "SO_LINGER" else struct.pack("ll", *value)
        elif isinstance(value, str):
            raw = value.encode()
        else:
            raw = value
        try:
            sock.setsockopt(level, name, raw)
        except OSError as exc:
            log.ui(4, f"Failed to set socket option {opt.name}: {exc.strerror}")


def reassert_nodelay(transport: Any, opts: list[SocketOption]) -> None:
    """asyncio and uvloop turn TCP_NODELAY on for every TCP transport they make, after
    the options were applied: a configured ``r:TCP_NODELAY`` is set again over theirs."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    mine = [o for o in opts if o.name == "TCP_NODELAY"][-1:]
    if sock is not None and mine and mine[0].value != 1:
        apply_socket_options(sock, sock.family, mine)


def os_default(name: str) -> str:
    """What a fresh TCP socket says for one option (stunnel's `OS default` column)."""
    spec = SOCKET_OPTIONS[name]
    level, opt, kind = spec.level, spec.optname, spec.kind
    family = socket.AF_INET6 if name.startswith("IPV6") else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            if kind in ("linger", "timeval"):
                a, b = struct.unpack(
                    "ii" if kind == "linger" else "ll",
                    sock.getsockopt(level, opt, 16)[: 8 if kind == "linger" else 16],
                )
                return f"{a}:{b}"
            if kind == "string":
                return sock.getsockopt(level, opt, 64).rstrip(b"\0").decode()
            value = sock.getsockopt(level, opt)
    except OSError:
        return "--"
    return ("yes" if value else "no") if kind == "flag" else str(value)


def sockets_text() -> list[str]:
    lines = [
        "Socket option defaults:",
        "    Option Name         |  Accept  |   Local  |  Remote  |OS default",
        "    --------------------+----------+----------+----------+----------",
    ]
    for name in SOCKET_OPTIONS:
        a = f"{'yes':>10}" if name == "SO_REUSEADDR" else f"{'--':^10}"
        lr = f"{'yes':>10}" if name == "TCP_NODELAY" else f"{'--':^10}"
        lines.append(f"    {name:<20}|{a}|{lr}|{lr}|{os_default(name):>10}")
    return lines


def set_linger_zero(transport: Any) -> None:
    """Close with a TCP RST: ``SO_LINGER`` on, zero seconds."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
