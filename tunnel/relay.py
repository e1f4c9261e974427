"""The data path: two asyncio protocols per connection, and how a connection ends.

Theory of operation
===================

A connection has two sides, each an asyncio protocol on a plain TCP (or Unix) transport reading into
one buffer all sides share (``relaytypes.SharedBuffer``).  The *plain* side passes bytes through.
The *TLS* side runs TLS itself over an ``ssl.SSLObject`` and two ``MemoryBIO``s: asyncio's own SSL
transport cannot half-close, cannot resume a client session, and hides close_notify from us, and a
stunnel replacement needs all three.  Bytes read on one side are written to the other unchanged;
nothing parses the application protocol.  A handshake's last flight leaves with the first data
(``TlsSide._flush``).

Flow control.  When one side's transport write buffer passes its high-water mark (``pause_writing``),
we stop reading the *other* side's transport, and resume on ``resume_writing``.  Memory per
connection stays bounded when one end stops reading.

Close semantics (each direction is closed independently):

* **close_notify from the TLS peer**: a clean end of TLS -> plain: ``write_eof()`` (TCP FIN) on
  the plain socket, and plain -> TLS keeps relaying until it ends too.
* **TCP EOF without close_notify** (possible truncation): the same, as in stunnel, logged at
  info level as ``TLS socket closed without close_notify``.
* **EOF from the plain side**: close_notify (``SSLObject.unwrap``) then a TCP FIN on the TLS
  socket; reading from the TLS peer goes on until it ends its direction (and the reverse).
* **TIMEOUTclose**: once one direction has ended, the other has ``TIMEOUTclose``
  seconds of inactivity to finish before both sockets are closed (0 = close at once,
  stunnel's setting for peers that never send close_notify).  While both directions
  are open the inactivity limit is ``TIMEOUTidle``.
* **Errors**: a TLS error or a reset ends the whole connection; with ``reset = yes`` (the
  default) the plain side gets a TCP RST (``SO_LINGER`` 0), never a clean EOF.

Every connection ends with exactly one :class:`CloseReason`; the summary line and the
counters key on it.  Ended, and with its opening over, a connection is taken apart
(``Connection.release``): its SSL objects are freed then, not by a later cyclic GC.

The data path knows one narrow :class:`Owner` (name, limits, log, on-closed callback) and, during
a ``protocol =`` negotiation, one :class:`Tap` per side; the opening (``tunnel/opening.py``) builds
and links both sides and gets nothing back but the close report.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from collections.abc import Callable
from typing import Any

from tunnel import ossl
from tunnel.reasons import CloseReason, HandshakeFailure
from tunnel.relaytypes import Owner, SharedBuffer, Tap, not_connected
from tunnel.sockopts import set_linger_zero
from tunnel.tlsnotes import SLOT, Notes, reason_of

READ_SIZE = 65536


class Side(SharedBuffer):
    """One end of a connection.  Subclasses differ in how bytes cross the transport."""

    transport: asyncio.Transport | None = None
    conn: Connection
    made_hook: Callable[[Side], None] | None = None
    # protocol negotiation (``protocol = smtp`` ...): while set, what arrives goes here
    tap: Tap | None = None
    feeds_tls = False  # what it reads counts as "sent to socket"; PlainSide: "sent to TLS"

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.peer: Side | None = None
        self.eof_in = False  # this side's peer will send no more
        self.eof_out = False  # we sent EOF to this side
        self.read_paused = False
        self.write_paused = False
        self.closed = False
        self.early: list[bytes] = []

    # ---- flow control (idempotent) ----------------------------------------
    def pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None and not self.closed:
            self.read_paused = True
            try:  # noqa: SIM105 - suppress() costs 3 Python calls, twice a connection
                self.transport.pause_reading()
            except (RuntimeError, AttributeError):
                pass

    def resume_reading(self) -> None:
        if self.read_paused and self.transport is not None and not self.closed:
            self.read_paused = False
            try:  # noqa: SIM105
                self.transport.resume_reading()
            except (RuntimeError, AttributeError):
                pass

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.peer is not None and self.conn.linked:
            self.peer.resume_reading()

    # ---- asyncio callbacks ------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.made_hook is not None:
            self.made_hook(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.tap is not None:
            self.tap.feed_eof()
        self.conn.side_lost(self, exc)

    # ---- used by the peer side -------------------------------------------
    def send(self, data: bytes | memoryview) -> None:
        raise NotImplementedError

    def send_eof(self) -> None:
        raise NotImplementedError

    def close(self, rst: bool = False) -> None:
        if self.transport is None or self.closed:
            return
        if rst:
            set_linger_zero(self.transport)
            self.transport.abort()
        else:
            self.transport.close()

    def received(self, data: bytes | memoryview) -> None:  # a view: see SharedBuffer
        if self.tap is not None:
            self.tap.feed(bytes(data))
            return
        conn = self.conn
        conn.last_activity = conn.loop.time()
        peer = self.peer
        if peer is not None:
            conn.relayed(self, len(data))
            peer.send(data)
        else:
            # Not linked yet (uvloop ignores pause_reading() inside connection_made):
            # keep what arrived and stop reading until the other side is up.
            self.early.append(bytes(data))
            self.read_paused = False
            self.pause_reading()

    def received_eof(self) -> None:
        if self.tap is not None:
            self.tap.feed_eof()
            return
        if self.eof_in:
            return
        self.eof_in = True
        self.conn.direction_done(self)


class PlainSide(Side):
    """The plaintext socket: the app in client mode, the upstream in server mode."""

    feeds_tls = True

    def data_received(self, data: bytes | memoryview) -> None:
        self.received(data)

    def eof_received(self) -> bool:
        self.received_eof()
        return True  # keep the transport open: we may still write

    def send(self, data: bytes | memoryview) -> None:  # from the TLS side: bytes
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def send_eof(self) -> None:
        if self.eof_out or self.transport is None or self.closed:
            return
        self.eof_out = True
        if self.transport.can_write_eof():
            self.transport.write_eof()


class TlsSide(Side):
    """TLS over a plain transport through ``SSLObject`` and memory BIOs."""

    def __init__(
        self,
        conn: Connection,
        context: ssl.SSLContext,
        server_side: bool,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
        on_handshake: Callable[[TlsSide, BaseException | None], None] | None = None,
    ) -> None:
        super().__init__(conn)
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj = context.wrap_bio(
            self.incoming,
            self.outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
        )
        if session is not None and not ossl.set_session(self.sslobj, session):
            self.sslobj.session = session  # CPython's setter: a copy through DER
        self.handshaking = True
        self.fatal_alert = False  # the handshake failed and OpenSSL wrote its alert
        self.on_handshake = on_handshake
        self.pending: list[bytes] = []
        self.clean_eof = False
        self.failed = False
        self.started = conn.loop.time()  # for pytunnel_handshake_seconds
        self.deferred = False  # plaintext first (STARTTLS): start_tls() begins the handshake
        self.notes = Notes()  # filled by OpenSSL's callbacks (PSK identity, ...)
        self.flush_due = False  # the handshake's last flight waits for the end of the loop turn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if not self.deferred:
            self._handshake()

    def start_tls(self, leftover: bytes = b"") -> None:
        """End the plaintext phase: ``leftover`` is what already arrived of the handshake."""
        self.deferred = False
        self.started = self.conn.loop.time()
        if leftover:
            self.incoming.write(leftover)
        if self.transport is not None and not self.closed:
            self._handshake()

    def _flush(self, now: bool = False) -> None:
        """Send the TLS output, unless a handshake's last flight waits for the turn's end (the first
        data and a close_notify that link() replays then go with it in one send)."""
        pending = self.outgoing.pending
        if self.flush_due and not now and pending < READ_SIZE:
            return
        self.flush_due = False
        if pending and self.transport is not None and not self.closed:
            self.transport.write(self.outgoing.read())

    def close(self, rst: bool = False) -> None:
        self._flush(now=True)  # what was written goes before the FIN (or the reset), as it did
        super().close(rst)

    def _do_handshake(self) -> None:
        SLOT.notes = self.notes
        try:
            self.sslobj.do_handshake()
        finally:
            SLOT.notes = None

    def _handshake(self) -> None:
        try:
            self._do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, OSError) as exc:
            self.fatal_alert = isinstance(exc, ssl.SSLError) and self.outgoing.pending > 0
            self._flush()
            self.handshaking = False
            self.failed = True  # whatever arrives later must not mask this reason
            if self.on_handshake is not None:
                self.on_handshake(self, exc)
            return
        self.handshaking = False
        if self.on_handshake is not None:
            self.on_handshake(self, None)  # first: the opening's task runs before the flush below
        if self.outgoing.pending and not self.flush_due:
            self.flush_due = True
            self.conn.loop.call_soon(self._flush, True)
        if self.incoming.pending and not self.closed:
            self._read_records()

    def data_received(self, data: bytes | memoryview) -> None:
        if self.failed:
            return
        if self.deferred:  # plaintext before STARTTLS: for the protocol's tap
            if self.tap is not None:
                self.tap.feed(bytes(data))
            else:
                self.early.append(bytes(data))
            return
        self.incoming.write(data)
        if self.handshaking:
            self._handshake()
            return
        self._read_records()

    def _read_records(self) -> None:
        chunks: list[bytes] = []
        read = self.sslobj.read
        try:
            while True:
                chunk = read(READ_SIZE)
                if not chunk:
                    # CPython returns b"" (rather than raising) for close_notify
                    raise ssl.SSLZeroReturnError(ssl.SSL_ERROR_ZERO_RETURN, "close_notify")
                chunks.append(chunk)
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self.clean_eof = True
            self._deliver(chunks)
            self._flush()
            self.conn.log(6, "TLS closed (SSL_read)")  # stunnel's words for a close_notify
            self.received_eof()
            return
        except ssl.SSLEOFError:
            # TCP FIN without close_notify (OpenSSL 3: "unexpected eof while reading")
            self._deliver(chunks)
            if not self.eof_in:
                self.conn.log(6, "TLS socket closed (SSL_read) without close_notify")
                self.received_eof()
            return
        except ssl.SSLError as exc:
            self._deliver(chunks)
            self.conn.fail(CloseReason.TLS_ERROR, f"TLS error: {reason_of(exc)}")
            return
        self._deliver(chunks)
        if self.pending:
            self._retry_pending()
        self._flush()

    def _deliver(self, chunks: list[bytes]) -> None:
        if not chunks:
            return
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self.received(data)

    def eof_received(self) -> bool:
        # TCP FIN from the TLS peer.  Drain whatever records are buffered first.
        if self.failed:
            return True
        if self.deferred:
            if self.tap is not None:
                self.tap.feed_eof()
            return True
        if not self.handshaking and not self.eof_in:
            self.incoming.write_eof()
            self._read_records()
            if not self.eof_in and self.conn.reason is None:
                self.conn.log(6, "TLS socket closed (SSL_read) without close_notify")
                self.received_eof()
        elif self.handshaking:
            self.handshaking = False
            if self.on_handshake is not None:
                self.on_handshake(self, ConnectionResetError("peer closed during the TLS handshake"))
        return True

    def send(self, data: bytes | memoryview) -> None:
        if self.closed or self.eof_out:
            return
        if self.pending:
            self.pending.append(bytes(data))
            return
        try:
            self.sslobj.write(data)
        except ssl.SSLWantReadError:
            self.pending.append(bytes(data))
        except ssl.SSLError as exc:
            self.conn.fail(CloseReason.TLS_ERROR, f"TLS error: {reason_of(exc)}")
            return
        self._flush()

    def _retry_pending(self) -> None:
        pending, self.pending = self.pending, []
        for data in pending:
            self.send(data)

    def send_eof(self) -> None:
        if self.eof_out or self.closed or self.transport is None:
            return
        self.eof_out = True
        with contextlib.suppress(ssl.SSLError, OSError):  # SSLWantRead, SSLZeroReturn: nothing to do
            self.sslobj.unwrap()  # sends close_notify
        self._flush(now=True)
        if self.transport.can_write_eof():
            self.transport.write_eof()


# Connection's attributes (slots: a connection costs less memory while it lives)
_SLOTS = (
    "id owner loop plain tls linked to_tls to_sock started last_activity reason detail timer "
    "done_dirs peer_addr origin ended peer_cn target target_host waiter rst_sent redirected failure "
    "holds __weakref__"
)


class Connection:
    """One relayed connection: both sides, counters, timers and the one close reason."""

    __slots__ = tuple(_SLOTS.split())

    def __init__(self, owner: Owner, conn_id: str) -> None:
        self.id = conn_id
        self.owner = owner
        self.loop = asyncio.get_running_loop()
        self.plain: PlainSide | None = None
        self.tls: TlsSide | None = None
        self.linked = False
        self.to_tls = 0
        self.to_sock = 0
        self.started = time.monotonic()
        self.last_activity = self.loop.time()
        self.reason: CloseReason | None = None
        self.detail = ""
        self.timer: asyncio.TimerHandle | None = None
        self.done_dirs = 0
        self.peer_addr = ""
        # acceptProxy: (family, client, destination) a PROXY header carried; None: the socket's
        self.origin: tuple[int, Any, Any] | None = None
        self.ended = False
        self.peer_cn = ""
        self.redirected = False  # redirect: the client failed verification, goes to `redirect`
        self.target = ""  # the upstream address actually connected
        self.target_host: str | None = None  # its name as configured
        self.waiter: asyncio.Future[BaseException | None] | None = None  # upstream handshake
        self.rst_sent = False
        self.failure: HandshakeFailure | None = None  # why the handshake failed, for the counters
        self.holds = 0  # opening tasks that may still use the sides (see release())

    # ---- logging -----------------------------------------------------------
    def log(self, level: int, text: str, **fields: object) -> None:
        self.owner.log_conn(level, self.id, text, fields)

    # ---- lifecycle ---------------------------------------------------------
    def relayed(self, side: Side, n: int) -> None:
        """Count bytes as stunnel does: only what the data path passes on (a protocol's
        negotiation, or bytes never relayed, are not "sent")."""
        if side.feeds_tls:
            self.to_tls += n
        else:
            self.to_sock += n

    def link(self) -> None:
        """Both sides are up: start relaying in both directions."""
        assert self.plain is not None and self.tls is not None
        self.plain.peer = self.tls
        self.tls.peer = self.plain
        self.linked = True
        self.last_activity = self.loop.time()
        self._arm_timer()
        for side in (self.plain, self.tls):
            early, side.early = side.early, []
            for data in early:
                self.relayed(side, len(data))
                side.peer.send(data)  # type: ignore[union-attr]
        for side in (self.plain, self.tls):
            if side.eof_in and self.reason is None:
                self.direction_done(side)
        if self.reason is not None:
            return
        if not self.tls.write_paused:
            self.plain.resume_reading()
        if not self.plain.write_paused:
            self.tls.resume_reading()

    def _limit(self) -> float:
        opts = self.owner.settings
        return float(opts.TIMEOUTclose if self.done_dirs else opts.TIMEOUTidle)

    def _arm_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        limit = self._limit()
        self.timer = self.loop.call_at(self.last_activity + limit, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        if self.reason is not None:
            return
        limit = self._limit()
        if self.loop.time() - self.last_activity >= limit:
            if self.done_dirs:
                self.log(
                    3, "transfer: s_poll_wait: TIMEOUTclose exceeded: closing"
                )  # stunnel logs it as an error
                self.finish(CloseReason.CLOSED)
            else:
                self.log(6, "transfer: s_poll_wait: TIMEOUTidle exceeded: sending reset")
                self.finish(CloseReason.IDLE_TIMEOUT, rst=self.owner.settings.reset)
            return
        self._arm_timer()

    def direction_done(self, source: Side) -> None:
        """``source`` will send no more: pass the EOF on, close when both are done."""
        if not self.linked:
            return  # link() replays it once the other side is up
        self.done_dirs += 1
        peer = source.peer
        if peer is not None:
            peer.send_eof()
        if self.done_dirs >= 2:
            self.finish(CloseReason.CLOSED)
            return
        self.last_activity = self.loop.time()
        if self.owner.settings.TIMEOUTclose == 0:
            self.finish(CloseReason.CLOSED)
            return
        self._arm_timer()

    def fail(self, reason: CloseReason, detail: str, *, rst: bool | None = None, level: int = 3) -> None:
        """An error ends the whole connection (RST to the plain side with reset = yes, unless
        ``rst`` is False: stunnel's "don't reset" ends, after a reply that must arrive)."""
        if self.reason is not None:
            return
        self.detail = detail
        self.log(level, detail)
        self.finish(reason, rst=self.owner.settings.reset if rst is None else rst)

    def finish(self, reason: CloseReason, rst: bool = False) -> None:
        if self.reason is not None:
            return
        self.reason = reason
        self.rst_sent = rst
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
        if self.tls is not None:  # after a fatal alert, a FIN: a reset could lose the alert
            self.tls.close(rst=rst and reason is not CloseReason.CLOSED and not self.tls.fatal_alert)
        if self.plain is not None:
            self.plain.close(rst=rst)
        self._maybe_done()

    def side_lost(self, side: Side, exc: Exception | None) -> None:
        if isinstance(side, TlsSide) and side.failed and self.waiter is not None and self.reason is None:
            # the handshake failed and the peer hung up (it sends a reset after its alert)
            # before the waiting coroutine ran: that coroutine logs the handshake's reason
            return
        if self.reason is None:
            # ENOTCONN: write_eof on a socket the peer already reset; stunnel: like EPIPE
            if isinstance(exc, (ConnectionResetError, BrokenPipeError)) or not_connected(exc):
                where = ""
                if isinstance(side, TlsSide) and side.handshaking:
                    where = "SSL_accept: " if side.sslobj.server_side else "SSL_connect: "
                self.log(3 if where else 5, f"{where}{os.strerror(exc.errno or 104)} ({exc.errno or 104})")
                if where:
                    self.failure = HandshakeFailure.PEER_RESET
                # a reset mid-stream is passed on as a reset (reset = yes): a clean EOF would
                # tell the other end that a cut transfer was complete
                self.finish(CloseReason.PEER_RESET, rst=self.owner.settings.reset)
            elif exc is not None:
                self.fail(CloseReason.SOCKET_ERROR, f"socket error: {exc}")
            elif not side.eof_in:
                # closed without EOF first (e.g. transport aborted)
                side.eof_in = True
                self.direction_done(side)
            if self.reason is None:
                # the other side may still be relaying; it has nowhere to write
                self.finish(CloseReason.CLOSED)
        self._maybe_done()

    def _maybe_done(self) -> None:
        for s in (self.plain, self.tls):  # a loop, not all(): this runs 3 times a connection
            if s is not None and s.transport is not None and not s.closed:
                return
        if not self.ended:
            self.ended = True
            self.owner.connection_ended(self)
            self.release()

    def hold(self) -> None:
        self.holds += 1  # an opening task that may still use the sides was created

    def unhold(self) -> None:
        self.holds -= 1
        self.release()

    def release(self) -> None:
        """Ended, no opening task left: unlink the sides so that refcounting frees them and their
        SSL objects at once (as cycles they waited for a full GC: +4-7 MiB over 20,000 conns)."""
        if not self.ended or self.holds:
            return
        for side in (self.plain, self.tls):
            if side is not None:
                side.peer = side.made_hook = side.tap = None
        if self.tls is not None:
            self.tls.on_handshake = None
            if not self.tls.sslobj.server_side:
                ossl.keep_session(self.tls.sslobj)
        self.plain = self.tls = self.waiter = None

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "service": self.owner.name,
            "peer": self.peer_addr,
            "to_tls": self.to_tls,
            "to_sock": self.to_sock,
            "duration": round(time.monotonic() - self.started, 3),
            "reason": self.reason.value if self.reason else "open",
        }
