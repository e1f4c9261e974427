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
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunnel.relay import Connection, Side
    from tunnel.settings import ServiceSettings

MAX_LINE = 8192


class ProtocolError(Exception):
    """The peer did not follow the protocol; the message is the connection's one log line."""


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
            raise ProtocolError("Connection closed by peer during protocol negotiation")
        self.side.resume_reading()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._waiter, self.timeout)
        except TimeoutError:
            raise ProtocolError("Protocol negotiation timed out (TIMEOUTbusy)") from None
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
                raise ProtocolError(f"Protocol line longer than {MAX_LINE} bytes")
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
                raise ProtocolError("String too long")
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


PROTOCOLS: dict[str, Protocol] = {
    "smtp": Protocol(
        "smtp",
        client=Mode(middle=smtp_client_middle, late=smtp_client_late),
        server=Mode(middle=smtp_server_middle, connect_before_tls=True),
    ),
}

# stunnel's names that cannot exist outside its Windows build
WINDOWS_ONLY = {"capwin", "capwinctrl"}


# protocolAuthentication values each protocol knows (stunnel's defaults first)
AUTHENTICATION: dict[str, tuple[str, ...]] = {"smtp": ("plain", "login")}


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
