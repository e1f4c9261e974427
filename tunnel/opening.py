"""A connection's opening: everything between accept and the first relayed byte.

Theory of operation
===================

One :class:`Opening` per accepted connection owns its whole opening, as one coroutine per
mode, in the order stunnel does it, and hands a linked pair of sides to the data path
(``tunnel/relay.py``).  It gets nothing back but the close report, which goes to the service
(``Service.connection_ended``).  The steps, each a method below:

1. **accept** (:meth:`Opening.accepted`): the listener's socket becomes a relay side (plain
   in client mode, TLS in server mode); the connection is registered, its ``l:`` socket
   options applied.  In client mode the app's bytes wait (reading paused) until linked.
   With ``acceptProxy`` the load balancer's PROXY header is read off first
   (``tunnel/proxyheader.py``): its address is the client's from then on.
2. **ident** (``ident = USER``): identd on the client's host is asked before anything else; a
   refused client gets no TLS handshake and no "accepted connection" line.  A ClientHello
   that arrives meanwhile waits in the side.
3. **protocol, early** (``protocol =``): the plaintext before TLS -- a STARTTLS dialogue, a
   SOCKS request -- over a tap on the side.  Server mode may connect the upstream here and
   run the **middle** phase with it (stunnel's ``connect_before_tls``).
4. **handshake**: the TLS handshake (ours as the server, or as the client after dialing),
   bounded by TIMEOUTbusy.  In server mode an **SNI** name may switch the connection to a
   virtual service, whose settings govern every later step.
5. **verdict**: the handshake's outcome, the peer checks (``verifyPeer``, ``check*``,
   pinning) and stunnel's lines; or **redirect**: a client that failed verification goes to
   ``redirect`` instead of ``connect``.
6. **OCSP** (``OCSP``/``OCSPaia``): the verified chain checked with its responders.  In
   client mode with ``verifyChain`` the handshake asked for a stapled response
   (``osslconn.request_status``); a conclusive staple answers for the leaf first.
7. **dial**: the upstream (``tunnel/upstream.py``): failover, resolution, ``local``,
   transparent source, or an ``exec`` program.  Client mode dials before its handshake.
8. **protocol, late**: what a protocol does once TLS is up (e.g. SMTP authentication).
9. **link**: both sides relay; what arrived early is replayed.

Every failure ends the connection with one reason at the step that found it
(``Connection.fail``); an exception that escapes a step is an internal error, logged, never
a half-open connection (:meth:`Opening.run`).

Imports: relay, upstream, listener (the budget), protocols, tls, ocsp (lazily), ossl and
osslconn (a resumed session's verification result), metrics, reasons, logs -- never the service registry above it: what it needs of a service is the
:class:`Venue` protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from tunnel import alpn, kex, ossl, osslconn, program, protocols, proxyheader
from tunnel.addr import format_sockaddr
from tunnel.ident import ask_ident
from tunnel.metrics import STATS, ServiceStats
from tunnel.reasons import CloseReason, HandshakeFailure
from tunnel.relay import Connection, PlainSide, Side, TlsSide
from tunnel.settings import ServiceSettings
from tunnel.sockopts import SocketOption, apply_socket_options, reassert_nodelay
from tunnel.tls import TlsConfig, client_sni
from tunnel.tlsnotes import reason_of
from tunnel.upstream import Failed, Upstream
from tunnel.verify import client_dn, peer_subject, subject_line


class Venue(Protocol):
    """What an opening needs of the service it opens for (and of an SNI secondary)."""

    @property
    def name(self) -> str: ...
    @property
    def settings(self) -> ServiceSettings: ...
    @property
    def tls(self) -> TlsConfig: ...
    @property
    def level(self) -> int: ...
    @property
    def counters(self) -> ServiceStats: ...
    @property
    def upstream(self) -> Upstream: ...
    @property
    def protocol(self) -> protocols.Mode | None: ...
    @property
    def sockopts_l(self) -> list[SocketOption]: ...
    @property
    def exec_remote(self) -> bool: ...
    @property
    def set_env(self) -> list[str]: ...
    @property
    def foreground(self) -> bool: ...
    @property
    def on_pipes(self) -> bool: ...
    def opened(self, conn: Connection, sock: socket.socket | None) -> None: ...
    def out_of_fds(self, exc: OSError) -> None: ...
    def ports(self) -> set[int]: ...
    def session_for(self, target: str) -> ssl.SSLSession | None: ...
    def sni_target(self, sslobj: object, say: Callable[[int, str], None]) -> Venue | None: ...


class Opening:
    """One connection's opening (see the module's theory of operation)."""

    __slots__ = ("venue", "conn", "busy")

    def __init__(self, venue: Venue, conn: Connection) -> None:
        self.venue = venue
        self.conn = conn
        self.busy = float(venue.settings.TIMEOUTbusy)

    # ---- 1. accept, 2. ident ---------------------------------------------------------
    def accepted(self, side: Side) -> None:
        """The listener's socket is up as ``side``: register, then ident or start."""
        venue, conn = self.venue, self.conn
        assert side.transport is not None
        sock = side.transport.get_extra_info("socket")
        venue.opened(conn, sock)
        if venue.settings.client:
            side.pause_reading()
        conn.peer_addr = format_sockaddr(side.transport.get_extra_info("peername"))
        if sock is not None and venue.sockopts_l:
            apply_socket_options(sock, sock.family, venue.sockopts_l)
        if venue.settings.ident or venue.settings.acceptProxy:
            # a load balancer's PROXY header comes first, then stunnel asks identd: a refused
            # client gets no TLS handshake and no "accepted connection" line.  Meanwhile a
            # ClientHello waits in side.early.
            held = isinstance(side, TlsSide) and not side.deferred
            if isinstance(side, TlsSide) and held:
                side.deferred = True
            conn.loop.create_task(self.run(self._ident_then_start(side, held)))
            return
        self._start()

    async def _ident_then_start(self, side: Side, held: bool) -> None:
        settings = self.venue.settings
        if settings.acceptProxy and not await proxyheader.take(self.conn, side, self.busy, settings.client):
            return
        if settings.ident and not await ask_ident(self.conn, settings, self._client_transport()):
            return
        self._start()
        if held and isinstance(side, TlsSide):
            early, side.early = side.early, []
            side.start_tls(b"".join(early))

    def _start(self) -> None:
        venue, conn = self.venue, self.conn
        if venue.level >= 5:  # inetd mode on pipes: no address, as stunnel says it
            whence = "" if venue.on_pipes else f" from {conn.peer_addr}"
            conn.log(
                5, f"Service [{venue.name}] accepted connection{whence}", event="accepted",
                peer=conn.peer_addr,
            )  # fmt: skip
        if venue.settings.client:
            conn.loop.create_task(self.run(self.client()))
        else:
            tls = self.conn.tls
            assert tls is not None
            # the handshake may end before the task first runs: the waiter exists from now on
            conn.waiter = _handshake_waiter(conn.loop, tls)
            conn.loop.create_task(self.run(self.server()))

    def run(self, work: Coroutine[Any, Any, None]) -> Coroutine[Any, Any, None]:
        """``work`` for a task; the connection is held (kept whole) from now until it ends."""
        self.conn.hold()
        return self._run(work)

    async def _run(self, work: Coroutine[Any, Any, None]) -> None:
        """No exception may leave a connection half set up."""
        conn = self.conn
        try:
            await work
        except protocols.ProtocolError as exc:
            reason = CloseReason.PROTOCOL_FAILED if exc.level <= 3 else CloseReason.CLOSED
            conn.fail(reason, str(exc), rst=None if exc.reset else False, level=exc.level)
        except Exception as exc:  # noqa: BLE001 - reported on the connection
            if self.venue.level >= 7:
                import traceback

                conn.log(7, "".join(traceback.format_exception(exc)).rstrip())
            conn.fail(CloseReason.INTERNAL_ERROR, f"Internal error: {exc!r}")
        finally:
            conn.unhold()

    # ---- the two modes -----------------------------------------------------------------
    async def client(self) -> None:
        """Client mode: the app's plaintext was accepted; TLS goes out to the upstream."""
        venue, conn = self.venue, self.conn
        mode = venue.protocol
        ctx: protocols.Ctx | None = None
        if mode is not None:
            assert conn.plain is not None
            ctx = protocols.Ctx(conn, venue.settings, protocols.Tap(conn.plain, raw=True, timeout=self.busy))
            if mode.early is not None:
                await mode.early(ctx)
        sock = await self.dial(venue, ctx.targets if ctx else None)
        if not isinstance(sock, socket.socket):  # None (no TLS side was given: no transport)
            return
        tcfg = venue.tls
        hostname = client_sni(venue.settings, conn.target_host)
        if hostname and venue.level >= 6:
            conn.log(6, f"SNI: sending servername: {hostname}")
        session = venue.session_for(conn.target) if venue.settings.sessionResume else None
        tls = TlsSide(conn, tcfg.context, server_side=False, server_hostname=hostname, session=session)
        conn.tls = tls
        if tcfg.staple_policy is not None:  # verifyChain: ask for a stapled OCSP response
            with contextlib.suppress(ossl.Unavailable):
                osslconn.request_status(tls.sslobj)
        conn.waiter = fut = _handshake_waiter(conn.loop, tls)
        tls.deferred = mode is not None and mode.middle is not None
        try:
            await conn.loop.create_connection(lambda: tls, sock=sock)
        except OSError as exc:
            sock.close()
            conn.fail(CloseReason.CONNECT_FAILED, f"s_connect: {exc}")
            return
        reassert_nodelay(tls.transport, venue.upstream.sockopts_r)
        if ctx is not None and mode is not None and mode.middle is not None:
            ctx.remote = protocols.Tap(tls, raw=True, timeout=self.busy)
            await mode.middle(ctx)
            tls.start_tls(ctx.remote.detach(pause=False))
        # stunnel bounds the TCP connect by TIMEOUTconnect, the handshake by TIMEOUTbusy
        outcome = await self.handshake(fut)
        if outcome is _TIMED_OUT:
            return
        if conn.reason is not None:
            tls.close()
            return
        # protocol = connect: TLS runs with the host behind the proxy (protocolHost)
        via_proxy = (venue.settings.protocol or "").lower() == "connect"
        expected = venue.settings.sni or (hostname if via_proxy else None) or conn.target_host
        if not self.verdict(tcfg, tls, outcome, expected) or not await self.ocsp(venue, tls):
            return
        if ctx is not None and mode is not None and mode.late is not None:
            ctx.remote = protocols.Tap(tls, raw=False, timeout=self.busy)
            await mode.late(ctx)
        self.link(ctx)

    async def server(self) -> None:
        """Server mode: TLS was accepted; the plaintext goes out to the upstream."""
        venue, conn = self.venue, self.conn
        tls = conn.tls
        fut = conn.waiter
        assert tls is not None and fut is not None
        mode = venue.protocol
        ctx: protocols.Ctx | None = None
        if tls.deferred and mode is not None:  # plaintext on the accepted socket first
            ctx = protocols.Ctx(conn, venue.settings, protocols.Tap(tls, raw=True, timeout=self.busy))
            if not await self._server_early(ctx, mode):
                return
            tls.start_tls(ctx.local.detach(pause=False))
        exc = await self.handshake(fut)
        if exc is _TIMED_OUT or conn.reason is not None:
            return
        if exc is None and alpn.negotiated(tls.sslobj) == alpn.ACME_TLS:  # only tunnel/acmealpn.py picks it
            conn.fail(CloseReason.CLOSED, "ACME: tls-alpn-01 validation answered", level=5)
            return
        target = venue.sni_target(tls.sslobj, conn.log) or venue
        if not self.verdict(target.tls, tls, exc, None):
            return
        if mode is None:
            tls.pause_reading()
        if not await self.ocsp(target, tls):
            return
        if mode is None:
            if await self.plain_upstream(target, None) is not None and conn.reason is None:
                self.link(None)
            return
        local = protocols.Tap(tls, raw=False, timeout=self.busy)
        if ctx is None:
            ctx = protocols.Ctx(conn, venue.settings, local)
        ctx.local = local
        if conn.plain is None:
            if mode.middle is not None:
                await mode.middle(ctx)
            plain = await self.plain_upstream(target, ctx)
            if plain is None:
                return
            ctx.remote = protocols.Tap(plain, raw=True, timeout=self.busy)
        if mode.late is not None:
            await mode.late(ctx)
        self.link(ctx)

    async def _server_early(self, ctx: protocols.Ctx, mode: protocols.Mode) -> bool:
        """Server mode's plaintext phases: early, then (connect_before_tls) dial and middle.
        False when the upstream could not be had (the connection failed)."""
        if mode.early is not None:
            await mode.early(ctx)
        if mode.connect_before_tls:
            plain = await self.plain_upstream(self.venue, ctx)
            if plain is None:
                return False
            ctx.remote = protocols.Tap(plain, raw=True, timeout=self.busy)
            if mode.middle is not None:
                await mode.middle(ctx)
        return True

    # ---- 4. handshake, 5. verdict, 6. OCSP ---------------------------------------------
    async def handshake(self, fut: asyncio.Future[BaseException | None]) -> BaseException | None:
        """Wait for the TLS handshake, bounded by TIMEOUTbusy; _TIMED_OUT after failing the
        connection with stunnel's words."""
        timer = self.conn.loop.call_later(self.busy, _time_out, fut)  # cheaper than asyncio.timeout
        try:
            exc = await fut
        finally:
            timer.cancel()
        if exc is _TIMED_OUT:
            self._busy_exceeded()
            return _TIMED_OUT
        self.conn.waiter = None
        return exc

    def _busy_exceeded(self) -> None:
        """The TLS handshake (or a protocol step) outlived TIMEOUTbusy: stunnel's words."""
        conn = self.conn
        if conn.reason is not None or conn.linked:
            return
        self.venue.counters.handshake_failed(HandshakeFailure.TIMEOUT)
        conn.fail(
            CloseReason.HANDSHAKE_FAILED,
            "ssl_start: s_poll_wait: TIMEOUTbusy exceeded: sending reset",
            level=6,
        )  # LOG6 as stunnel: the "Connection reset" line that follows is the notice

    def verdict(
        self, tcfg: TlsConfig, side: TlsSide, exc: BaseException | None, expected: str | None
    ) -> bool:
        """After a handshake: fail the connection with one reason, or log stunnel's lines.
        ``tcfg``: the TLS configuration that served it (an SNI secondary's, if one was chosen)."""
        conn, venue = self.conn, self.venue
        verb = "SSL_accept" if side.sslobj.server_side else "SSL_connect"
        self._log_psk(side)
        if exc is not None:
            if isinstance(exc, ssl.SSLCertVerificationError):
                reason, label = CloseReason.VERIFY_FAILED, HandshakeFailure.VERIFY_FAILED
                self._pre_verification(side.notes.verify_errors or [])
            else:
                reason = CloseReason.HANDSHAKE_FAILED
                peer_closed = isinstance(exc, ConnectionResetError)
                label = HandshakeFailure.PEER_CLOSED if peer_closed else HandshakeFailure.PROTOCOL_ERROR
                label = alpn.refused(exc) or label
            venue.counters.handshake_failed(label)
            conn.fail(reason, f"{verb}: {reason_of(exc)}")
            return False
        der = side.sslobj.getpeercert(binary_form=True)
        # a PSK handshake authenticated the peer: no certificate was asked for (stunnel)
        psk = der is None and side.notes.psk_identity is not None
        psk = psk and (side.notes.psk_known or not side.sslobj.server_side)
        problem = None if psk else tcfg.check_peer(der, expected)
        redirect = tcfg.redirect and not psk and _unauthenticated(side, der, problem)
        why: str | None = None
        if redirect:
            problem, why = None, problem
        if problem is not None:
            venue.counters.handshake_failed(tcfg.policy.refusal(problem))
            self._cert_lines(der, problem)
            conn.fail(CloseReason.VERIFY_FAILED, f"{verb}: {problem}")
            return False
        STATS.observe_handshake(conn.loop.time() - side.started)
        group = kex.observe(side.sslobj, venue.name)  # post-quantum or not: counted, logged at 6
        if der and venue.level >= 5 and not redirect and not side.sslobj.session_reused:
            pol = tcfg.policy
            if pol.verify_chain or pol.verify_peer:  # stunnel's verify callback: new sessions only
                conn.log(5, f"Certificate accepted at depth=0: {subject_line(der)}")
        if der and side.sslobj.server_side:
            conn.peer_cn = peer_subject(der)
        if venue.level >= 6:
            self._log_session(side)
            if group:
                conn.log(6, f"TLS group: {group}")
            if venue.settings.alpn:  # pytunnel's alpn option (tunnel/alpn.py)
                conn.log(6, alpn.log_line(alpn.negotiated(side.sslobj)))
        if redirect:
            self._redirect(der, why, side.notes.verify_errors or [])
        return True

    def _cert_lines(self, der: bytes | None, problem: str) -> None:
        """stunnel's lines for a peer check that failed after OpenSSL's: none for a missing
        certificate (OpenSSL's own words end the handshake, or redirect follows)."""
        if der is None:
            return
        conn = self.conn
        conn.log(4, "CERT: Subject checks failed" if "mismatch" in problem else "CERT: Peer check failed")
        conn.log(4, f"Rejected by CERT at depth=0: {subject_line(der)}")

    def _log_psk(self, side: TlsSide) -> None:
        conn, notes = self.conn, side.notes
        if notes.psk_identity is None:
            return
        if not side.sslobj.server_side:
            conn.log(6, f'PSK client configured for identity "{notes.psk_identity}"')
        elif notes.psk_known:
            conn.log(5, f'Key configured for PSK identity "{notes.psk_identity}"')
        else:
            conn.log(6, "PSK identity not found (session resumption?)")

    def _log_session(self, side: TlsSide) -> None:
        conn = self.conn
        # a TLS 1.3 external PSK counts as "reused" to OpenSSL: it is a new session
        resumed = side.sslobj.session_reused and side.notes.psk_identity is None
        reused = "previous session reused" if resumed else "new session negotiated"
        conn.log(
            6, f"TLS {'accepted' if side.sslobj.server_side else 'connected'}: {reused}",
            event="tls", resumed=resumed, version=side.sslobj.version(),
        )  # fmt: skip
        cipher = side.sslobj.cipher()
        if cipher is not None:  # stunnel's line for what was negotiated
            conn.log(6, f"{cipher[1]} ciphersuite: {cipher[0]} ({cipher[2]}-bit encryption)")

    def _pre_verification(self, errors: list[tuple[str, int, bytes]]) -> None:
        """stunnel's two lines for each certificate OpenSSL's verification refused."""
        for reason, depth, der in errors:
            self.conn.log(4, f"CERT: Pre-verification error: {reason}")
            if der:
                self.conn.log(4, f"Rejected by CERT at depth={depth}: {subject_line(der)}")

    def _redirect(self, der: bytes | None, problem: str | None, errors: list[tuple[str, int, bytes]]) -> None:
        """``redirect``: stunnel's lines for each verification failure (never OpenSSL's
        error texts: log watchers read those as a failed handshake), then the other target."""
        conn = self.conn
        self._pre_verification(errors)
        if problem is not None and not errors:
            self._cert_lines(der, problem)
        self.venue.counters.handshake_failed(HandshakeFailure.REDIRECTED)
        conn.log(5, "Redirecting connection")
        conn.redirected = True

    async def ocsp(self, venue: Venue, side: TlsSide) -> bool:
        """OCSP / OCSPaia: the verified chain checked with its responders before any byte moves.

        stunnel checks inside the handshake (the peer gets an alert); Python's ssl has no
        hook there, so pytunnel checks right after it and closes.  A resumed session is not
        checked again, as in stunnel (its verify callback does not run on resumption).
        """
        conn, tcfg = self.conn, venue.tls
        asked = tcfg.staple_policy is not None and not side.sslobj.server_side
        staple = osslconn.client_staple(side.sslobj, conn.log) if asked else None
        policy = tcfg.ocsp or (tcfg.staple_policy() if staple and tcfg.staple_policy else None)
        if policy is None or side.sslobj.session_reused:
            return True
        from tunnel import ocsp

        chain = ocsp.verified_chain(side.sslobj, policy.trust)
        reason = await ocsp.check_chain(chain, policy, log=conn.log, staple=staple)
        if reason is None:
            return True
        venue.counters.handshake_failed(HandshakeFailure.OCSP)
        conn.fail(CloseReason.VERIFY_FAILED, reason)
        return False

    # ---- 7. dial -------------------------------------------------------------------------
    def _client_transport(self) -> Any:
        """The transport of the client's (accepted) side (as a PROXY header named the client)."""
        conn = self.conn
        side = conn.plain if self.venue.settings.client else conn.tls
        transport = side.transport if side is not None else None
        return proxyheader.CarriedTransport(transport, conn.origin) if conn.origin else transport

    def _exec_env(self) -> dict[str, str]:
        """The child's environment: ours, setEnv, REMOTE_HOST/PORT and the client's DNs."""
        conn, venue = self.conn, self.venue
        peer: tuple[str, int] | None = None
        dn: tuple[str, str] | None = None
        host, _, port = conn.peer_addr.rpartition(":")
        if host and port.isdigit():
            peer = (host, int(port))
        if conn.tls is not None and not venue.settings.client and not conn.tls.handshaking:
            dn = client_dn(conn.tls.sslobj.getpeercert(binary_form=True))
        return program.child_env(venue.set_env, peer, dn)

    async def dial(
        self,
        venue: Venue,
        chosen: list[tuple[int, Any, str | None]] | None,
        protocol: asyncio.BaseProtocol | None = None,
    ) -> socket.socket | asyncio.BaseTransport | None:
        """The upstream socket, or its transport when uvloop connected it with ``protocol``
        (None: the connection failed, with the reason logged).

        ``chosen``: the targets a protocol picked (SOCKS), instead of ``connect``; with
        ``exec`` and no ``connect`` the program is the remote end."""
        conn, up = self.conn, venue.upstream
        if venue.exec_remote and not chosen and not conn.redirected:
            spawned = await up.spawn(self._exec_env(), venue.foreground, conn.id)
            if isinstance(spawned, Failed):
                self._failed(spawned)
                return None
            return spawned
        client = self._client_transport()
        targets = chosen or await up.targets(conn, conn.redirected, client, venue.ports)
        if isinstance(targets, Failed):
            self._failed(targets)
            return None
        dialed = await up.dial(conn, targets, client, venue.out_of_fds, protocol)
        if dialed is None:
            return None
        if isinstance(dialed, Failed):
            self._failed(dialed)
            return None
        conn.log(5, f"s_connect: connected {dialed.shown}", event="connected", upstream=dialed.shown)
        if venue.level >= 5:
            if dialed.sock is not None:
                where = dialed.sock.getsockname()
            else:
                where = dialed.transport.get_extra_info("sockname") if dialed.transport else None
            conn.log(5, f"Service [{venue.name}] connected remote server from {format_sockaddr(where)}")
        conn.target = dialed.shown
        conn.target_host = dialed.name
        return dialed.sock or dialed.transport

    def _failed(self, failed: Failed) -> None:
        self.conn.fail(failed.reason, failed.detail)

    async def plain_upstream(self, venue: Venue, ctx: protocols.Ctx | None) -> PlainSide | None:
        """Server mode: the plaintext upstream as a relay side (an ``exec`` program's
        terminal with ``pty = yes``)."""
        conn = self.conn
        plain = PlainSide(conn)
        if venue.exec_remote and venue.settings.pty and not (ctx is not None and ctx.targets):
            master = await venue.upstream.spawn_pty(self._exec_env(), venue.foreground, conn.id)
            if isinstance(master, Failed):
                self._failed(master)
                return None
            conn.plain = plain
            await program.PtyTransport(plain).attach(master)
            return plain
        conn.plain = plain  # uvloop may connect it (Upstream.dial's direct way)
        sock = await self.dial(venue, ctx.targets if ctx is not None else None, plain)
        if sock is None:
            return None
        if isinstance(sock, socket.socket):
            try:
                await conn.loop.create_connection(lambda: plain, sock=sock)
            except OSError as exc:
                sock.close()
                conn.fail(CloseReason.CONNECT_FAILED, f"s_connect: {exc}")
                return None
        reassert_nodelay(plain.transport, venue.upstream.sockopts_r)
        if conn.reason is not None:
            plain.close()
            return None
        return plain

    # ---- 9. link -------------------------------------------------------------------------
    def link(self, ctx: protocols.Ctx | None) -> None:
        """Hand what arrived beyond a protocol's negotiation to the data path (link() replays
        it), then relay."""
        if ctx is not None:
            for tap in (ctx.local, ctx.remote):
                if tap is not None and tap.side.tap is tap:
                    left = tap.detach()
                    if left:
                        tap.side.early.append(left)
        self.conn.link()


