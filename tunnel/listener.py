"""Listening sockets: bind, accept, the descriptor budget, and the hand-over at reload.

A :class:`Listener` is one bound socket and its accept loop; a :class:`Listeners` is one
service's set of them (bind every ``accept`` address or take systemd's sockets, clone them for
another worker, adopt them from the old service at a SIGHUP, serve the kernel's queue before
closing).  Each accepted socket goes to the owner's ``factory`` -- the service of the moment,
so a reload swaps who serves new clients without closing a port.  The descriptor budget stops
accepting before the process runs out of descriptors (each connection needs two); a service's
:class:`Cap` (``maxConnections``) stops its own listeners at N live connections the same way.

Imports: addr, logs, sockopts, transparent and systemd (types) -- nothing that knows what a
connection is.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from tunnel import transparent
from tunnel.addr import Endpoint, format_sockaddr
from tunnel.logs import log
from tunnel.sockopts import SocketOption, apply_socket_options

if TYPE_CHECKING:
    from tunnel.systemd import Activation

ACCEPT_BATCH = 64
BACKLOG = 1024  # listen() backlog of the sockets we bind
# uvloop's C accept loop serves a TCP listener while both gates have at least C_ROOM free
# connections (hysteresis: it hands back to ours below C_SLACK), see Listener
C_SLACK = 64
C_ROOM = 2 * C_SLACK
OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
FD_RESERVE = 24  # listeners, logs, status server, resolver, exec pipes


class Acceptor(Protocol):
    """Who serves what a listener accepts (a service; a reload replaces it)."""

    @property
    def name(self) -> str: ...
    @property
    def cap(self) -> Cap: ...
    def factory(self) -> asyncio.BaseProtocol: ...


@dataclass(eq=False)
class Listener:
    """One listening socket and its accept loop: ours, or uvloop's while far from the limits.

    Near a limit we accept ourselves: libuv answers EMFILE by accepting and closing every
    waiting connection (its "EMFILE trick"), which drops clients, and it cannot stop at a
    count.  Here an EMFILE/ENFILE stops accepting for a moment (one log line, back-off up
    to a second, or until a connection ends) and the waiting clients stay in the kernel's
    backlog, as stunnel leaves them; so do the clients beyond the descriptor budget or the
    service's cap.

    Far from both (``C_ROOM`` connections free in each), a TCP listener is served by uvloop's
    own accept loop (``loop.create_server`` on a duplicate of the socket): no Python accept,
    socket object or task per connection, ≈ 25 µs of CPU less each.  libuv accepts one
    connection per loop iteration; each one's factory call checks the room left, and below
    ``C_SLACK`` the uvloop server is closed (the duplicate only: the socket and its backlog
    stay) before the next iteration, and our loop takes over.
    """

    sock: socket.socket
    display: str
    endpoint: Endpoint
    owner: Acceptor
    reading: bool = False
    closed: bool = False
    waited: bool = False  # held by its service's cap: what it accepts next waited in the backlog
    backoff: float = 0.0
    resume_handle: asyncio.TimerHandle | None = None
    backlog: int = 0  # what we listen()ed with (0: not ours, e.g. systemd's): uvloop listens again
    server: asyncio.AbstractServer | None = None  # uvloop's accept loop, while it serves
    dup: socket.socket | None = None  # the descriptor it serves (detached when it closes)
    c_ok: bool = True  # False after an accept ran out of resources: ours accepts from then on

    def factory(self) -> asyncio.BaseProtocol:
        """New connections go to the current owner (a reload swaps it)."""
        return self.owner.factory()

    def start(self) -> None:
        if not self.reading and not self.closed:
            self.reading = True
            if not self._serve_in_c():
                asyncio.get_running_loop().add_reader(self.sock.fileno(), self._on_readable)

    def stop(self) -> None:
        """Stop accepting (the waiting clients stay in the kernel's backlog)."""
        if self.server is not None:
            self.server.close()
            self.server = self.dup = None
        elif self.reading:
            with contextlib.suppress(RuntimeError, ValueError, OSError):
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
        self.reading = False

    # ---- uvloop's accept loop, far from the limits ---------------------------------------
    def _roomy(self) -> bool:
        if not self.c_ok or not self.backlog or self.waited:
            return False
        return _room(BUDGET) >= C_ROOM and _room(self.owner.cap) >= C_ROOM

    def _serve_in_c(self) -> bool:
        """Hand the socket to uvloop's accept loop when there is room (True: it serves)."""
        if self.sock.family not in (socket.AF_INET, socket.AF_INET6) or not self._roomy():
            return False
        loop = asyncio.get_running_loop()
        if not type(loop).__module__.startswith("uvloop"):
            return False
        dup = socket.socket(self.sock.family, socket.SOCK_STREAM, 0, os.dup(self.sock.fileno()))
        coro = loop.create_server(self._c_factory, sock=dup, backlog=self.backlog)
        try:
            coro.send(None)  # with a socket given it never waits
        except StopIteration as done:
            self.server, self.dup, self.backoff = done.value, dup, 0.0
            return True
        coro.close()
        dup.close()
        return False

    def _c_factory(self) -> asyncio.BaseProtocol:
        """uvloop accepted a connection: it is served; below the slack, ours takes over."""
        if _room(BUDGET) <= C_SLACK or _room(self.owner.cap) <= C_SLACK:
            asyncio.get_running_loop().call_soon(self.recheck)
        return self.owner.factory()

    def recheck(self) -> None:
        """Near a limit (or after a reload changed the cap): back to our accept loop."""
        if self.server is not None and not self._roomy():
            self.stop()
            self.start()

    def c_alive(self) -> bool:
        """False when uvloop closed its server under us (an accept error it cannot retry)."""
        return self.dup is None or self.dup.fileno() >= 0

    def _on_readable(self) -> None:
        loop = asyncio.get_running_loop()
        cap = self.owner.cap
        if self._roomy():  # far from the limits again: uvloop's loop accepts
            loop.remove_reader(self.sock.fileno())
            if not self._serve_in_c():
                loop.add_reader(self.sock.fileno(), self._on_readable)
            else:
                return
        for _ in range(ACCEPT_BATCH):
            if BUDGET.full():
                BUDGET.hold(self)
                return
            if cap.full():
                cap.hold(self)
                return
            try:
                conn_sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                self.waited = False  # the backlog is empty: nobody waits any more
                return
            except OSError as exc:
                if exc.errno in OUT_OF_RESOURCES:
                    self.pause(exc)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                log.ui(3, f"Service [{self.owner.name}]: accept: {exc.strerror} ({exc.errno})")
                return
            self.backoff = 0.0
            conn_sock.setblocking(False)
            if self.waited:
                cap.on_waited()
            BUDGET.pending += 1  # counted now: the task that adopts it runs later
            cap.pending += 1
            loop.create_task(_adopt(loop, self, conn_sock, cap))

    def pause(self, exc: OSError) -> None:
        """Out of descriptors: stop accepting for a back-off (or until a connection ends)."""
        loop = asyncio.get_running_loop()
        self.stop()
        self.c_ok = False  # descriptors the budget does not know of: libuv would shed clients
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
            if self.server is None:
                self._on_readable()

    def close(self) -> None:
        self.closed = True
        if self.resume_handle is not None:
            self.resume_handle.cancel()
            self.resume_handle = None
        self.stop()
        self.sock.close()


class Gate:
    """A count of live connections with a limit (0: none): when full, the listeners that hit
    it stop reading (``held``) and new clients wait in the kernel's backlog; a connection
    that ends wakes them.  :class:`Budget` and :class:`Cap` say why in their ``hold``."""

    def __init__(self) -> None:
        self.limit = 0
        self.active = 0
        self.pending = 0  # accepted sockets not yet connections
        self.held: set[Listener] = set()

    def full(self) -> bool:
        return bool(self.limit) and self.active + self.pending >= self.limit

    @staticmethod
    def pause(lst: Listener) -> None:
        lst.stop()

    def released(self) -> None:
        """A connection ended: a held listener may accept again."""
        self.active -= 1
        self.wake()

    def wake(self) -> None:
        """Room again under the limit: the held listeners accept once more."""
        if self.held and not self.full():
            held, self.held = self.held, set()
            for lst in held:
                lst.resume()


class Budget(Gate):
    """Connections the descriptor limit can carry (each needs two), as stunnel sizes its
    client limit: at the limit, accepting stops and new clients wait in the kernel's backlog
    (instead of being accepted with no descriptor left for their upstream)."""

    def __init__(self) -> None:
        super().__init__()
        self.soft = 0

    def configure(self) -> None:
        self.soft, self.limit = descriptor_budget()

    def hold(self, lst: Listener) -> None:
        self.pause(lst)
        if not self.held:
            log.ui(
                4,
                f"Service [{lst.owner.name}]: {self.active + self.pending} connections use the descriptor limit "
                f"(RLIMIT_NOFILE {self.soft} carries {self.limit}); new clients wait in the backlog",
            )
        self.held.add(lst)


BUDGET = Budget()


def _room(gate: Gate) -> int:
    """Connections ``gate`` still admits (a large number when it has no limit)."""
    return gate.limit - gate.active - gate.pending if gate.limit else 1 << 30


def descriptor_budget() -> tuple[int, int]:
    """(RLIMIT_NOFILE soft limit, connections it carries); 0 connections: no limit."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return soft, 0
    return soft, max(4, (soft - FD_RESERVE) // 2)


def _no_count() -> None:
    pass


class Cap(Gate):
    """``maxConnections``: one service's live connections.  At ``limit`` its listeners stop
    accepting and new clients wait in the kernel's backlog (as under the descriptor budget);
    each connection that ends lets one in.  Kept by service name (:func:`cap_of`), so the
    connections of a service a reload replaced still count against its successor's cap."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.on_waited: Callable[[], None] = _no_count  # a client accepted after waiting for a slot

    def hold(self, lst: Listener) -> None:
        self.pause(lst)
        if not self.held and not lst.waited:
            log.ui(
                6,
                f"Service [{self.name}]: maxConnections = {self.limit} reached; "
                "new clients wait in the backlog",
            )
        lst.waited = True
        self.held.add(lst)

    def opened(self) -> None:
        self.active += 1


CAPS: dict[str, Cap] = {}


def cap_of(name: str, limit: int) -> Cap:
    """The cap of service ``name`` (the same object across reloads), set to ``limit``."""
    cap = CAPS.get(name)
    if cap is None:
        cap = CAPS[name] = Cap(name)
    cap.limit = limit
    return cap


# Accepted sockets, by descriptor, that are not yet connections: each counts as pending in the
# descriptor budget and its cap until ``became_connection`` (from the connection's start, in the
# same step that counts it active) or, when it never becomes one, the end of its ``_adopt``.
_PENDING: dict[int, tuple[Cap, object]] = {}


def became_connection(fd: int) -> None:
    entry = _PENDING.pop(fd, None)
    if entry is not None:
        BUDGET.pending -= 1
        entry[0].pending -= 1


async def _adopt(loop: asyncio.AbstractEventLoop, lst: Listener, sock: socket.socket, cap: Cap) -> None:
    fd, token = sock.fileno(), object()
    _PENDING[fd] = (cap, token)
    try:
        await loop.connect_accepted_socket(lst.factory, sock)
    except OSError:
        sock.close()  # reset before we got to it: nothing to serve
    finally:
        entry = _PENDING.get(fd)
        if entry is not None and entry[1] is token:  # it never became a connection
            became_connection(fd)
        BUDGET.wake()
        cap.wake()


@dataclass(eq=False)
class BindPlan:
    """How a service's listening sockets are made: its ``a:`` socket options, transparent
    mode, the owner of Unix socket files, and SO_REUSEPORT for ``--workers``."""

    sockopts: list[SocketOption]
    transparent: str
    chown: Callable[[str], None] | None = None
    reuse_port: bool = False


class Listeners:
    """One service's listening sockets."""

    def __init__(self, owner: Acceptor, plan: BindPlan) -> None:
        self.owner = owner
        self.plan = plan
        self.items: list[Listener] = []

    def __iter__(self) -> Any:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def bind(
        self,
        endpoints: list[Endpoint],
        activation: Activation | None = None,
        quiet: bool = False,
    ) -> list[str]:
        """Bind every address in ``endpoints``: synchronously, before the loop or during a
        reload.  A socket passed by systemd for an address is used as it is.  Returns errors."""
        name = self.owner.name
        errors: list[str] = []
        for ep in endpoints:
            passed = activation.take(name, ep.host, ep.port, ep.path) if activation else None
            if passed is not None:
                passed.setblocking(False)
                display = format_sockaddr(passed.getsockname())
                log.ui(6, f"Service [{name}] (FD={passed.fileno()}) bound to {display}")
                log.ui(7, f"Service [{name}]: listening socket {display} passed by systemd")
                self.items.append(Listener(sock=passed, display=display, endpoint=ep, owner=self.owner))
                continue
            try:
                self.items.append(self._bind_one(ep))
            except OSError as exc:
                text = f"Binding service [{name}] to {ep.display()}: {exc.strerror} ({exc.errno})"
                log.ui(7 if quiet else 3, text)
                errors.append(text)
        return errors

    def _bind_one(self, ep: Endpoint) -> Listener:
        if ep.path is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                if os.path.exists(ep.path) and not os.path.isdir(ep.path):
                    os.unlink(ep.path)
                sock.bind(ep.path)
                if self.plan.chown is not None:
                    self.plan.chown(ep.path)
                sock.listen(BACKLOG)
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
            sock = self._listening(family, addr, stype, proto, self.plan.reuse_port)
            display = format_sockaddr(sock.getsockname())
        sock.setblocking(False)
        log.ui(6, f"Service [{self.owner.name}] (FD={sock.fileno()}) bound to {display}")
        return Listener(sock=sock, display=display, endpoint=ep, owner=self.owner, backlog=BACKLOG)

    def _listening(self, family: int, addr: Any, stype: int, proto: int, reuse_port: bool) -> socket.socket:
        sock = socket.socket(family, stype, proto)
        try:
            apply_socket_options(sock, family, self.plan.sockopts)
            transparent.prepare_listener(sock, family, self.plan.transparent, self.owner.name)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(addr)
            sock.listen(BACKLOG)
        except OSError:
            sock.close()
            raise
        return sock

    def clone(self) -> list[Listener]:
        """Another worker's sockets on the same addresses (SO_REUSEPORT; a Unix socket is shared)."""
        out: list[Listener] = []
        for lst in self.items:
            if lst.endpoint.path is not None:
                out.append(lst)
                continue
            sock = self._listening(lst.sock.family, lst.sock.getsockname(), socket.SOCK_STREAM, 0, True)
            sock.setblocking(False)
            out.append(
                Listener(
                    sock=sock, display=lst.display, endpoint=lst.endpoint, owner=self.owner, backlog=BACKLOG
                )
            )
        return out

    def adopt(self, listeners: list[Listener]) -> None:
        """Reload: listening sockets handed over from the old service (same address)."""
        self.items = list(listeners)
        for lst in self.items:
            lst.owner = self.owner
            lst.recheck()  # the new cap may be smaller
            log.ui(6, f"Service [{self.owner.name}] (FD={lst.sock.fileno()}) bound to {lst.display}")

    def start(self) -> None:
        for lst in self.items:
            lst.start()

    def pause(self, exc: OSError) -> None:
        """Out of descriptors while dialing: stop accepting until one is freed."""
        for lst in self.items:
            if lst.reading:
                lst.pause(exc)

    def freed(self) -> None:
        """A connection ended and freed a descriptor: accepting may work again."""
        for lst in self.items:
            if lst.resume_handle is not None:
                lst.resume()
            elif not lst.c_alive():  # uvloop's accept failed and closed its server
                lst.server = lst.dup = None
                lst.reading = False
                lst.pause(OSError(errno.EMFILE, "uvloop's accept loop stopped"))

    def ports(self) -> set[int]:
        return {lst.sock.getsockname()[1] for lst in self.items if lst.endpoint.path is None}

    async def stop_accepting(self) -> int:
        """Shutdown: serve what already waits in the kernel's accept queue, then close.

        Those clients finished their TCP handshake and think they are connected; closing the
        listener under them would reset them.  Returns how many were taken from the queue.
        """
        loop = asyncio.get_running_loop()
        adopted: list[Coroutine[Any, Any, object]] = []
        for lst in self.items:
            while len(adopted) < 4096:
                try:
                    sock, _ = lst.sock.accept()
                except OSError:  # BlockingIOError: the queue is empty
                    break
                adopted.append(loop.connect_accepted_socket(lst.factory, sock))
        self.close()
        if adopted:
            await asyncio.gather(*adopted, return_exceptions=True)
        return len(adopted)

    def close(self) -> None:
        for lst in self.items:
            lst.close()
            if lst.endpoint.path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(lst.endpoint.path)
        self.items = []
