"""``protocol =``: what stunnel says on the wire before (or right after) TLS.

stunnel runs three optional phases per connection (``client_try`` in its client.c):

* **early**   on the accepted socket, before anything else;
* **middle**  client mode (and server protocols that need the upstream first): after the
  TCP connect and before TLS, in plaintext on the upstream; otherwise after the TLS
  handshake on the accepted side;
* **late**    after TLS is up and the upstream is connected.

Each protocol here is a set of such coroutines working on :class:`Tap` byte streams,
with stunnel's texts in its log lines and on the wire.  A peer that says something
unexpected ends that one connection with one log line (``ProtocolError``).

Protocols (stunnel's table in its protocol.c; c = client mode, s = server mode):

=========  ==========================================================================
smtp       c: STARTTLS (+ AUTH PLAIN/LOGIN after TLS); s: STARTTLS, RFC 2487 detection
pop3       c: STLS; s: STLS (and CAPA) towards the client
imap       c: STARTTLS; s: STARTTLS, RFC 2595 detection, CAPABILITY passed through
nntp       c: STARTTLS
ldap       c: the RFC 2830 StartTLS extended operation (BER)
pgsql      c: SSLRequest; s: SSLRequest, GSSENCRequest refused with an ErrorResponse
cifs       c/s: the NetBIOS "use TLS" session exchange
connect    c: HTTP CONNECT through a proxy (basic auth, extra headers);
           s: answers a CONNECT request and connects where it asked
socks      c: SOCKS5 CONNECT to protocolHost inside TLS; s: SOCKS 4/4a/5 inside TLS
proxy      s: HAProxy PROXY v1 header to the upstream
proxy-v2   s: HAProxy PROXY v2 (binary, with TLS facts as TLVs) -- pytunnel only
=========  ==========================================================================
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import ipaddress
import os
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunnel.relay import Connection, Side
    from tunnel.settings import ServiceSettings

MAX_LINE = 8192


class ProtocolError(Exception):
    """The peer did not follow the protocol; the message is the connection's one log line.

    ``reset``: ``False`` for stunnel's "don't reset" ends (its ``throw_exception(c, 2)``):
    a reply was just written (a SOCKS refusal, an IMAP ``BYE``, a PostgreSQL error) and
    must reach the peer, so the sockets are closed, not reset.  ``level``: the syslog
    level of the line (an expected end such as a SOCKS RESOLVE answer is not an error).
    """

    def __init__(self, message: str, *, reset: bool = True, level: int = 3) -> None:
        super().__init__(message)
        self.reset = reset
        self.level = level


class Tap:
    """A byte stream over one side while a protocol talks on it.

    ``raw``: the bytes go straight to the socket (plaintext before TLS); otherwise through
    the side's ``send`` (encrypted when the side is TLS and its handshake is done).
    """

    def __init__(self, side: Side, raw: bool, timeout: float) -> None:
        self.side = side
        self.raw = raw
        self.timeout = timeout
        self.buf = bytearray()
        self.eof = False
        self._waiter: asyncio.Future[None] | None = None
        for data in side.early:  # what arrived before the tap was set
            self.buf += data
        side.early.clear()
        side.tap = self

    # ---- fed by the side ------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        self.buf += data
        self._wake()

    def feed_eof(self) -> None:
        self.eof = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # ---- used by the protocol ---------------------------------------------------------
    async def _more(self) -> None:
        if self.eof:
            # stunnel's texts: s_read (plaintext) / s_ssl_read (inside TLS)
            raise ProtocolError(f"{'s_read' if self.raw else 's_ssl_read'}: Unexpected socket close")
        self.side.resume_reading()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._waiter, self.timeout)
        except TimeoutError:
            raise ProtocolError(
                f"{'s_read' if self.raw else 's_ssl_read'}: s_poll_wait: TIMEOUTbusy exceeded: sending reset"
            ) from None
        finally:
            self._waiter = None

    async def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._more()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def getline(self) -> str:
        """One line without its CR LF (stunnel's fd_getline / ssl_getline)."""
        while True:
            end = self.buf.find(b"\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 1]
                return line.rstrip(b"\r").decode("utf-8", "replace")
            if len(self.buf) > MAX_LINE:
                raise ProtocolError(
                    f"{'fd' if self.raw else 'ssl'}_getline: Line too long (over {MAX_LINE} bytes)"
                )
            await self._more()

    async def getstring(self) -> bytes:
        """A NUL-terminated string (SOCKS4 user id and host name)."""
        while True:
            end = self.buf.find(b"\0")
            if end >= 0:
                out = bytes(self.buf[:end])
                del self.buf[: end + 1]
                return out
            if len(self.buf) > 255:
                raise ProtocolError(f"{'fd' if self.raw else 'ssl'}_getstring: Line too long")
            await self._more()

    async def readable_within(self, seconds: float) -> bool:
        """True when the peer speaks first within ``seconds`` (stunnel's RFC 2487 probe)."""
        if self.buf or self.eof:
            return True
        try:
            await asyncio.wait_for(self._more(), seconds)
        except (TimeoutError, ProtocolError):
            return bool(self.buf) or self.eof
        return True

    def write(self, data: bytes) -> None:
        side = self.side
        if self.raw:
            if side.transport is not None and not side.closed:
                side.transport.write(data)
        else:
            side.send(data)

    def putline(self, line: str) -> None:
        self.write(line.encode("utf-8") + b"\r\n")

    def detach(self, pause: bool = True) -> bytes:
        """Stop tapping; what arrived beyond the protocol belongs to the data path.

        ``pause``: stop reading until the connection is linked (not for a TLS handshake
        that is about to start on this side)."""
        self.side.tap = None
        if pause:
            self.side.pause_reading()
        else:
            self.side.resume_reading()
        left, self.buf = bytes(self.buf), bytearray()
        return left


@dataclass
class Ctx:
    """What a protocol phase sees of its connection."""

    conn: Connection
    settings: ServiceSettings
    local: Tap
    remote: Tap | None = None
    # where to connect when the protocol decides it (SOCKS): (family, sockaddr, host name)
    targets: list[tuple[int, Any, str | None]] | None = None
    notes: dict[str, object] = field(default_factory=dict)

    def log(self, level: int, text: str) -> None:
        self.conn.log(level, text)


Phase = Callable[[Ctx], Awaitable[None]]


@dataclass(frozen=True)
class Mode:
    early: Phase | None = None
    middle: Phase | None = None
    late: Phase | None = None
    connect_before_tls: bool = False  # server mode: connect upstream before the TLS handshake

    @property
    def empty(self) -> bool:
        return not (self.early or self.middle or self.late)


@dataclass(frozen=True)
class Protocol:
    name: str
    client: Mode = Mode()
    server: Mode = Mode()


def is_prefix(line: str, prefix: str) -> bool:
    return line[: len(prefix)].upper() == prefix.upper()


# ------------------------------------------------------------------ smtp


async def smtp_client_middle(ctx: Ctx) -> None:
    remote = ctx.remote
    assert remote is not None
    while True:  # copy the (multiline) greeting to the app
        line = await remote.getline()
        ctx.local.putline(line)
        if not is_prefix(line, "220-"):
            break
    remote.putline(f"EHLO {ctx.settings.protocolHost or 'localhost'}")
    line = await remote.getline()
    while is_prefix(line, "250-"):
        line = await remote.getline()
    if not is_prefix(line, "250 "):
        raise ProtocolError("Remote server is not RFC 1425 compliant")
    remote.putline("STARTTLS")
    line = await remote.getline()
    while is_prefix(line, "220-"):
        line = await remote.getline()
    if not is_prefix(line, "220 "):
        raise ProtocolError("Remote server is not RFC 2487 compliant")


async def smtp_client_late(ctx: Ctx) -> None:
    s = ctx.settings
    if not (s.protocolUsername and s.protocolPassword):
        return
    remote = ctx.remote
    assert remote is not None
    remote.putline(f"EHLO {s.protocolHost or 'localhost'}")
    line = await remote.getline()
    while is_prefix(line, "250-"):
        line = await remote.getline()
    user, password = s.protocolUsername, s.protocolPassword
    if (s.protocolAuthentication or "plain").lower() == "login":
        remote.putline("AUTH LOGIN")
        if not is_prefix(await remote.getline(), "334 "):
            raise ProtocolError("Remote server does not support LOGIN authentication")
        remote.putline(base64.b64encode(user.encode()).decode())
        if not is_prefix(await remote.getline(), "334 "):
            raise ProtocolError("LOGIN authentication failed")
        remote.putline(base64.b64encode(password.encode()).decode())
        if not is_prefix(await remote.getline(), "235 "):
            raise ProtocolError("LOGIN authentication failed")
    else:
        token = base64.b64encode(b"\0" + user.encode() + b"\0" + password.encode()).decode()
        remote.putline(f"AUTH PLAIN {token}")
        if not is_prefix(await remote.getline(), "235 "):
            raise ProtocolError("PLAIN Authentication Failed")


async def smtp_server_middle(ctx: Ctx) -> None:
    local, remote = ctx.local, ctx.remote
    assert remote is not None
    # RFC 2487 detection: a client that speaks first is not waiting for a greeting
    if await local.readable_within(0.2):
        ctx.log(7, "RFC 2487 not detected")
        return
    ctx.log(7, "RFC 2487 detected")
    line = await remote.getline()
    if not (is_prefix(line, "220 ") or is_prefix(line, "220-")):
        raise ProtocolError("Unknown server welcome")
    head, rest = line[:4], line[4:]
    domain, _, greeting = rest.partition(" ")
    local.putline(f"{head}{domain} stunnel for {greeting}" if greeting else f"{head}{domain} stunnel")
    while is_prefix(line, "220-"):
        line = await remote.getline()
        local.putline(line)
    line = await local.getline()
    if not is_prefix(line, "EHLO "):
        raise ProtocolError("Unknown client EHLO")
    local.putline(f"250-{domain}")
    local.putline("250 STARTTLS")
    line = await local.getline()
    if not is_prefix(line, "STARTTLS"):
        raise ProtocolError("STARTTLS expected")
    local.putline("220 Go ahead")


# ------------------------------------------------------------------ shared helpers


def _remote(ctx: Ctx) -> Tap:
    remote = ctx.remote
    assert remote is not None, "this phase runs with the upstream connected"
    return remote


async def _skip_headers(tap: Tap) -> None:
    """Read HTTP header lines up to the empty line that ends them."""
    while await tap.getline():
        pass


async def _resolve(host: str, port: int, family: int = socket.AF_UNSPEC) -> list[tuple[int, Any, str | None]]:
    """All stream addresses of ``host`` (stunnel's hostport2addrlist); [] when it fails."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError):
        return []
    out: list[tuple[int, Any, str | None]] = []
    for fam, _type, _proto, _canon, addr in infos:
        item = (int(fam), addr, host)
        if item not in out:
            out.append(item)
    return out


# ------------------------------------------------------------------ pop3


async def pop3_client_middle(ctx: Ctx) -> None:
    remote = _remote(ctx)
    line = await remote.getline()
    if not is_prefix(line, "+OK "):
        raise ProtocolError("Unknown server welcome")
    ctx.local.putline(line)
    remote.putline("STLS")
    line = await remote.getline()
    if not is_prefix(line, "+OK "):
        raise ProtocolError("Server does not support TLS")


async def pop3_server_middle(ctx: Ctx) -> None:
    local, remote = ctx.local, _remote(ctx)
    line = await remote.getline()
    if not is_prefix(line, "+OK"):
        # stunnel decorates whatever came; a refusal ("-ERR busy") is better passed on as is
        local.putline(line)
        raise ProtocolError("Unknown server welcome")
    local.putline(f"{line} + stunnel")
    line = await local.getline()
    if is_prefix(line, "CAPA"):  # RFC 2449: the client asks what we offer
        local.write(b"+OK Stunnel capability list follows\r\nSTLS\r\n.\r\n")
        line = await local.getline()
    if not is_prefix(line, "STLS"):
        raise ProtocolError("Client does not want TLS")
    local.putline("+OK Stunnel starts TLS negotiation")


# ------------------------------------------------------------------ imap


async def imap_client_middle(ctx: Ctx) -> None:
    remote = _remote(ctx)
    line = await remote.getline()
    if not is_prefix(line, "* OK"):
        raise ProtocolError("Unknown server welcome")
    ctx.local.putline("* OK Connected.")
    remote.putline("stunnel STARTTLS")
    line = await remote.getline()
    if not is_prefix(line, "stunnel OK"):
        ctx.local.putline("* BYE stunnel: Server does not support TLS")
        raise ProtocolError("Server does not support TLS", reset=False)


async def imap_server_middle(ctx: Ctx) -> None:
    local, remote = ctx.local, _remote(ctx)
    # RFC 2595 detection: a client that speaks first wants TLS at once (imaps)
    if await local.readable_within(0.2):
        ctx.log(7, "RFC 2595 not detected")
        return
    ctx.log(7, "RFC 2595 detected")
    line = await remote.getline()
    if not is_prefix(line, "* OK"):
        raise ProtocolError("Unknown server welcome")
    # the greeting's capabilities lack STARTTLS: make the client ask for them instead
    at = line.find("CAPABILITY")
    if at < 0:
        at = line.find("capability")
    if at >= 0:
        line = f"{line[:at]}K{line[at + 1 :]}"
    local.putline(f"{line} (stunnel)")
    reason, level = "", 3
    while True:
        line = await local.getline()
        tag, space, tail = line.partition(" ")
        if not space:
            reason = f"Unexpected client command {line}"
            break
        if is_prefix(tail, "STARTTLS"):
            local.putline(f"{tag} OK Begin TLS negotiation now")
            return
        if is_prefix(tail, "CAPABILITY"):
            remote.putline(line)
            answer = await remote.getline()
            if answer.startswith("*"):
                local.putline(f"{answer} STARTTLS")
                answer = await remote.getline()
            local.putline(answer)
            _tag, _sp, status = answer.partition(" ")
            if not _sp or not is_prefix(status, "OK"):
                local.putline("* BYE unexpected server response")
                reason = f"Unexpected server response: {answer}"
                break
        elif is_prefix(tail, "LOGOUT"):
            local.putline("* BYE server terminating")
            local.putline(f"{tag} OK LOGOUT completed")
            reason, level = "IMAP client logged out before STARTTLS", 6
            break
        else:
            local.putline("* BYE stunnel: unexpected command")
            local.putline(f"{tag} BAD {tail} unexpected")
            reason = f"Unexpected client command {tail}"
            break
    # log out of the server cleanly, then close without a reset
    remote.putline("stunnel LOGOUT")
    with contextlib.suppress(ProtocolError):
        if (await remote.getline()).startswith("*"):
            await remote.getline()
    raise ProtocolError(reason, reset=False, level=level)


# ------------------------------------------------------------------ nntp


async def nntp_client_middle(ctx: Ctx) -> None:
    remote = _remote(ctx)
    line = await remote.getline()
    if not (is_prefix(line, "200 ") or is_prefix(line, "201 ")):
        raise ProtocolError("Unknown server welcome")
    ctx.local.putline(line)
    remote.putline("STARTTLS")
    line = await remote.getline()
    if not is_prefix(line, "382 "):
        raise ProtocolError("Server does not support TLS")


# ------------------------------------------------------------------ ldap (RFC 2830)

OID_STARTTLS = b"1.3.6.1.4.1.1466.20037"
# LDAPMessage { messageID 1, extendedReq [APPLICATION 23] { requestName [0] OID } }:
# SEQUENCE, INTEGER 1, APPLICATION 23 (constructed), context [0] primitive; no requestValue
LDAP_STARTTLS = (
    bytes(
        [
            0x30,
            5 + 2 + len(OID_STARTTLS),
            0x02,
            0x01,
            0x01,
            0x77,
            2 + len(OID_STARTTLS),
            0x80,
            len(OID_STARTTLS),
        ]
    )
    + OID_STARTTLS
)
LDAP_LONG_LENGTH = 0x84  # what WinLDAP sends: four length octets follow
LDAP_MAX_RESPONSE = 128


async def ldap_client_middle(ctx: Ctx) -> None:
    remote = _remote(ctx)
    ctx.log(7, "Sending LDAP Start TLS request")
    remote.write(LDAP_STARTTLS)
    ctx.log(7, "Receiving LDAP response tag")
    if (await remote.read_exact(1))[0] != 0x30:
        raise ProtocolError("LDAP response is not UNIVERSAL SEQUENCE")
    ctx.log(7, "Receiving LDAP response length")
    size = (await remote.read_exact(1))[0]
    if size == LDAP_LONG_LENGTH:
        size = int.from_bytes(await remote.read_exact(4), "big")
    if size > LDAP_MAX_RESPONSE:
        raise ProtocolError(f"LDAP response too long ({size} byte(s))")
    ctx.log(7, f"Receiving LDAP response value ({size} byte(s))")
    # stunnel decodes a zeroed fixed buffer: what the server left out reads as 0
    body = (await remote.read_exact(size)).ljust(LDAP_MAX_RESPONSE + 8, b"\0")
    ctx.log(7, "Decoding LDAP response value")
    if body[0] != 0x02:
        raise ProtocolError("LDAP response has an incorrect message ID type")
    if body[1] != 0x01:
        raise ProtocolError("LDAP response has an unexpected message ID length")
    if body[2] != 0x01:
        raise ProtocolError("LDAP response has an unexpected message ID value")
    if body[3] != 0x78:  # [APPLICATION 24] ExtendedResponse
        raise ProtocolError("LDAP response protocol op is not ExtendedResponse")
    at = 5 + (4 if body[4] == LDAP_LONG_LENGTH else 0)  # its length is not checked
    if body[at] != 0x0A:
        raise ProtocolError("LDAP response has an unexpected result code type")
    if body[at + 1] != 0x01:
        raise ProtocolError("LDAP response has an unexpected result code length")
    if body[at + 2] != 0x00:
        raise ProtocolError(f"LDAP response has indicated an error ({body[at + 2]})")
    ctx.log(6, "LDAP Start TLS successfully negotiated")


# ------------------------------------------------------------------ pgsql

PG_SSL_REQUEST = bytes([0, 0, 0, 8, 0x04, 0xD2, 0x16, 0x2F])  # length 8, code 80877103
PG_GSS_REQUEST = bytes([0, 0, 0, 8, 0x04, 0xD2, 0x16, 0x30])  # length 8, code 80877104


def _pg_error(fields: list[tuple[str, str]]) -> bytes:
    body = b"".join(code.encode() + text.encode() + b"\0" for code, text in fields) + b"\0"
    return b"E" + struct.pack("!I", 4 + len(body)) + body


# stunnel's canned answer to a GSSENCRequest (an ErrorResponse, then it closes)
PG_GSS_REFUSAL = _pg_error(
    [("S", "ERROR"), ("C", "XX000"), ("M", "SSL expected but not requested by client")]
)


async def pgsql_client_middle(ctx: Ctx) -> None:
    remote = _remote(ctx)
    remote.write(PG_SSL_REQUEST)
    if await remote.read_exact(1) != b"S":  # 'N': the server prefers no TLS
        raise ProtocolError("PostgreSQL server rejected TLS")


async def pgsql_server_early(ctx: Ctx) -> None:
    local = ctx.local
    ctx.log(7, "Started server-side psql protocol negotiation")
    request = await local.read_exact(8)
    if request == PG_GSS_REQUEST:
        local.write(PG_GSS_REFUSAL)
        raise ProtocolError("GSSAPI encryption requested, rejecting gracefully", reset=False, level=6)
    if request != PG_SSL_REQUEST:
        # no way to send an error before the startup packet: just drop the client
        raise ProtocolError("PostgreSQL client did not request TLS, rejecting")
    ctx.log(7, "SSLRequest received")
    local.write(b"S")


# ------------------------------------------------------------------ cifs

NB_SESSION_REQUEST = 0x81
NB_NEGATIVE_RESPONSE = 0x83
NB_USE_TLS = 0x8E
NB_ACCESS_DENIED = 0x81


async def cifs_client_middle(ctx: Ctx) -> None:
    remote = _remote(ctx)
    remote.write(bytes([NB_SESSION_REQUEST, 0, 0, 0]))  # a zero-length session request
    answer = await remote.read_exact(5)
    if answer[0] != NB_NEGATIVE_RESPONSE:
        raise ProtocolError("Negative response expected")
    if answer[2] != 0 or answer[3] != 1:
        raise ProtocolError("Unexpected NetBIOS response size")
    if answer[4] != NB_USE_TLS:
        raise ProtocolError("Remote server does not require TLS")


async def cifs_server_early(ctx: Ctx) -> None:
    local = ctx.local
    header = await local.read_exact(4)
    size = header[2] << 8 | header[3]
    if size > 124:
        raise ProtocolError("Received block too long")
    await local.read_exact(size)
    if header[0] != NB_SESSION_REQUEST:
        local.write(bytes([NB_NEGATIVE_RESPONSE, 0, 0, 1, NB_ACCESS_DENIED]))
        raise ProtocolError("Client did not send session setup")
    local.write(bytes([NB_NEGATIVE_RESPONSE, 0, 0, 1, NB_USE_TLS]))


# ------------------------------------------------------------------ connect (HTTP CONNECT)


def _server_header() -> str:
    from tunnel import STUNNEL_COMPAT_VERSION

    return f"Server: stunnel/{STUNNEL_COMPAT_VERSION}"


async def connect_client_middle(ctx: Ctx) -> None:
    remote, s = _remote(ctx), ctx.settings
    host = s.protocolHost
    if not host:
        raise ProtocolError("protocolHost not specified")
    lines = [f"CONNECT {host} HTTP/1.1", f"Host: {host}"]
    if s.protocolUsername and s.protocolPassword:
        if (s.protocolAuthentication or "basic").lower() == "ntlm":  # conf rejects it first
            raise ProtocolError("NTLM authentication is not available")
        token = base64.b64encode(f"{s.protocolUsername}:{s.protocolPassword}".encode()).decode()
        lines.append(f"Proxy-Authorization: basic {token}")
    lines.extend(s.protocolHeader)  # custom headers, verbatim
    lines.append("")
    remote.write("".join(f"{line}\r\n" for line in lines).encode())
    status = await remote.getline()
    if not (is_prefix(status, "HTTP/1.0 2") or is_prefix(status, "HTTP/1.1 2")):
        ctx.log(6, f"CONNECT reply: {status[:200]}")
        with contextlib.suppress(ProtocolError):
            await _skip_headers(remote)
        raise ProtocolError("CONNECT request rejected")
    ctx.log(6, "CONNECT request accepted")
    await _skip_headers(remote)


async def connect_server_early(ctx: Ctx) -> None:
    local = ctx.local

    def answer(status: str) -> None:
        local.write(f"HTTP/1.0 {status}\r\n{_server_header()}\r\n\r\n".encode())

    request = await local.getline()
    if not is_prefix(request, "CONNECT "):
        answer("400 Bad Request Method")
        raise ProtocolError("CONNECT request expected: 400 Bad Request Method")
    target, space, proto = request[8:].partition(" ")
    if not space or not is_prefix(proto, "HTTP/"):
        answer("400 Bad Request Protocol")
        raise ProtocolError("CONNECT request without HTTP version: 400 Bad Request Protocol")
    await _skip_headers(local)
    targets: list[tuple[int, Any, str | None]] = []
    from tunnel.addr import parse_endpoint

    try:
        ep = parse_endpoint(target)
    except ValueError:
        ep = None
    if ep is not None and ep.path is None:  # no Unix socket paths from the network
        targets = await _resolve(ep.host or "localhost", ep.port)
    if not targets:
        answer("404 Not Found")
        raise ProtocolError(f'CONNECT target "{target[:200]}" not resolved: 404 Not Found')
    ctx.targets = targets
    answer("200 OK")


# ------------------------------------------------------------------ socks

SOCKS5_ERRORS = {
    0x01: "General SOCKS server failure",
    0x02: "Connection not allowed by ruleset",
    0x03: "Network unreachable",
    0x04: "Host unreachable",
    0x05: "Connection refused",
    0x06: "TTL expired",
    0x07: "Command not supported",
    0x08: "Address type not supported",
}
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h (and IP6T_SO_ORIGINAL_DST)


def _port_number(text: str) -> int | None:
    if text.isascii() and text.isdigit():
        port = int(text)
        return port if port <= 65535 else None
    try:
        return socket.getservbyname(text, "tcp")
    except OSError:
        return None


def _original_dst(side: Side) -> tuple[int, str, int]:
    """Where the app meant to go before iptables REDIRECT (stunnel's original_dst)."""
    transport = side.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        raise ProtocolError("getsockopt SO_ORIGINAL_DST: the client socket is gone", reset=False)
    error = OSError(errno.ENOENT, os.strerror(errno.ENOENT))
    for level, size in ((socket.IPPROTO_IPV6, 28), (socket.SOL_IP, 16)):
        try:
            raw = sock.getsockopt(level, SO_ORIGINAL_DST, size)
        except OSError as exc:
            error = exc
            continue
        port = int.from_bytes(raw[2:4], "big")
        if int.from_bytes(raw[0:2], sys.byteorder) == socket.AF_INET6:
            return socket.AF_INET6, socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
        return socket.AF_INET, socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    code = error.errno or errno.ENOENT
    raise ProtocolError(f"getsockopt SO_ORIGINAL_DST: {os.strerror(code)} ({code})", reset=False)


async def socks_client_late(ctx: Ctx) -> None:
    """SOCKS5 over the TLS connection: no authentication, CONNECT to protocolHost."""
    remote = _remote(ctx)
    remote.write(b"\x05\x01\x00")  # version 5, one method: NO AUTHENTICATION REQUIRED
    version, method = await remote.read_exact(2)
    if version != 5:
        raise ProtocolError(f"Invalid SOCKS5 message version 0x{version:02x}", reset=False)
    if method != 0x00:
        raise ProtocolError("No supported SOCKS5 authentication method received", reset=False)
    target = ctx.settings.protocolHost
    if target:  # explicit destination, sent as a DOMAINNAME
        host, colon, port_text = target.rpartition(":")
        if not colon:
            host, port_text = "localhost", target
        name = host.encode("idna") if not host.isascii() else host.encode()
        if len(name) > 255:
            raise ProtocolError("protocolHost too long", reset=False)
        port = _port_number(port_text)
        if port is None:
            raise ProtocolError(
                f"Invalid port: {port_text} (error: Servname not supported for ai_socktype)", reset=False
            )
        ctx.log(6, "Sending SOCKS5 DOMAINNAME")
        remote.write(bytes([5, 1, 0, 3, len(name)]) + name + port.to_bytes(2, "big"))
    else:  # transparent destination
        family, addr, port = _original_dst(ctx.local.side)
        if family == socket.AF_INET6:
            ctx.log(6, "Sending SOCKS5 IPv6 address")
            remote.write(bytes([5, 1, 0, 4]) + socket.inet_pton(family, addr) + port.to_bytes(2, "big"))
        else:
            ctx.log(6, "Sending SOCKS5 IPv4 address")
            remote.write(bytes([5, 1, 0, 1]) + socket.inet_pton(family, addr) + port.to_bytes(2, "big"))
    head = await remote.read_exact(4)
    if head[3] == 0x04:
        await remote.read_exact(16 + 2)
    elif head[3] == 0x03:  # stunnel reads 6 bytes here and loses sync; read the name
        await remote.read_exact((await remote.read_exact(1))[0] + 2)
    else:
        await remote.read_exact(4 + 2)
    if head[0] != 5:
        raise ProtocolError(f"Invalid SOCKS5 message version 0x{head[0]:02x}", reset=False)
    if head[1] == 0x00:
        ctx.log(6, "SOCKS5 request succeeded")
        return
    text = SOCKS5_ERRORS.get(head[1], f"Unknown error 0x{head[1]:02x}")
    raise ProtocolError(f"SOCKS5 request failed: {text}", reset=False)


def _socks_refusal(targets: list[tuple[int, Any, str | None]]) -> str | None:
    """stunnel's validate_connect_addr: SOCKS must not reach this host's loopback."""
    for family, addr, _name in targets:
        if family == socket.AF_INET6:
            ip6 = ipaddress.IPv6Address(str(addr[0]).split("%")[0])
            if ip6.is_loopback:
                return "SOCKS connection to the IPv6 loopback rejected"
            mapped = ip6.ipv4_mapped  # ::ffff:127.0.0.1 -- stunnel lets it through
            if mapped is not None and mapped.is_loopback:
                return "SOCKS connection to the IPv4 loopback rejected"
        elif family == socket.AF_INET:
            if ipaddress.IPv4Address(addr[0]).is_loopback:
                return "SOCKS connection to the IPv4 loopback rejected"
        else:
            return f"Unsupported address type 0x{family:02x}"
    return None


async def socks_server_middle(ctx: Ctx) -> None:
    """SOCKS inside TLS: the client names the destination; stunnel answers before connecting."""
    ctx.log(7, "Waiting for the SOCKS request")
    version = (await ctx.local.read_exact(1))[0]
    if version == 4:
        await _socks4_server(ctx)
    elif version == 5:
        await _socks5_method(ctx)
        await _socks5_server(ctx)
    else:
        raise ProtocolError(f"Unsupported SOCKS version 0x{version:02x}")


async def _socks4_server(ctx: Ctx) -> None:
    local = ctx.local
    head = await local.read_exact(7)  # command, port, IPv4 address
    command, port_raw, addr_raw = head[0], head[1:3], head[3:7]
    await local.getstring()  # USERID: ignored
    port = int.from_bytes(port_raw, "big")
    problem: str | None = None
    done: str | None = None  # a RESOLVE answer ends the connection without an error
    if command == 0x01:  # CONNECT
        ip = int.from_bytes(addr_raw, "big")
        if 0 < ip < 256:  # 0.0.0.x: SOCKS4a, a host name follows
            name = (await local.getstring()).decode("latin-1")
            targets = await _resolve(name, port)
            if targets:
                ctx.log(6, f'SOCKS4a resolved "{name}" to {len(targets)} host(s)')
                problem = _socks_refusal(targets)
            else:
                problem = f'SOCKS4a failed to resolve "{name}"'
        else:
            targets = [(socket.AF_INET, (socket.inet_ntop(socket.AF_INET, addr_raw), port), None)]
            ctx.log(6, "SOCKS4 address received")
            problem = _socks_refusal(targets)
        if problem is None:
            ctx.targets = targets
    elif command == 0xF0:  # RESOLVE (a Tor extension)
        name = (await local.getstring()).decode("latin-1")
        found = await _resolve(name, 0, socket.AF_INET)
        if found:
            addr_raw = socket.inet_pton(socket.AF_INET, found[0][1][0])
            done = f'SOCKS4a/TOR resolved "{name}"'
        else:
            problem = f'SOCKS4a/TOR failed to resolve "{name}"'
    else:
        problem = f"Unsupported SOCKS4/SOCKS4a command 0x{command:02x}"
    granted = problem is None
    local.write(bytes([0, 90 if granted else 91]) + port_raw + addr_raw)
    if problem is not None:
        raise ProtocolError(problem, reset=False)
    if done is not None:
        raise ProtocolError(done, reset=False, level=6)


async def _socks5_method(ctx: Ctx) -> None:
    local = ctx.local
    count = (await local.read_exact(1))[0]
    methods = await local.read_exact(count)
    method = 0x00 if 0x00 in methods else 0xFF  # only NO AUTHENTICATION REQUIRED
    local.write(bytes([5, method]))
    if method:
        raise ProtocolError("No supported SOCKS5 authentication method received", reset=False)


async def _socks5_server(ctx: Ctx) -> None:
    local = ctx.local
    # the answer echoes the request's header and address, as stunnel's shared buffer does
    reply = bytearray(22)
    reply[0:4] = await local.read_exact(4)
    version, command, atyp = reply[0], reply[1], reply[3]
    rep = 0x01
    problem: str | None = None
    done: str | None = None
    targets: list[tuple[int, Any, str | None]] = []
    if version != 0x05:
        problem = f"Invalid SOCKS5 message version 0x{version:02x}"
        reply[0] = 0x05
    elif command == 0x01:  # CONNECT
        if atyp == 0x01:
            reply[4:10] = await local.read_exact(4 + 2)
            host = socket.inet_ntop(socket.AF_INET, bytes(reply[4:8]))
            targets = [(socket.AF_INET, (host, int.from_bytes(reply[8:10], "big")), None)]
            ctx.log(6, "SOCKS5 IPv4 address received")
        elif atyp == 0x03:
            size = (await local.read_exact(1))[0]
            name = (await local.read_exact(size)).decode("latin-1")
            port = int.from_bytes(await local.read_exact(2), "big")
            targets = await _resolve(name, port)
            if targets:
                ctx.log(6, f'SOCKS5 resolved "{name}" to {len(targets)} host(s)')
            else:
                problem, rep = f'SOCKS5 failed to resolve "{name}"', 0x04
        elif atyp == 0x04:
            reply[4:22] = await local.read_exact(16 + 2)
            host = socket.inet_ntop(socket.AF_INET6, bytes(reply[4:20]))
            targets = [(socket.AF_INET6, (host, int.from_bytes(reply[20:22], "big"), 0, 0), None)]
            ctx.log(6, "SOCKS5 IPv6 address received")
        else:
            problem, rep = f"Unsupported SOCKS5 address type 0x{atyp:02x}", 0x07
        if targets:
            problem = _socks_refusal(targets)
            rep = 0x00 if problem is None else 0x02
    elif command == 0xF0:  # RESOLVE (a Tor extension)
        size = (await local.read_exact(1))[0]
        name = (await local.read_exact(size)).decode("latin-1")
        port = int.from_bytes(await local.read_exact(2), "big")
        found = await _resolve(name, port)
        if not found:
            problem, rep = f'SOCKS5/TOR failed to resolve "{name}"', 0x04
        elif found[0][0] == socket.AF_INET6:
            reply[3], reply[4:20] = 0x04, socket.inet_pton(socket.AF_INET6, found[0][1][0].split("%")[0])
            done, rep = f'SOCKS5/TOR resolved "{name}" to IPv6', 0x00
        else:
            reply[3], reply[4:8] = 0x01, socket.inet_pton(socket.AF_INET, found[0][1][0])
            done, rep = f'SOCKS5/TOR resolved "{name}" to IPv4', 0x00
    else:
        problem, rep = f"Unsupported SOCKS5 command 0x{command:02x}", 0x07
    reply[1] = rep
    if reply[3] == 0x04:
        local.write(bytes(reply))
    else:
        reply[3] = 0x01
        local.write(bytes(reply[:10]))
    if problem is not None:
        raise ProtocolError(problem, reset=False)
    if done is not None:
        raise ProtocolError(done, reset=False, level=6)
    ctx.targets = targets


# ------------------------------------------------------------------ proxy (HAProxy PROXY protocol)

PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PP2_TYPE_ALPN = 0x01
PP2_TYPE_SSL = 0x20
PP2_SUBTYPE_SSL_VERSION = 0x21
PP2_SUBTYPE_SSL_CN = 0x22
PP2_SUBTYPE_SSL_CIPHER = 0x23
PP2_CLIENT_SSL, PP2_CLIENT_CERT_CONN, PP2_CLIENT_CERT_SESS = 0x01, 0x02, 0x04


def _accepted_addresses(ctx: Ctx) -> tuple[int, Any, Any]:
    """The accepted socket's family, the client's address and the address it reached."""
    transport = ctx.local.side.transport
    if transport is None:
        raise ProtocolError("getpeername: the client socket is gone")
    sock = transport.get_extra_info("socket")
    family = int(sock.family) if sock is not None else socket.AF_UNSPEC
    return family, transport.get_extra_info("peername"), transport.get_extra_info("sockname")


def proxy_v1_header(family: int, peer: Any, local: Any) -> bytes:
    """``PROXY TCP4 src dst sport dport`` (stunnel's proxy_server_late)."""
    if family in (socket.AF_INET, socket.AF_INET6):
        proto = "TCP4" if family == socket.AF_INET else "TCP6"
        return f"PROXY {proto} {peer[0]} {local[0]} {peer[1]} {local[1]}\r\n".encode()
    return b"PROXY UNKNOWN\r\n"  # a Unix socket: no addresses to tell


def _tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def proxy_v2_header(family: int, peer: Any, local: Any, tlvs: bytes = b"") -> bytes:
    """The binary PROXY v2 header: version 2, command PROXY, TCP over IPv4/IPv6 or Unix stream."""
    if family == socket.AF_INET:
        fam = 0x11
        body = socket.inet_pton(family, peer[0]) + socket.inet_pton(family, local[0])
        body += struct.pack("!HH", peer[1], local[1])
    elif family == socket.AF_INET6:
        fam = 0x21
        body = socket.inet_pton(family, str(peer[0]).split("%")[0])
        body += socket.inet_pton(family, str(local[0]).split("%")[0])
        body += struct.pack("!HH", peer[1], local[1])
    elif family == socket.AF_UNIX:
        fam = 0x31
        src = peer.encode() if isinstance(peer, str) else bytes(peer or b"")
        dst = local.encode() if isinstance(local, str) else bytes(local or b"")
        body = src[:108].ljust(108, b"\0") + dst[:108].ljust(108, b"\0")
    else:
        fam, body = 0x00, b""  # AF_UNSPEC: the receiver uses the real connection's addresses
    body += tlvs
    return PROXY_V2_SIGNATURE + bytes([0x21, fam]) + struct.pack("!H", len(body)) + body


def _tls_tlvs(ctx: Ctx) -> bytes:
    """ALPN and PP2_TYPE_SSL (version, cipher, client certificate CN) of the accepted TLS."""
    from tunnel.relay import TlsSide

    side = ctx.local.side
    if not isinstance(side, TlsSide):
        return b""
    sslobj = side.sslobj
    out = b""
    alpn = sslobj.selected_alpn_protocol()
    if alpn:
        out += _tlv(PP2_TYPE_ALPN, alpn.encode())
    der = sslobj.getpeercert(binary_form=True)
    client = PP2_CLIENT_SSL | (PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS if der else 0)
    # the handshake got here, so a presented certificate passed whatever checks are configured
    verify = 0 if der else 1
    sub = _tlv(PP2_SUBTYPE_SSL_VERSION, (sslobj.version() or "").encode())
    cipher = sslobj.cipher()
    if cipher:
        sub += _tlv(PP2_SUBTYPE_SSL_CIPHER, cipher[0].encode())
    if der:
        from cryptography import x509
        from cryptography.x509.oid import NameOID

        try:
            names = x509.load_der_x509_certificate(der).subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        except ValueError:
            names = []
        if names:
            sub += _tlv(PP2_SUBTYPE_SSL_CN, str(names[0].value).encode())
    return out + _tlv(PP2_TYPE_SSL, struct.pack("!BI", client, verify) + sub)


async def proxy_server_late(ctx: Ctx) -> None:
    family, peer, local = _accepted_addresses(ctx)
    _remote(ctx).write(proxy_v1_header(family, peer, local))


async def proxy_v2_server_late(ctx: Ctx) -> None:
    family, peer, local = _accepted_addresses(ctx)
    _remote(ctx).write(proxy_v2_header(family, peer, local, _tls_tlvs(ctx)))


# ------------------------------------------------------------------ the registry

PROTOCOLS: dict[str, Protocol] = {
    "smtp": Protocol(
        "smtp",
        client=Mode(middle=smtp_client_middle, late=smtp_client_late),
        server=Mode(middle=smtp_server_middle, connect_before_tls=True),
    ),
    "pop3": Protocol(
        "pop3",
        client=Mode(middle=pop3_client_middle),
        server=Mode(middle=pop3_server_middle, connect_before_tls=True),
    ),
    "imap": Protocol(
        "imap",
        client=Mode(middle=imap_client_middle),
        server=Mode(middle=imap_server_middle, connect_before_tls=True),
    ),
    "nntp": Protocol("nntp", client=Mode(middle=nntp_client_middle)),
    "ldap": Protocol("ldap", client=Mode(middle=ldap_client_middle)),
    "pgsql": Protocol(
        "pgsql",
        client=Mode(middle=pgsql_client_middle),
        server=Mode(early=pgsql_server_early),
    ),
    "cifs": Protocol("cifs", client=Mode(middle=cifs_client_middle), server=Mode(early=cifs_server_early)),
    "connect": Protocol(
        "connect",
        client=Mode(middle=connect_client_middle),
        server=Mode(early=connect_server_early),
    ),
    "socks": Protocol(
        "socks",
        client=Mode(late=socks_client_late),
        server=Mode(middle=socks_server_middle),
    ),
    "proxy": Protocol("proxy", server=Mode(late=proxy_server_late)),
    "proxy-v2": Protocol("proxy-v2", server=Mode(late=proxy_v2_server_late)),
}

# stunnel's names that cannot exist outside its Windows build
WINDOWS_ONLY = {"capwin", "capwinctrl"}

# protocolAuthentication values each protocol knows (stunnel's defaults first)
AUTHENTICATION: dict[str, tuple[str, ...]] = {"smtp": ("plain", "login"), "connect": ("basic",)}

# values stunnel knows that pytunnel refuses, and why (for the configuration error's hint)
AUTHENTICATION_UNAVAILABLE: dict[str, str] = {
    "ntlm": (
        "NTLM (v1) needs MD4 and single DES, which OpenSSL 3 keeps in its legacy provider "
        "and Python's hashlib no longer offers; use basic (inside a TLS-protected network) instead"
    ),
}


def decides_endpoint(name: str, client: bool) -> bool:
    """True when the protocol picks the upstream itself (SOCKS server): stunnel counts it as
    the section's second endpoint, so such a section has ``accept`` and no ``connect``."""
    return name.lower() == "socks" and not client


def check(settings: ServiceSettings) -> str | None:
    """stunnel's per-protocol init checks (its ``*_init``), for configuration time."""
    name = (settings.protocol or "").lower()
    if name == "connect" and settings.client and not settings.protocolHost:
        return "protocolHost not specified"
    return None


def names(client: bool) -> list[str]:
    return sorted(n for n, p in PROTOCOLS.items() if not (p.client if client else p.server).empty)


def lookup(name: str, client: bool) -> Mode:
    """The phases of ``name`` in this mode; ValueError with stunnel's text when there are none."""
    key = name.lower()
    if key in WINDOWS_ONLY:
        raise ValueError(f"protocol {name} exists only for stunnel's Windows CAPWIN integration")
    proto = PROTOCOLS.get(key)
    if proto is None:
        raise ValueError("Protocol not supported")
    mode = proto.client if client else proto.server
    if mode.empty:
        raise ValueError(
            f"The configured protocol is not supported in the {'client' if client else 'server'} mode"
        )
    return mode
