"""``acceptProxy = yes``: read the PROXY header a load balancer puts before a connection.

HAProxy's PROXY protocol (``doc/proxy-protocol.txt``): before its first byte, a connection
from a load balancer carries the address of the client it stands for, in text (v1,
``PROXY TCP4 src dst sport dport\\r\\n``, at most 107 bytes) or binary (v2: a 12-byte signature,
version/command, family/transport, a length, the addresses, then TLVs).  Which one is
detected from the first bytes.  stunnel can send v1 (``protocol = proxy``) but never reads one.

The header is read off the accepted socket before anything else happens to the connection:
before the TLS handshake in server mode, before any byte is relayed in client mode.  Reading
stops at the header's last byte, so what follows (a ClientHello, the application's bytes) is
left for the next step.  The carried address then is the client's address everywhere
(:class:`CarriedTransport`, ``Connection.origin``).  A v2 ``LOCAL`` command (a health check)
and a v1 ``UNKNOWN`` header carry no client: the socket's own addresses are used.

Anything else -- no header, a wrong signature, a header longer than allowed, lengths that do
not add up, an unknown version, command, family or transport, a header not complete within
TIMEOUTbusy -- closes that one connection with one log line and the close reason
``proxy_header`` (:func:`take`).

Imports protocols (the tap and the PROXY sender's constants), addr, reasons -- leaves only.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
from dataclasses import dataclass
from typing import Any, Protocol

from tunnel.addr import format_sockaddr
from tunnel.protocols.proxy import PROXY_V2_SIGNATURE
from tunnel.protocols.tap import Pipe, ProtocolError, Tap
from tunnel.reasons import CloseReason

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the spec's worst case, CR LF included
V2_MAX_BODY = 4096  # addresses and TLVs; HAProxy's own TLVs (SSL, ALPN, unique id) fit easily
_V2_ADDR = {0x1: (socket.AF_INET, 12), 0x2: (socket.AF_INET6, 36), 0x3: (socket.AF_UNIX, 216)}

#: (family, client's address, address it reached): sockaddr tuples, or paths for AF_UNIX
Origin = tuple[int, Any, Any]


class HeaderError(Exception):
    """The header is missing or broken; the message says how (the connection's log line)."""


@dataclass(frozen=True)
class Carried:
    """What a header says.  ``origin`` None: LOCAL / UNKNOWN, use the socket's addresses."""

    version: int
    origin: Origin | None
    tlvs: tuple[tuple[int, bytes], ...] = ()


# ---- parsing (pure) ----------------------------------------------------------------------
def _port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text.startswith(b"0")):
        raise HeaderError(f"bad port {text[:8]!r}")
    port = int(text)
    if port > 65535:
        raise HeaderError(f"bad port {port}")
    return port