_TIMED_OUT = TimeoutError("TIMEOUTbusy")


def _unauthenticated(side: TlsSide, der: bytes | None, problem: str | None) -> bool:
    """``redirect``: the peer was not authenticated (stunnel's per-session flag).  No
    certificate, a failed check, an error OpenSSL let pass -- or, for a resumed session,
    the verification result stored in the session when it was made was not X509_V_OK."""
    if der is None or problem is not None or side.notes.verify_errors:
        return True
    if not side.sslobj.session_reused:
        return False
    try:
        return osslconn.verify_result(side.sslobj) != osslconn.X509_V_OK
    except ossl.Unavailable:  # cannot tell: never let a resumed session skip the redirect
        return True


def _time_out(fut: asyncio.Future[BaseException | None]) -> None:
    if not fut.done():
        fut.set_result(_TIMED_OUT)


def _handshake_waiter(loop: asyncio.AbstractEventLoop, side: TlsSide) -> asyncio.Future[BaseException | None]:
    """A future for a TLS side's handshake, set by its ``on_handshake`` callback."""
    fut: asyncio.Future[BaseException | None] = loop.create_future()

    def done(_side: TlsSide, exc: BaseException | None) -> None:
        if not fut.done():
            fut.set_result(exc)

    side.on_handshake = done
    return fut
