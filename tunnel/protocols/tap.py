"""The tap framework: how a ``protocol =`` talks on a connection before it is linked.

stunnel runs three optional phases per connection (``client_try`` in its client.c):

* **early**   on the accepted socket, before anything else;
* **middle**  client mode (and server protocols that need the upstream first): after the
  TCP connect and before TLS, in plaintext on the upstream; otherwise after the TLS
  handshake on the accepted side;
* **late**    after TLS is up and the upstream is connected.

A protocol is a set of such coroutines (a :class:`Mode` per direction) working on
:class:`Tap` byte streams, with stunnel's texts in its log lines and on the wire.  A peer
that says something unexpected ends that one connection with one log line
(:class:`ProtocolError`).

This module knows nothing of the data path: a tap works on any :class:`Pipe` (relay's
sides are ones) and a phase sees its connection through :class:`ConnectionView`.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from tunnel.settings import ServiceSettings

MAX_LINE = 8192

#: an upstream target as a protocol picks it (SOCKS, CONNECT): (family, sockaddr, host name)
Target = tuple[int, Any, str | None]


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


class Pipe(Protocol):
    """What a :class:`Tap` needs of one side of a connection (relay's ``Side``).

    ``tap``: while a tap is set there, what the side reads is fed to it (``feed`` /
    ``feed_eof``) instead of being relayed; ``early``: what arrived before that.
    ``transport``: the socket's, for plaintext before TLS and for its addresses.
    """

    @property
    def transport(self) -> asyncio.Transport | None: ...

    @property
    def closed(self) -> bool: ...

    @property
    def early(self) -> list[bytes]: ...

    @property
    def tap(self) -> object: ...

    @tap.setter
    def tap(self, value: Tap | None) -> None: ...

    def send(self, data: bytes) -> None:
        """Write through the side (encrypted when it is TLS and its handshake is done)."""

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


@runtime_checkable
class TlsPipe(Pipe, Protocol):
    """A pipe that carries TLS: its session's facts (ALPN, version, peer certificate)."""

    @property
    def sslobj(self) -> ssl.SSLObject: ...


class ConnectionView(Protocol):
    """What a protocol phase sees of its connection (relay's ``Connection``).

    ``origin``: (family, client address, address it reached) when a PROXY header from a load
    balancer named the client (``acceptProxy``); None: the accepted socket's own addresses."""

    def log(self, level: int, text: str) -> None: ...
    @property
    def origin(self) -> tuple[int, Any, Any] | None: ...


class Tap:
    """A byte stream over one side while a protocol talks on it.

    ``raw``: the bytes go straight to the socket (plaintext before TLS); otherwise through
    the side's ``send`` (encrypted when the side is TLS and its handshake is done).
    """

    def __init__(self, side: Pipe, raw: bool, timeout: float) -> None:
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

    conn: ConnectionView
    settings: ServiceSettings
    local: Tap
    remote: Tap | None = None
    # where to connect when the protocol decides it (SOCKS): (family, sockaddr, host name)
    targets: list[Target] | None = None
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


def is_prefix(line: str, prefix: str) -> bool:
    return line[: len(prefix)].upper() == prefix.upper()


def remote_of(ctx: Ctx) -> Tap:
    remote = ctx.remote
    assert remote is not None, "this phase runs with the upstream connected"
    return remote


async def resolve(host: str, port: int, family: int = socket.AF_UNSPEC) -> list[Target]:
    """All stream addresses of ``host`` (stunnel's hostport2addrlist); [] when it fails."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, family=family, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError):
        return []
    out: list[Target] = []
    for fam, _type, _proto, _canon, addr in infos:
        item = (int(fam), addr, host)
        if item not in out:
            out.append(item)
    return out