def parse_v1(line: bytes) -> Carried:
    """One v1 line, CR LF included."""
    if not line.startswith(V1_PREFIX) or not line.endswith(b"\r\n"):
        raise HeaderError("malformed v1 header")
    fields = line[len(V1_PREFIX) : -2].split(b" ")
    if fields[0] == b"UNKNOWN":  # the sender could not tell: whatever follows is ignored
        return Carried(1, None)
    if fields[0] not in (b"TCP4", b"TCP6") or len(fields) != 5:
        raise HeaderError(f"malformed v1 header (protocol {fields[0][:8]!r}, {len(fields)} fields)")
    version = 4 if fields[0] == b"TCP4" else 6
    try:
        src = ipaddress.ip_address(fields[1].decode("ascii"))
        dst = ipaddress.ip_address(fields[2].decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise HeaderError("malformed v1 header (bad address)") from None
    if src.version != version or dst.version != version:
        raise HeaderError(f"malformed v1 header (address is not {fields[0].decode()})")
    sport, dport = _port(fields[3]), _port(fields[4])
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    return Carried(1, (family, (str(src), sport), (str(dst), dport)))


def parse_tlvs(data: bytes) -> tuple[tuple[int, bytes], ...]:
    out: list[tuple[int, bytes]] = []
    at = 0
    while at < len(data):
        if len(data) - at < 3:
            raise HeaderError("malformed v2 header (truncated TLV)")
        kind, length = struct.unpack_from("!BH", data, at)
        at += 3
        if at + length > len(data):
            raise HeaderError(
                f"malformed v2 header (TLV 0x{kind:02x} claims {length} bytes, {len(data) - at} left)"
            )
        out.append((kind, data[at : at + length]))
        at += length
    return tuple(out)


def _unix_path(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


def parse_v2(head: bytes, body: bytes) -> Carried:
    """``head``: signature + 4 bytes; ``body``: the length it announced."""
    ver_cmd, fam = head[12], head[13]
    if ver_cmd >> 4 != 2:
        raise HeaderError(f"unknown v2 version {ver_cmd >> 4}")
    command = ver_cmd & 0x0F
    if command not in (0, 1):
        raise HeaderError(f"unknown v2 command {command}")
    family_code, transport = fam >> 4, fam & 0x0F
    if family_code > 3 or transport > 2:
        raise HeaderError(f"unknown v2 address family/transport 0x{fam:02x}")
    if command == 0 or family_code == 0:  # LOCAL (a health check), or AF_UNSPEC: the spec
        return Carried(2, None)  # says to discard the block and use the real endpoints
    family, size = _V2_ADDR[family_code]
    if len(body) < size:
        raise HeaderError(
            f"malformed v2 header (length {len(body)} is short of the {size} its addresses need)"
        )
    if transport != 1:
        kind = "a datagram" if transport == 2 else "an unspecified"
        raise HeaderError(f"v2 header for {kind} transport on a stream socket")
    tlvs = parse_tlvs(body[size:])
    if family == socket.AF_UNIX:
        return Carried(2, (family, _unix_path(body[:108]), _unix_path(body[108:216])), tlvs)
    alen = 4 if family == socket.AF_INET else 16
    src = socket.inet_ntop(family, body[:alen])
    dst = socket.inet_ntop(family, body[alen : 2 * alen])
    sport, dport = struct.unpack_from("!HH", body, 2 * alen)
    return Carried(2, (family, (src, sport), (dst, dport)), tlvs)


# ---- reading off a connection ------------------------------------------------------------
async def read_header(tap: Tap) -> Carried:
    """The header, detected byte by byte (never reading beyond its end)."""
    got = b""
    while got != V1_PREFIX and got != PROXY_V2_SIGNATURE:
        got += await tap.read_exact(1)
        if not (V1_PREFIX.startswith(got) or PROXY_V2_SIGNATURE.startswith(got)):
            raise HeaderError(f"no PROXY header (the connection starts with {got[:12]!r})")
    if got == V1_PREFIX:
        while not got.endswith(b"\n"):
            if len(got) >= V1_MAX:
                raise HeaderError(f"v1 header longer than {V1_MAX} bytes")
            got += await tap.read_exact(1)
        return parse_v1(got)
    head = got + await tap.read_exact(4)
    length = struct.unpack_from("!H", head, 14)[0]
    if length > V2_MAX_BODY:
        raise HeaderError(f"v2 header of {length} bytes (at most {V2_MAX_BODY} accepted)")
    return parse_v2(head, await tap.read_exact(length) if length else b"")


class Accepted(Protocol):
    """The connection whose header is read: its log, its failure, and its client's address."""

    peer_addr: str
    origin: Origin | None

    def log(self, level: int, text: str, **fields: object) -> None: ...
    def fail(self, reason: CloseReason, detail: str, *, rst: bool | None = None, level: int = 3) -> None: ...


async def take(conn: Accepted, side: Pipe, busy: float, plain: bool) -> bool:
    """Read the header off the accepted ``side`` within ``busy`` seconds; the carried address
    becomes the connection's client address.  False after failing the connection.

    ``plain``: client mode (reading stays paused until the connection is linked); what came
    after the header is put back for the next step."""
    tap = Tap(side, raw=True, timeout=busy)
    via = conn.peer_addr
    try:
        async with asyncio.timeout(busy):
            carried = await read_header(tap)
    except TimeoutError:
        why = "not complete within TIMEOUTbusy"
    except ProtocolError as exc:  # the peer closed (or the tap's own timeout)
        why = "truncated (the peer closed)" if "close" in str(exc) else "not complete within TIMEOUTbusy"
    except HeaderError as exc:
        why = str(exc)
    else:
        rest = tap.detach(pause=plain)
        if rest:
            side.early.insert(0, rest)
        if carried.origin is None:
            conn.log(
                6, f"PROXY v{carried.version} header without a client address: {via} serves as the client"
            )
        else:
            conn.origin = carried.origin
            conn.peer_addr = format_sockaddr(carried.origin[1])
            conn.log(6, f"PROXY v{carried.version} header: client {conn.peer_addr} (via {via})")
        return True
    tap.detach(pause=True)
    conn.fail(CloseReason.PROXY_HEADER, f"PROXY header from {via}: {why}")
    return False


class CarriedTransport:
    """The client's transport as a step after the header sees it: the carried addresses for
    ``peername``/``sockname`` (transparent source), the socket's for the rest."""

    def __init__(self, transport: Any, origin: Origin) -> None:
        self._transport = transport
        self._origin = origin

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._origin[1]
        if name == "sockname":
            return self._origin[2]
        return self._transport.get_extra_info(name, default)
