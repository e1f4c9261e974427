"""A service: one ``[section]`` -- its listeners, its live connections, and their close report.

The registry of the house: it owns what lives as long as the section does (its listening
sockets, its upstream targets and resolution cache, its client session cache, its SNI
switch, its exec+connect program) and the set of live connections, for drain, SIGUSR2 and
the status server.  Each accepted socket becomes a relay :class:`~tunnel.relay.Connection`
whose opening (``tunnel/opening.py``) runs on its own; when the connection ends, the data
path reports back here (:meth:`Service.connection_ended`): counters, stunnel's close line,
the session kept for resumption, the descriptor freed.

Imports: opening, listener, upstream, sni, relay, protocols (lookup), tls (types), metrics,
logs, program -- the process rooms (server, workers, status) sit above it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import socket
import ssl
import string
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from tunnel import alpn, program, protocols
from tunnel.addr import Endpoint
from tunnel.listener import BUDGET, BindPlan, Listener, Listeners, became_connection, cap_of
from tunnel.logs import log
from tunnel.metrics import STATS
from tunnel.opening import Opening
from tunnel.reasons import CloseReason
from tunnel.relay import Connection, PlainSide, TlsSide
from tunnel.settings import ServiceSettings
from tunnel.sni import SniSwitch
from tunnel.sockopts import for_transport, socket_options
from tunnel.tls import TlsConfig
from tunnel.upstream import Upstream
from tunnel.values import gid_of, uid_of

if TYPE_CHECKING:
    from tunnel.systemd import Activation

_counter = itertools.count()
_BASE62 = string.ascii_letters + string.digits

SESSION_REFRESH = 30.0  # seconds a cached client session is kept before refreshing


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
        self.connections: set[Connection] = set()
        self.level = settings.debug[1]
        self.sessions: dict[str, tuple[ssl.SSLSession, float, int]] = {}
        self.secondaries: list[Service] = secondaries or []
        self.upstream = Upstream(settings)
        self.bound = Listeners(self, BindPlan(socket_options(settings.socket, "a"), settings.transparent))
        if settings.setuid or settings.setgid:
            self.bound.plan.chown = self._chown
        self._drained: asyncio.Event | None = None
        self.accepting = True
        self.counters = STATS.service(self.name)
        self.cap = cap_of(self.name, settings.maxConnections)  # shared with its predecessor
        self.cap.on_waited = self.counters.limited_one
        self.protocol = protocols.lookup(settings.protocol, settings.client) if settings.protocol else None
        # exec: the program is the remote end (accept + exec) or the local end (exec + connect)
        self.exec_remote = bool(settings.exec) and not settings.connect
        self.exec_local = bool(settings.exec) and bool(settings.connect) and not settings.accept
        self.set_env: list[str] = []  # the global setEnv lines (runtime fills them in)
        self.foreground = True
        self.on_pipes = False  # inetd mode on pipes, not a socket (tunnel/stdio.py)
        self._local_done: asyncio.Event | None = None
        self._local_task: asyncio.Task[None] | None = None  # exec+connect's start/retry loop
        self.sockopts_l = for_transport(socket_options(settings.socket, "l"))  # on a transport
        self.sni: SniSwitch[Service] | None = None
        if not settings.client and self.secondaries:
            patterns = [
                (sec.settings.sni.split(":", 1)[1], sec) for sec in self.secondaries if sec.settings.sni
            ]
            self.sni = SniSwitch(patterns, lambda sec: sec.tls.context)
            self.sni.install(self.tls.context)

    # ---- what an opening asks of its service (opening.Venue) ---------------------------
    def log_conn(self, level: int, conn_id: str, text: str, fields: dict[str, object] | None = None) -> None:
        if level <= self.level:
            if log.json:
                fields = {"service": self.name, "event": "error" if level <= 3 else "log", **(fields or {})}
            log.write(level, conn_id, text, threshold=self.level, fields=fields)

    def opened(self, conn: Connection, sock: socket.socket | None) -> None:
        self.connections.add(conn)
        BUDGET.active += 1
        self.cap.opened()
        if sock is not None:
            became_connection(sock.fileno())  # no longer pending: never counted twice

    def out_of_fds(self, exc: OSError) -> None:
        self.bound.pause(exc)

    def ports(self) -> set[int]:
        return self.bound.ports()

    def session_for(self, target: str) -> ssl.SSLSession | None:
        cached = self.sessions.get(target)
        return cached[0] if cached and cached[2] == self.tls.generation else None

    def sni_target(self, sslobj: object, say: Callable[[int, str], None]) -> Service | None:
        return self.sni.chosen(sslobj, say) if self.sni is not None else None

    def next_id(self) -> str:
        """stunnel's ``logId``: a global sequence number; 22 random base62 characters (as
        5.68 prints them); the id of the thread serving the connection (one event-loop thread
        here, so every connection of a process shares it); the process id."""
        mode = self.settings.logId
        if mode == "unique":
            import secrets  # only for logId = unique: not at start-up

            return "".join(secrets.choice(_BASE62) for _ in range(22))
        if mode == "process":
            return str(os.getpid())
        if mode == "thread":
            return str(threading.get_native_id())
        return str(next(_counter))

    def swap_tls(self, tls: TlsConfig) -> None:
        """Certificate reload: new connections use ``tls``; live ones keep their context."""
        old, self.tls = self.tls.stapler, tls
        if old is not None:  # OCSP stapling: the new certificate's own fetcher takes over
            old.stop()
        if tls.stapler is not None:
            tls.stapler.adopt(old)
            tls.stapler.start(self._staple_log)
        if self.sni is not None:
            self.sni.install(tls.context)

    # ---- accepting -----------------------------------------------------------------
    def factory(self) -> PlainSide | TlsSide:
        """A new connection's first side, for what a listener (or exec+connect) accepted."""
        conn = Connection(self, self.next_id())
        side: PlainSide | TlsSide
        if self.settings.client:
            side = conn.plain = PlainSide(conn)
        else:
            side = conn.tls = TlsSide(conn, self.tls.context, server_side=True)
            mode = self.protocol
            if mode is not None:
                side.deferred = bool(mode.early or (mode.connect_before_tls and mode.middle))
        side.made_hook = Opening(self, conn).accepted
        return side

    # ---- listening -------------------------------------------------------------------
    @property
    def listeners(self) -> list[Listener]:
        return self.bound.items

    @listeners.setter
    def listeners(self, items: list[Listener]) -> None:
        self.bound.items = list(items)

    @property
    def reuse_port(self) -> bool:
        return self.bound.plan.reuse_port

    @reuse_port.setter
    def reuse_port(self, value: bool) -> None:  # --workers: every worker binds the same ports
        self.bound.plan.reuse_port = value

    def bind(
        self,
        activation: Activation | None = None,
        endpoints: list[Endpoint] | None = None,
        quiet: bool = False,
    ) -> list[str]:
        """Bind every accept address (or those of ``endpoints``).  Returns errors."""
        if self.settings.accept and not quiet:
            log.ui(7, f"Binding service [{self.name}]")
        errors = self.bound.bind(self.settings.accept if endpoints is None else endpoints, activation, quiet)
        if self.settings.accept and not self.bound.items and not quiet:
            log.ui(3, f"Binding service [{self.name}] failed")
        return errors

    def clone_listeners(self) -> list[Listener]:
        return self.bound.clone()

    def adopt(self, listeners: list[Listener]) -> None:
        self.bound.adopt(listeners)

    def _chown(self, path: str) -> None:
        user, group = self.settings.setuid, self.settings.setgid
        os.chown(path, uid_of(user) if user else -1, gid_of(group) if group else -1)

    async def resolve_all(self) -> list[str]:
        return await self.upstream.resolve_all()

    def _staple_log(self, level: int, text: str) -> None:
        self.log_conn(level, "ui", text)

    async def start(self) -> None:
        self.bound.start()
        for svc in (self, *self.secondaries):  # OCSP stapling: fetched off the connection path
            if svc.tls.stapler is not None:
                svc.tls.stapler.start(svc._staple_log)
        if self.exec_local and self._local_done is None:
            self._local_done = asyncio.Event()
            self._local_task = asyncio.get_running_loop().create_task(self._run_exec_local())

    async def _run_exec_local(self) -> None:
        """exec + connect: the program is the local end, started now and again on ``retry``."""
        loop = asyncio.get_running_loop()
        done = self._local_done
        assert done is not None
        log.ui(5, f"Starting exec+connect service [{self.name}]")
        env = program.child_env(self.set_env)
        while self.accepting:
            done.clear()
            if self.settings.pty:
                master = await self.upstream.spawn_pty(env, self.foreground, self.name)
                if isinstance(master, int):
                    await program.PtyTransport(self.factory()).attach(master)
                    await done.wait()
                else:
                    log.ui(3, f"Service [{self.name}]: {master.detail}")
            else:
                sock = await self.upstream.spawn(env, self.foreground, self.name)
                if not isinstance(sock, socket.socket):
                    log.ui(3, f"Service [{self.name}]: {sock.detail}")
                else:
                    try:
                        await loop.connect_accepted_socket(self.factory, sock)
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

    async def stop_accepting(self) -> int:
        """Shutdown: serve what already waits in the kernel's accept queue, then close."""
        self._stop_local()
        return await self.bound.stop_accepting()

    def close_listeners(self) -> None:
        self._stop_local()
        self.bound.close()

    def _stop_local(self) -> None:
        self.accepting = False
        for svc in (self, *self.secondaries):
            if svc.tls.stapler is not None:
                svc.tls.stapler.stop()
        if self._local_task is not None:  # no more retries; the live connection drains
            self._local_task.cancel()

    # ---- end of a connection: the close report ----------------------------------------
    def connection_ended(self, conn: Connection) -> None:
        if conn not in self.connections:
            return
        self.connections.discard(conn)
        BUDGET.released()
        self.cap.released()
        reason = conn.reason or CloseReason.CLOSED
        self.counters.ended(reason, conn.to_tls, conn.to_sock)
        if conn.failure is not None:  # found by the data path (a reset mid-handshake)
            self.counters.handshake_failed(conn.failure)
        tls = conn.tls
        resumable = self.settings.client and self.settings.sessionResume
        if resumable and conn.target and conn.linked and tls is not None and reason is CloseReason.CLOSED:
            self._remember_session(conn.target, tls)
        if self.level >= 5:
            self._log_close(conn)
        if self._drained is not None and not self.connections:
            self._drained.set()
        self.bound.freed()  # a descriptor was freed: accepting may work again
        if self._local_done is not None:
            self._local_done.set()

    def _log_close(self, conn: Connection) -> None:
        """stunnel's close line (LOG5) and pytunnel's summary (LOG6), or one JSON event."""
        protocol = alpn.negotiated(conn.tls.sslobj) if conn.tls and not conn.tls.handshaking else None
        if log.json:
            s = conn.summary()
            conn.log(
                5, conn.detail or f"Connection {s['reason']}", event="closed", peer=s["peer"],
                bytes={"to_tls": conn.to_tls, "to_plain": conn.to_sock}, duration=s["duration"],
                reason=s["reason"], **({"peer_cn": conn.peer_cn} if conn.peer_cn else {}),
                **({"alpn": protocol} if protocol else {}),
            )  # fmt: skip
            return
        word = "reset" if conn.rst_sent else "closed"
        if conn.rst_sent and conn.tls is not None and conn.tls.fatal_alert:  # stunnel: remote/local
            word = "closed/reset" if self.settings.client else "reset/closed"
        conn.log(
            5, f"Connection {word}: {conn.to_tls} byte(s) sent to TLS, {conn.to_sock} byte(s) sent to socket"
        )
        if self.level >= 6:
            s = conn.summary()
            cn = f" peer_cn={conn.peer_cn!r}" if conn.peer_cn else ""
            cn += f" alpn={protocol}" if protocol else ""
            conn.log(
                6, f"Connection summary: reason={s['reason']} duration={s['duration']}s from={s['peer']}{cn}"
            )

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
