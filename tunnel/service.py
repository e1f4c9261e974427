"""A service: its listeners, per-connection setup, upstream connect, connection registry."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import os
import resource
import secrets
import socket
import ssl
import string
import threading
import weakref
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunnel import program, protocols, transparent
from tunnel.addr import Endpoint, format_sockaddr
from tunnel.logs import log
from tunnel.metrics import STATS
from tunnel.reasons import CloseReason, HandshakeFailure
from tunnel.relay import Connection, PlainSide, Side, TlsSide
from tunnel.settings import ServiceSettings
from tunnel.sockopts import apply_socket_options, socket_options
from tunnel.tls import TlsConfig, client_sni
from tunnel.tlsnotes import reason_of
from tunnel.values import gid_of, uid_of
from tunnel.verify import client_dn, peer_subject, subject_line

if TYPE_CHECKING:
    from tunnel.systemd import Activation

_counter = itertools.count()
_BASE62 = string.ascii_letters + string.digits

SESSION_REFRESH = 30.0  # seconds a cached client session is kept before refreshing


@dataclass(eq=False)
class Listener:
    """One listening socket and its accept loop.

    We accept ourselves rather than through ``loop.create_server``: libuv answers EMFILE by
    accepting and closing every waiting connection (its "EMFILE trick"), which drops
    clients.  Here an EMFILE/ENFILE stops accepting for a moment (one log line, back-off up
    to a second, or until a connection ends) and the waiting clients stay in the kernel's
    backlog, as stunnel leaves them.
    """

    sock: socket.socket
    display: str
    endpoint: Endpoint
    owner: Service
    reading: bool = False
    closed: bool = False
    backoff: float = 0.0
    resume_handle: asyncio.TimerHandle | None = None

    def factory(self) -> Side:
        """New connections go to the current owner (a reload swaps it)."""
        return self.owner._factory()

    def start(self) -> None:
        if not self.reading and not self.closed:
            self.reading = True
            asyncio.get_running_loop().add_reader(self.sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(ACCEPT_BATCH):
            if BUDGET.full():
                BUDGET.hold(self)
                return
            try:
                conn_sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._pause(exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                log.ui(3, f"Service [{self.owner.name}]: accept: {exc.strerror} ({exc.errno})")
                return
            self.backoff = 0.0
            conn_sock.setblocking(False)
            BUDGET.pending += 1  # counted now: the task that adopts it runs later
            loop.create_task(_adopt(loop, self, conn_sock))

    def _pause(self, exc: OSError) -> None:
        loop = asyncio.get_running_loop()
        if self.reading:
            loop.remove_reader(self.sock.fileno())
            self.reading = False
        self.backoff = min(max(self.backoff * 2, 0.05), 1.0)
        log.ui(
            3,
            f"Service [{self.owner.name}]: accept: {exc.strerror} ({exc.errno}); "
            f"waiting clients stay queued, retrying in {self.backoff:g} s",
        )
        if self.resume_handle is None:
            self.resume_handle = loop.call_later(self.backoff, self.resume)

    def resume(self) -> None:
        """After a back-off, or as soon as a connection ends and frees a descriptor."""
        if self.resume_handle is not None:
            self.resume_handle.cancel()
            self.resume_handle = None
        if not self.reading and not self.closed:
            self.start()
            self._on_readable()

    def close(self) -> None:
        self.closed = True
        if self.resume_handle is not None:
            self.resume_handle.cancel()
            self.resume_handle = None
        if self.reading:
            with contextlib.suppress(RuntimeError, ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.reading = False
        self.sock.close()


ACCEPT_BATCH = 64
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
FD_RESERVE = 24  # listeners, logs, status server, resolver, exec pipes


class _Budget:
    """Connections the descriptor limit can carry (each needs two), as stunnel sizes its
    client limit: at the limit, accepting stops and new clients wait in the kernel's backlog
    (instead of being accepted with no descriptor left for their upstream)."""

    def __init__(self) -> None:
        self.limit = 0  # 0: no limit known
        self.active = 0
        self.pending = 0  # accepted sockets not yet connections
        self.held: set[Listener] = set()
        self.soft = 0

    def configure(self) -> None:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.soft = soft
        self.limit = 0 if soft == resource.RLIM_INFINITY else max(4, (soft - FD_RESERVE) // 2)

    def full(self) -> bool:
        return bool(self.limit) and self.active + self.pending >= self.limit

    def hold(self, lst: Listener) -> None:
        if lst.reading:
            asyncio.get_running_loop().remove_reader(lst.sock.fileno())
            lst.reading = False
        if not self.held:
            log.ui(
                4,
                f"Service [{lst.owner.name}]: {self.active + self.pending} connections use the descriptor limit "
                f"(RLIMIT_NOFILE {self.soft} carries {self.limit}); new clients wait in the backlog",
            )
        self.held.add(lst)

    def released(self) -> None:
        """A connection ended."""
        self.active -= 1
        self.wake()

    def wake(self) -> None:
        """Room again under the limit: the held listeners accept once more."""
        if self.held and not self.full():
            held, self.held = self.held, set()
            for lst in held:
                lst.resume()


BUDGET = _Budget()


async def _adopt(loop: asyncio.AbstractEventLoop, lst: Listener, sock: socket.socket) -> None:
    try:
        await loop.connect_accepted_socket(lst.factory, sock)
    except OSError:
        sock.close()  # reset before we got to it: nothing to serve
    finally:
        BUDGET.pending -= 1
        BUDGET.wake()


class Service:
    """One ``[section]``: listeners plus every connection it has open."""

    def __init__(
        self,
        settings: ServiceSettings,
        tls: TlsConfig,
        secure: bool,
        secondaries: list[Service] | None = None,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self.tls = tls
        self.secure = secure
        self.listeners: list[Listener] = []
        self.connections: set[Connection] = set()
        self.level = settings.debug[1]
        self._rr = 0
        self.sessions: dict[str, tuple[ssl.SSLSession, float, int]] = {}
        self.secondaries: list[Service] = secondaries or []
        self.resolved: dict[Endpoint, list[tuple[int, Any]]] = {}
        self._drained: asyncio.Event | None = None
        self.accepting = True
        self.counters = STATS.service(self.name)
        self.protocol = protocols.lookup(settings.protocol, settings.client) if settings.protocol else None
        # exec: the program is the remote end (accept + exec) or the local end (exec + connect)
        self.exec_remote = bool(settings.exec) and not settings.connect
        self.exec_local = bool(settings.exec) and bool(settings.connect) and not settings.accept
        self.set_env: list[str] = []  # the global setEnv lines (runtime fills them in)
        self.foreground = True
        self._local_done: asyncio.Event | None = None
        self._local_task: asyncio.Task[None] | None = None  # exec+connect's start/retry loop
        self.reuse_port = False  # --workers: every worker binds the same ports
        self.sockopts_l = socket_options(settings.socket, "l")
        self.sockopts_r = socket_options(settings.socket, "r")
        if not settings.client and self.secondaries:
            self._install_sni()

    # ---- logging ---------------------------------------------------------------
    def log_conn(self, level: int, conn_id: str, text: str, fields: dict[str, object] | None = None) -> None:
        if level <= self.level:
            if log.json:
                fields = {"service": self.name, "event": "error" if level <= 3 else "log", **(fields or {})}
            log.write(level, conn_id, text, threshold=self.level, fields=fields)

    def next_id(self) -> str:
        """stunnel's ``logId``: a global sequence number; 22 random base62 characters (as
        5.68 prints them); the id of the thread serving the connection (one event-loop thread
        here, so every connection of a process shares it); the process id."""
        mode = self.settings.logId
        if mode == "unique":
            return "".join(secrets.choice(_BASE62) for _ in range(22))
        if mode == "process":
            return str(os.getpid())
        if mode == "thread":
            return str(threading.get_native_id())
        return str(next(_counter))

    def swap_tls(self, tls: TlsConfig) -> None:
        """Certificate reload: new connections use ``tls``; live ones keep their context."""
        self.tls = tls
        if not self.settings.client and self.secondaries:
            self._install_sni()

    # ---- SNI virtual services (server mode) --------------------------------------
    def _install_sni(self) -> None:
        patterns: list[tuple[str, Service]] = []
        for sec in self.secondaries:
            assert sec.settings.sni is not None
            patterns.append((sec.settings.sni.split(":", 1)[1].lower(), sec))

        def pick(sslobj: object, name: str | None, _ctx: ssl.SSLContext) -> None:
            if not name:
                return
            lowered = name.lower()
            for pattern, sec in patterns:
                if sni_matches(lowered, pattern):
                    sslobj.context = sec.tls.context  # type: ignore[attr-defined]
                    _SNI_CHOICE[sslobj] = (sec, name, pattern)
                    return
            _SNI_CHOICE[sslobj] = (None, name, "")

        self.tls.context.sni_callback = pick

    def _sni_target(self, conn: Connection, sslobj: object) -> Service:
        """The service an SNI name chose during the handshake, logged with stunnel's lines."""
        choice = _SNI_CHOICE.pop(sslobj, None)
        if choice is None:
            return self
        target, name, pattern = choice
        conn.log(6, f"SNI: requested servername: {name}")
        if target is None:
            conn.log(3, f"SNI: no pattern matched servername: {name}")
            return self
        conn.log(7, f"SNI: matched pattern: {pattern}")
        conn.log(5, f"SNI: switched to service [{target.name}]")
        return target

    # ---- listening ---------------------------------------------------------------
    def bind(
        self,
        activation: Activation | None = None,
        endpoints: list[Endpoint] | None = None,
        quiet: bool = False,
    ) -> list[str]:
        """Bind every accept address (or those of ``endpoints``): synchronously, before the
        loop or during a reload.  Returns errors.

        A socket passed by systemd (socket activation) for an address is used as it is.
        """
        errors: list[str] = []
        for ep in self.settings.accept if endpoints is None else endpoints:
            passed = activation.take(self.name, ep.host, ep.port, ep.path) if activation else None
            if passed is not None:
                passed.setblocking(False)
                display = format_sockaddr(passed.getsockname())
                log.ui(6, f"Service [{self.name}] (FD={passed.fileno()}) bound to {display}")
                log.ui(7, f"Service [{self.name}]: listening socket {display} passed by systemd")
                self.listeners.append(Listener(sock=passed, display=display, endpoint=ep, owner=self))
                continue
            try:
                self.listeners.append(self._bind_one(ep))
            except OSError as exc:
                text = f"Binding service [{self.name}] to {ep.display()}: {exc.strerror} ({exc.errno})"
                log.ui(7 if quiet else 3, text)
                errors.append(text)
        if self.settings.accept and not self.listeners and not quiet:
            log.ui(3, f"Binding service [{self.name}] failed")
        return errors

    def _bind_one(self, ep: Endpoint) -> Listener:
        if ep.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                if os.path.exists(ep.path) and not os.path.isdir(ep.path):
                    os.unlink(ep.path)
                sock.bind(ep.path)
                if self.settings.setuid or self.settings.setgid:
                    _chown(ep.path, self.settings.setuid, self.settings.setgid)
                sock.listen(1024)
            except OSError:
                sock.close()
                raise
            display = ep.path
        else:
            host = ep.host or "0.0.0.0"  # noqa: S104 - stunnel's default
            infos = socket.getaddrinfo(
                host, ep.port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
            )
            family, stype, proto, _, addr = infos[0]
            sock = socket.socket(family, stype, proto)
            try:
                apply_socket_options(sock, family, socket_options(self.settings.socket, "a"))
                transparent.prepare_listener(sock, family, self.settings.transparent, self.name)
                if self.reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(addr)
                sock.listen(1024)
            except OSError:
                sock.close()
                raise
            display = format_sockaddr(sock.getsockname())
        sock.setblocking(False)
        log.ui(6, f"Service [{self.name}] (FD={sock.fileno()}) bound to {display}")
        return Listener(sock=sock, display=display, endpoint=ep, owner=self)

    def clone_listeners(self) -> list[Listener]:
        """Another worker's sockets on the same addresses (SO_REUSEPORT; a Unix socket is shared)."""
        out: list[Listener] = []
        for lst in self.listeners:
            if lst.endpoint.path is not None:
                out.append(lst)
                continue
            addr = lst.sock.getsockname()
            sock = socket.socket(lst.sock.family, socket.SOCK_STREAM)
            try:
                apply_socket_options(sock, lst.sock.family, socket_options(self.settings.socket, "a"))
                transparent.prepare_listener(sock, lst.sock.family, self.settings.transparent, self.name)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                sock.bind(addr)
                sock.listen(1024)
            except OSError:
                sock.close()
                raise
            sock.setblocking(False)
            out.append(Listener(sock=sock, display=lst.display, endpoint=lst.endpoint, owner=self))
        return out

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for lst in self.listeners:
            lst.start()
        if self.exec_local and self._local_done is None:
            self._local_done = asyncio.Event()
            self._local_task = loop.create_task(self._run_exec_local())

    # ---- exec ------------------------------------------------------------------------
    def _exec_env(self, conn: Connection | None) -> dict[str, str]:
        """The child's environment: ours, setEnv, REMOTE_HOST/PORT and the client's DNs."""
        peer: tuple[str, int] | None = None
        dn: tuple[str, str] | None = None
        if conn is not None:
            host, _, port = conn.peer_addr.rpartition(":")
            if host and port.isdigit():
                peer = (host, int(port))
            if conn.tls is not None and not self.settings.client and not conn.tls.handshaking:
                dn = client_dn(conn.tls.sslobj.getpeercert(binary_form=True))
        return program.child_env(self.set_env, peer, dn)

    def _exec_failed(self, conn: Connection | None, exc: OSError) -> None:
        text = f"execv {self.settings.exec}: {exc.strerror or exc} ({exc.errno})"
        if conn is not None:
            conn.fail(CloseReason.CONNECT_FAILED, text)
        else:
            log.ui(3, f"Service [{self.name}]: {text}")

    async def _spawn(self, conn: Connection | None) -> socket.socket | None:
        """Start ``exec`` on a socket pair; None (and the connection failed) when it cannot."""
        assert self.settings.exec is not None
        try:
            return await program.spawn(
                self.settings.exec,
                program.argv_of(self.settings.exec, self.settings.execArgs),
                self._exec_env(conn),
                stderr_to_socket=not self.foreground,
                ident=conn.id if conn is not None else self.name,
            )
        except OSError as exc:
            self._exec_failed(conn, exc)
            return None

    async def _spawn_pty(self, conn: Connection | None) -> int | None:
        """Start ``exec`` on a pseudo-terminal (``pty = yes``); its master descriptor, or None."""
        assert self.settings.exec is not None
        try:
            return await program.spawn_pty(
                self.settings.exec,
                program.argv_of(self.settings.exec, self.settings.execArgs),
                self._exec_env(conn),
                stderr_to_terminal=not self.foreground,
                ident=conn.id if conn is not None else self.name,
            )
        except OSError as exc:
            self._exec_failed(conn, exc)
            return None

    async def _run_exec_local(self) -> None:
        """exec + connect: the program is the local end, started now and again on ``retry``."""
        loop = asyncio.get_running_loop()
        done = self._local_done
        assert done is not None
        log.ui(5, f"Starting exec+connect service [{self.name}]")
        while self.accepting:
            done.clear()
            if self.settings.pty:
                master = await self._spawn_pty(None)
                if master is not None:
                    await program.PtyTransport(self._factory()).attach(master)
                    await done.wait()
                sock = None
            else:
                sock = await self._spawn(None)
            if sock is not None:
                try:
                    await loop.connect_accepted_socket(self._factory, sock)
                except OSError as exc:
                    sock.close()
                    log.ui(3, f"Service [{self.name}]: {exc}")
                else:
                    await done.wait()
            if not self.settings.retry or not self.accepting:
                break
            await asyncio.sleep(self.settings.retry / 1000)
            if self.accepting:
                log.ui(6, "Retrying an exec+connect section")

    def adopt(self, listeners: list[Listener]) -> None:
        """Reload: listening sockets handed over from the old services (same address)."""
        self.listeners = list(listeners)
        for lst in self.listeners:
            lst.owner = self
            log.ui(6, f"Service [{self.name}] (FD={lst.sock.fileno()}) bound to {lst.display}")

    async def stop_accepting(self) -> int:
        """Shutdown: serve what already waits in the kernel's accept queue, then close.

        Those clients finished their TCP handshake and think they are connected; closing the
        listener under them would reset them.  Returns how many were taken from the queue.
        """
        loop = asyncio.get_running_loop()
        adopted: list[Coroutine[Any, Any, object]] = []
        for lst in self.listeners:
            while len(adopted) < 4096:
                try:
                    sock, _ = lst.sock.accept()
                except OSError:  # BlockingIOError: the queue is empty
                    break
                adopted.append(loop.connect_accepted_socket(lst.factory, sock))
        self.close_listeners()
        if adopted:
            await asyncio.gather(*adopted, return_exceptions=True)
        return len(adopted)

    def close_listeners(self) -> None:
        self.accepting = False
        if self._local_task is not None:  # no more retries; the live connection drains
            self._local_task.cancel()
        for lst in self.listeners:
            lst.close()
            if lst.endpoint.path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(lst.endpoint.path)
        self.listeners = []

    # ---- accepting -----------------------------------------------------------------
    def _factory(self) -> Side:
        conn = Connection(self, self.next_id())
        side: Side
        if self.settings.client:
            conn.plain = PlainSide(conn)
            side = conn.plain
        else:
            conn.tls = TlsSide(
                conn,
                self.tls.context,
                server_side=True,
                on_handshake=None if self.protocol else self._server_handshake_done,
            )
            if self.protocol is not None:
                mode = self.protocol
                conn.tls.deferred = bool(mode.early or (mode.connect_before_tls and mode.middle))
            side = conn.tls
        side.made_hook = self._accepted
        return side

    def _accepted(self, side: Side) -> None:
        conn = side.conn
        assert side.transport is not None
        self.connections.add(conn)
        BUDGET.active += 1
        side.pause_reading() if self.settings.client else None
        sock = side.transport.get_extra_info("socket")
        peer = side.transport.get_extra_info("peername")
        conn.peer_addr = format_sockaddr(peer)
        if sock is not None:
            apply_socket_options(sock, sock.family, self.sockopts_l)
        if self.settings.ident:
            # stunnel asks identd first: a refused client gets no TLS handshake and no
            # "accepted connection" line.  Meanwhile a ClientHello waits in side.early.
            if isinstance(side, TlsSide) and not side.deferred:
                side.deferred = held = True
            else:
                held = False
            conn.loop.create_task(self._guard(conn, self._ident_then_serve(conn, side, held)))
            return
        self._serve(conn)

    async def _ident_then_serve(self, conn: Connection, side: Side, held: bool) -> None:
        if not await self._ident_ok(conn):
            return
        self._serve(conn)
        if held and isinstance(side, TlsSide):
            early, side.early = side.early, []
            side.start_tls(b"".join(early))

    def _serve(self, conn: Connection) -> None:
        if self.level >= 5:
            conn.log(
                5, f"Service [{self.name}] accepted connection from {conn.peer_addr}", event="accepted",
                peer=conn.peer_addr,
            )  # fmt: skip
        loop = conn.loop
        if self.settings.client:
            loop.create_task(self._guard(conn, self._open_upstream(conn)))
        elif self.protocol is not None:
            loop.create_task(self._guard(conn, self._serve_protocol(conn, self.protocol)))
        else:
            timeout = self.settings.TIMEOUTbusy
            conn.timer = loop.call_later(timeout, self._handshake_timeout, conn)

    async def _guard(self, conn: Connection, work: Coroutine[Any, Any, None]) -> None:
        """No exception may leave a connection half set up."""
        try:
            await work
        except protocols.ProtocolError as exc:
            reason = CloseReason.PROTOCOL_FAILED if exc.level <= 3 else CloseReason.CLOSED
            conn.fail(reason, str(exc), rst=None if exc.reset else False, level=exc.level)
        except Exception as exc:  # noqa: BLE001 - reported on the connection
            if self.level >= 7:
                import traceback

                conn.log(7, "".join(traceback.format_exception(exc)).rstrip())
            conn.fail(CloseReason.INTERNAL_ERROR, f"Internal error: {exc!r}")

    def _handshake_ok(
        self,
        conn: Connection,
        side: TlsSide,
        exc: BaseException | None,
        tcfg: TlsConfig,
        expected_name: str | None,
    ) -> bool:
        """After a handshake: fail the connection with one reason, or log stunnel's line."""
        verb = "SSL_accept" if side.sslobj.server_side else "SSL_connect"
        notes = side.notes
        if notes.psk_identity is not None:
            if not side.sslobj.server_side:
                conn.log(6, f'PSK client configured for identity "{notes.psk_identity}"')
            elif notes.psk_known:
                conn.log(5, f'Key configured for PSK identity "{notes.psk_identity}"')
            else:
                conn.log(6, "PSK identity not found (session resumption?)")
        if exc is not None:
            if isinstance(exc, ssl.SSLCertVerificationError):
                reason, label = CloseReason.VERIFY_FAILED, HandshakeFailure.VERIFY_FAILED
            else:
                reason = CloseReason.HANDSHAKE_FAILED
                label = (
                    HandshakeFailure.PEER_CLOSED
                    if isinstance(exc, ConnectionResetError)
                    else HandshakeFailure.PROTOCOL_ERROR
                )
            self.counters.handshake_failed(label)
            conn.fail(reason, f"{verb}: {reason_of(exc)}")
            return False
        der = side.sslobj.getpeercert(binary_form=True)
        problem = tcfg.check_peer(der, expected_name)
        redirect = tcfg.redirect and (problem is not None or bool(notes.verify_errors))
        if redirect:
            problem, why = None, problem
        if problem is not None:
            self.counters.handshake_failed(HandshakeFailure.VERIFY_FAILED)
            conn.log(4, "CERT: Subject checks failed" if "mismatch" in problem else "CERT: Peer check failed")
            if der:
                conn.log(4, f"Rejected by CERT at depth=0: {subject_line(der)}")
            conn.fail(CloseReason.VERIFY_FAILED, f"{verb}: {problem}")
            return False
        STATS.observe_handshake(conn.loop.time() - side.started)
        if der and self.level >= 5 and not redirect and not side.sslobj.session_reused:
            pol = tcfg.policy
            if pol.verify_chain or pol.verify_peer:  # stunnel's verify callback: new sessions only
                conn.log(5, f"Certificate accepted at depth=0: {subject_line(der)}")
        if der and side.sslobj.server_side:
            conn.peer_cn = peer_subject(der)
        if self.level >= 6:
            # a TLS 1.3 external PSK counts as "reused" to OpenSSL: it is a new session
            resumed = side.sslobj.session_reused and notes.psk_identity is None
            reused = "previous session reused" if resumed else "new session negotiated"
            conn.log(
                6, f"TLS {'accepted' if side.sslobj.server_side else 'connected'}: {reused}",
                event="tls", resumed=resumed, version=side.sslobj.version(),
            )  # fmt: skip
            cipher = side.sslobj.cipher()
            if cipher is not None:  # stunnel's line for what was negotiated
                conn.log(6, f"{cipher[1]} ciphersuite: {cipher[0]} ({cipher[2]}-bit encryption)")
        if redirect:
            self._redirect(conn, der, why, notes.verify_errors or [])
        return True

    def _redirect(
        self, conn: Connection, der: bytes | None, problem: str | None, errors: list[tuple[str, int]]
    ) -> None:
        """``redirect``: stunnel's lines for each verification failure, then the other target."""
        for reason, depth in errors:
            conn.log(4, f"CERT: Pre-verification error: {reason}")
            if depth == 0 and der:
                conn.log(4, f"Rejected by CERT at depth=0: {subject_line(der)}")
        if problem is not None:
            conn.log(4, f"CERT: {problem}")
        self.counters.handshake_failed(HandshakeFailure.REDIRECTED)
        conn.log(5, "Redirecting connection")
        conn.redirected = True

    def _busy_exceeded(self, conn: Connection) -> None:
        """The TLS handshake (or a protocol step) outlived TIMEOUTbusy: stunnel's words."""
        self.counters.handshake_failed(HandshakeFailure.TIMEOUT)
        conn.fail(
            CloseReason.HANDSHAKE_FAILED,
            "ssl_start: s_poll_wait: TIMEOUTbusy exceeded: sending reset",
            level=6,
        )  # LOG6 as stunnel: the "Connection reset" line that follows is the notice

    def _handshake_timeout(self, conn: Connection) -> None:
        conn.timer = None
        if conn.reason is None and not conn.linked:
            self._busy_exceeded(conn)

    # ---- server mode: TLS accepted, connect plain upstream ----------------------------
    def _server_handshake_done(self, side: TlsSide, exc: BaseException | None) -> None:
        conn = side.conn
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        target = self._sni_target(conn, side.sslobj)
        if not self._handshake_ok(conn, side, exc, target.tls, None):
            return
        side.pause_reading()
        conn.loop.create_task(self._guard(conn, target._open_plain_upstream(conn)))

    async def _ocsp_ok(self, conn: Connection, side: TlsSide, tcfg: TlsConfig) -> bool:
        """OCSP / OCSPaia: the verified chain checked with its responders before any byte moves.

        stunnel checks inside the handshake (the peer gets an alert); Python's ssl has no
        hook there, so pytunnel checks right after it and closes.  A resumed session is not
        checked again, as in stunnel (its verify callback does not run on resumption).
        """
        policy = tcfg.ocsp
        if policy is None or side.sslobj.session_reused:
            return True
        from tunnel import ocsp

        reason = await ocsp.check_chain(ocsp.verified_chain(side.sslobj, policy.trust), policy, log=conn.log)
        if reason is None:
            return True
        self.counters.handshake_failed(HandshakeFailure.OCSP)
        conn.fail(CloseReason.VERIFY_FAILED, reason)
        return False

    async def _open_plain_upstream(self, conn: Connection) -> None:
        if conn.tls is not None and not await self._ocsp_ok(conn, conn.tls, self.tls):
            return
        plain = await self._connect_plain(conn)
        if plain is None:
            return
        if conn.reason is not None:
            plain.close()
            return
        conn.link()

    # ---- protocol negotiation (protocol = ...) -------------------------------------------
    async def _connect_plain(self, conn: Connection, ctx: protocols.Ctx | None = None) -> PlainSide | None:
        if self.exec_remote and self.settings.pty and not (ctx is not None and ctx.targets):
            master = await self._spawn_pty(conn)
            if master is None:
                return None
            plain = PlainSide(conn)
            conn.plain = plain
            await program.PtyTransport(plain).attach(master)
            return plain
        sock = await self._dial_any(conn, ctx.targets if ctx is not None else None)
        if sock is None:
            return None
        plain = PlainSide(conn)
        conn.plain = plain
        try:
            await conn.loop.create_connection(lambda: plain, sock=sock)
        except OSError as exc:
            sock.close()
            conn.fail(CloseReason.CONNECT_FAILED, f"s_connect: {exc}")
            return None
        return plain

    async def _serve_protocol(self, conn: Connection, mode: protocols.Mode) -> None:
        """Server mode with ``protocol``: stunnel's early / connect / middle / TLS / late."""
        tls = conn.tls
        assert tls is not None
        loop = conn.loop
        busy = float(self.settings.TIMEOUTbusy)
        fut, done = _handshake_waiter(loop)
        tls.on_handshake = done
        conn.waiter = fut
        ctx: protocols.Ctx | None = None
        if tls.deferred:  # plaintext on the accepted socket first
            ctx = protocols.Ctx(conn, self.settings, protocols.Tap(tls, raw=True, timeout=busy))
            if mode.early is not None:
                await mode.early(ctx)
            if mode.connect_before_tls:
                plain = await self._connect_plain(conn, ctx)
                if plain is None:
                    return
                ctx.remote = protocols.Tap(plain, raw=True, timeout=busy)
                if mode.middle is not None:
                    await mode.middle(ctx)
            tls.start_tls(ctx.local.detach(pause=False))
        try:
            exc = await asyncio.wait_for(fut, timeout=busy)
        except TimeoutError:
            self._busy_exceeded(conn)
            return
        conn.waiter = None
        if conn.reason is not None:
            return
        target = self._sni_target(conn, tls.sslobj)
        if not self._handshake_ok(conn, tls, exc, target.tls, None):
            return
        if not await target._ocsp_ok(conn, tls, target.tls):
            return
        local = protocols.Tap(tls, raw=False, timeout=busy)
        if ctx is None:
            ctx = protocols.Ctx(conn, self.settings, local)
        ctx.local = local
        if conn.plain is None:
            if mode.middle is not None:
                await mode.middle(ctx)
            plain = await target._connect_plain(conn, ctx)
            if plain is None:
                return
            ctx.remote = protocols.Tap(plain, raw=True, timeout=busy)
        if mode.late is not None:
            await mode.late(ctx)
        self._end_protocol(conn, ctx)
        conn.link()

    @staticmethod
    def _end_protocol(conn: Connection, ctx: protocols.Ctx) -> None:
        """Hand what arrived beyond the negotiation to the data path (link() replays it)."""
        for tap in (ctx.local, ctx.remote):
            if tap is not None and tap.side.tap is tap:
                left = tap.detach()
                if left:
                    tap.side.early.append(left)

    # ---- client mode: connect TLS upstream ---------------------------------------------
    async def _open_upstream(self, conn: Connection) -> None:
        loop = conn.loop
        tcfg = self.tls
        mode = self.protocol
        busy = float(self.settings.TIMEOUTbusy)
        ctx: protocols.Ctx | None = None
        if mode is not None:
            assert conn.plain is not None
            ctx = protocols.Ctx(conn, self.settings, protocols.Tap(conn.plain, raw=True, timeout=busy))
            if mode.early is not None:
                await mode.early(ctx)
        sock = await self._dial_any(conn, ctx.targets if ctx else None)
        if sock is None:
            return
        target = conn.target
        host = conn.target_host
        hostname = client_sni(self.settings, host)
        if hostname and self.level >= 6:
            conn.log(6, f"SNI: sending servername: {hostname}")
        cached = self.sessions.get(target) if self.settings.sessionResume else None
        session = cached[0] if cached and cached[2] == tcfg.generation else None
        fut, done = _handshake_waiter(loop)
        conn.waiter = fut
        tls = TlsSide(
            conn,
            tcfg.context,
            server_side=False,
            server_hostname=hostname,
            session=session,
            on_handshake=done,
        )
        conn.tls = tls
        tls.deferred = mode is not None and mode.middle is not None
        try:
            await loop.create_connection(lambda: tls, sock=sock)
            if ctx is not None and mode is not None and mode.middle is not None:
                ctx.remote = protocols.Tap(tls, raw=True, timeout=busy)
                await mode.middle(ctx)
                tls.start_tls(ctx.remote.detach(pause=False))
            # stunnel bounds the TCP connect by TIMEOUTconnect, the handshake by TIMEOUTbusy
            exc = await asyncio.wait_for(fut, timeout=busy)
        except TimeoutError:
            self._busy_exceeded(conn)
            return
        except OSError as exc2:
            sock.close()
            conn.fail(CloseReason.CONNECT_FAILED, f"s_connect: {exc2}")
            return
        conn.waiter = None
        if conn.reason is not None:
            tls.close()
            return
        # protocol = connect: TLS runs with the host behind the proxy (protocolHost)
        via_proxy = (self.settings.protocol or "").lower() == "connect"
        expected = self.settings.sni or (hostname if via_proxy else None) or host
        if not self._handshake_ok(conn, tls, exc, tcfg, expected):
            return
        if not await self._ocsp_ok(conn, tls, tcfg):
            return
        if ctx is not None and mode is not None:
            if mode.late is not None:
                ctx.remote = protocols.Tap(tls, raw=False, timeout=busy)
                await mode.late(ctx)
            self._end_protocol(conn, ctx)
        conn.link()

    async def _dial_any(
        self, conn: Connection, chosen: list[tuple[int, Any, str | None]] | None = None
    ) -> socket.socket | None:
        """TCP-connect the first reachable target (failover), bounded by TIMEOUTconnect.

        ``chosen``: the targets a protocol picked (SOCKS), instead of ``connect``; with
        ``exec`` and no ``connect`` the program is the remote end."""
        if self.exec_remote and not chosen and not conn.redirected:
            return await self._spawn(conn)
        loop = conn.loop
        targets = chosen or await self._targets(conn)
        if targets is None:
            return None
        timeout = float(self.settings.TIMEOUTconnect)
        for family, addr, name in targets:
            if conn.reason is not None:
                return None
            shown = format_sockaddr(addr)
            sock = await self._new_socket(conn, family)
            if sock is None:
                break
            source = transparent.uses_source(self.settings.transparent) and not self.settings.local
            if source and not transparent.bind_source(conn, sock, family, addr):  # client's address
                sock.close()
                continue
            sock.setblocking(False)
            try:
                if family != socket.AF_UNIX:
                    apply_socket_options(sock, family, self.sockopts_r)
                    if self.settings.local:
                        sock.bind((self.settings.local, 0))
                async with asyncio.timeout(timeout):
                    await loop.sock_connect(sock, addr)
            except (OSError, TimeoutError) as exc:
                sock.close()
                if isinstance(exc, TimeoutError) and not exc.errno:
                    conn.log(3, f"s_connect: s_poll_wait {shown}: TIMEOUTconnect exceeded")
                else:
                    text = os.strerror(exc.errno) if exc.errno else str(exc)
                    conn.log(3, f"s_connect: connect {shown}: {text} ({exc.errno})")
                continue
            if conn.reason is not None:
                sock.close()
                return None
            conn.log(5, f"s_connect: connected {shown}", event="connected", upstream=shown)
            if self.level >= 5:
                local = format_sockaddr(sock.getsockname())
                conn.log(5, f"Service [{self.name}] connected remote server from {local}")
            conn.target = shown
            conn.target_host = name
            return sock
        conn.fail(CloseReason.CONNECT_FAILED, "No more addresses to connect")
        return None

    async def _ident_ok(self, conn: Connection) -> bool:
        """``ident = USER``: ask the client host's identd (RFC 1413) who owns the connection."""
        want = self.settings.ident
        side = conn.plain if self.settings.client else conn.tls
        transport = side.transport if side is not None else None
        peer = transport.get_extra_info("peername") if transport is not None else None
        local = transport.get_extra_info("sockname") if transport is not None else None
        if not (isinstance(peer, tuple) and isinstance(local, tuple)):
            conn.fail(CloseReason.IDENT_REFUSED, "IDENT: the client is not on TCP")
            return False
        user = ""
        try:
            async with asyncio.timeout(float(self.settings.TIMEOUTconnect)):
                reader, writer = await asyncio.open_connection(peer[0], 113)
                try:
                    writer.write(f"{peer[1]} , {local[1]}\r\n".encode())
                    line = (await reader.readline()).decode("latin-1").strip()
                finally:
                    writer.close()
            fields = [f.strip() for f in line.split(":")]
            if len(fields) >= 4 and fields[1].upper() == "USERID":
                user = ":".join(fields[3:]).strip()
            else:
                conn.fail(CloseReason.IDENT_REFUSED, f"Incorrect data from IDENT server: {line[:200]!r}")
                return False
        except (OSError, TimeoutError) as exc:
            why = "timed out" if isinstance(exc, TimeoutError) and not exc.errno else exc.strerror or str(exc)
            conn.fail(CloseReason.IDENT_REFUSED, f"IDENT: cannot ask {peer[0]}:113: {why}")
            return False
        conn.log(7, f"IDENT resolved remote user to {user}")
        if user != want:
            text = f'Connection from {conn.peer_addr} REFUSED by IDENT (user "{user}")'
            conn.fail(CloseReason.IDENT_REFUSED, text, level=4)
            return False
        conn.log(6, "IDENT authentication passed")
        return True

    async def _new_socket(self, conn: Connection, family: int) -> socket.socket | None:
        """A socket for the upstream.  Out of descriptors: stop accepting and wait for one to
        be freed (up to TIMEOUTconnect) rather than drop a client that is already in."""
        loop = conn.loop
        deadline = loop.time() + float(self.settings.TIMEOUTconnect)
        delay = 0.02
        while True:
            try:
                return socket.socket(family, socket.SOCK_STREAM)
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES or loop.time() + delay > deadline or conn.reason:
                    conn.log(3, f"s_connect: socket: {os.strerror(exc.errno or 0)} ({exc.errno})")
                    return None
                for lst in self.listeners:
                    if lst.reading:
                        lst._pause(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def _targets(self, conn: Connection) -> list[tuple[int, Any, str | None]] | None:
        if transparent.uses_destination(self.settings.transparent):
            return transparent.destination_targets(conn)  # the client's original destination
        eps = list(self.settings.redirect if conn.redirected else self.settings.connect)
        if self.settings.failover == "rr" and not self.settings.delay and len(eps) > 1:
            start = self._rr % len(eps)
            self._rr += 1
            eps = eps[start:] + eps[:start]
        out: list[tuple[int, Any, str | None]] = []
        for ep in eps:
            if ep.path is not None:
                out.append((socket.AF_UNIX, ep.path, None))
                continue
            addrs = self.resolved.get(ep) if not self.settings.delay else None
            if addrs is None:
                try:
                    addrs = await resolve(ep)
                except OSError as exc:
                    conn.log(3, f'Error resolving "{ep.host}": {exc.strerror or exc}')
                    continue
                if not self.settings.delay:  # not resolvable at start-up; it is now
                    self.resolved[ep] = addrs
            out.extend((fam, addr, ep.host or "localhost") for fam, addr in addrs)
        if not out:
            conn.fail(CloseReason.CONNECT_FAILED, "No remote host resolved")
            return None
        return out

    async def resolve_all(self) -> list[str]:
        """stunnel resolves connect names at start-up unless ``delay = yes``."""
        errors: list[str] = []
        if self.settings.delay:
            return errors
        for ep in [*self.settings.connect, *self.settings.redirect]:
            if ep.path is not None:
                continue
            try:
                self.resolved[ep] = await resolve(ep)
            except OSError as exc:
                errors.append(f'Error resolving "{ep.host}": {exc.strerror or exc}')
        return errors

    # ---- end of a connection --------------------------------------------------------
    def connection_ended(self, conn: Connection) -> None:
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        BUDGET.released()
        reason = conn.reason or CloseReason.CLOSED
        self.counters.ended(reason, conn.to_tls, conn.to_sock)
        tls = conn.tls
        key = conn.target
        if (
            key
            and conn.linked
            and tls is not None
            and self.settings.client
            and self.settings.sessionResume
            and reason in (CloseReason.CLOSED,)
        ):
            self._remember_session(key, tls)
        if log.json:
            if self.level >= 5:
                s = conn.summary()
                conn.log(
                    5, conn.detail or f"Connection {s['reason']}", event="closed", peer=s["peer"],
                    bytes={"to_tls": conn.to_tls, "to_plain": conn.to_sock}, duration=s["duration"],
                    reason=s["reason"], **({"peer_cn": conn.peer_cn} if conn.peer_cn else {}),
                )  # fmt: skip
        elif self.level >= 5:
            word = "reset" if conn.rst_sent else "closed"
            conn.log(
                5,
                f"Connection {word}: {conn.to_tls} byte(s) sent to TLS, "
                f"{conn.to_sock} byte(s) sent to socket",
            )
        if self.level >= 6 and not log.json:
            s = conn.summary()
            cn = f" peer_cn={conn.peer_cn!r}" if conn.peer_cn else ""
            conn.log(
                6, f"Connection summary: reason={s['reason']} duration={s['duration']}s from={s['peer']}{cn}"
            )
        if self._drained is not None and not self.connections:
            self._drained.set()
        for lst in self.listeners:  # a descriptor was freed: accepting may work again
            if lst.resume_handle is not None:
                lst.resume()
        if self._local_done is not None:
            self._local_done.set()

    def _remember_session(self, key: str, tls: TlsSide) -> None:
        now = asyncio.get_running_loop().time()
        cached = self.sessions.get(key)
        if (
            cached
            and cached[2] == self.tls.generation
            and tls.sslobj.session_reused
            and now - cached[1] < SESSION_REFRESH
        ):
            return
        session = tls.sslobj.session
        if session is not None:
            self.sessions[key] = (session, now, self.tls.generation)

    # ---- shutdown --------------------------------------------------------------------
    async def drain(self, timeout: float) -> bool:
        """Wait for live connections to end; True when all did within ``timeout``."""
        if not self.connections:
            return True
        self._drained = asyncio.Event()
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def abort_all(self) -> None:
        for conn in list(self.connections):
            conn.finish(CloseReason.SHUTDOWN)

    def connection_list(self) -> list[str]:
        """SIGUSR2, in stunnel's words."""
        return [
            f"Service [{self.name}], {c.to_tls} byte(s) sent to TLS, {c.to_sock} byte(s) sent to socket"
            for c in self.connections
        ]


# The SNI callback's choice, per SSLObject until its handshake ends; weak, so a connection that
# dies mid-handshake leaves nothing behind for a later object to inherit.
_SNI_CHOICE: weakref.WeakKeyDictionary[object, tuple[Service | None, str, str]] = weakref.WeakKeyDictionary()


def _handshake_waiter(
    loop: asyncio.AbstractEventLoop,
) -> tuple[asyncio.Future[BaseException | None], Callable[[TlsSide, BaseException | None], None]]:
    """A future for a TLS side's handshake, and the ``on_handshake`` callback that sets it."""
    fut: asyncio.Future[BaseException | None] = loop.create_future()

    def done(_side: TlsSide, exc: BaseException | None) -> None:
        if not fut.done():
            fut.set_result(exc)

    return fut, done


async def resolve(ep: Endpoint) -> list[tuple[int, Any]]:
    loop = asyncio.get_running_loop()
    host = ep.host or "localhost"
    infos = await loop.getaddrinfo(host, ep.port, type=socket.SOCK_STREAM)
    seen: list[tuple[int, Any]] = []
    for family, _t, _p, _c, addr in infos:
        item = (int(family), addr)
        if item not in seen:
            seen.append(item)
    return seen


def _chown(path: str, user: str | None, group: str | None) -> None:
    os.chown(path, uid_of(user) if user else -1, gid_of(group) if group else -1)


def sni_matches(name: str, pattern: str) -> bool:
    """stunnel's SNI pattern (both lower-case): a leading ``*`` matches any prefix, dots
    included (``*.example.com`` takes ``a.b.example.com``); every other character, ``*``, ``?``
    and ``[`` included, is literal."""
    if pattern.startswith("*"):
        return name.endswith(pattern[1:])
    return name == pattern
