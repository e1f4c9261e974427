"""Where a connection goes: targets, failover, name resolution, ``local``, transparent source
binding, and ``exec``/``pty`` programs as the far end.

:meth:`Upstream.dial` returns a connected socket or a :class:`Failed` that says why; it never
fails a connection itself (the opening does, with the failure's text).  It logs stunnel's
per-attempt lines (``s_connect: connect …``) through the caller's log function.

Imports: addr, program, sockopts, transparent, reasons, logs -- leaves only.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from tunnel import program, transparent
from tunnel.addr import Endpoint, format_sockaddr
from tunnel.listener import OUT_OF_RESOURCES
from tunnel.reasons import CloseReason
from tunnel.settings import ServiceSettings
from tunnel.sockopts import apply_socket_options, for_transport, socket_options
from tunnel.transparent import Target, TransparentError


@dataclass(frozen=True)
class Failed:
    """Why no upstream could be had; the opening fails the connection with ``detail``."""

    detail: str
    reason: CloseReason = CloseReason.CONNECT_FAILED


@dataclass(frozen=True)
class Dialed:
    """A connected upstream socket, the address shown in logs and the name as configured."""

    sock: socket.socket | None  # None: uvloop connected it (``transport``)
    shown: str
    name: str | None
    transport: asyncio.BaseTransport | None = None


class Caller(Protocol):
    """What dialing needs of the connection it dials for: a log and whether it still wants one."""

    @property
    def reason(self) -> CloseReason | None: ...
    def log(self, level: int, text: str, **fields: object) -> None: ...


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


class Upstream:
    """One service's way out: its ``connect`` (or ``redirect``) targets and how to reach them."""

    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        self.resolved: dict[Endpoint, list[tuple[int, Any]]] = {}
        self._rr = 0
        self.sockopts_r = socket_options(settings.socket, "r")
        self._before_connect = for_transport(self.sockopts_r)  # the socket becomes a transport

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

    async def targets(
        self, caller: Caller, redirected: bool, client: Any, ports: Callable[[], set[int]]
    ) -> list[Target] | Failed:
        """The addresses to try, in order: the client's original destination (transparent
        destination), or every resolved address of ``connect`` (``redirect`` when the client
        was redirected), rotated for ``failover = rr``."""
        if transparent.uses_destination(self.settings.transparent):
            try:
                return transparent.destination_targets(client, ports(), caller.log)
            except TransparentError as exc:
                return Failed(str(exc))
        eps = list(self.settings.redirect if redirected else self.settings.connect)
        start = 0
        if self.settings.failover == "rr" and not self.settings.delay and len(eps) > 1:
            start = self._rr % len(eps)
            self._rr += 1
            eps = eps[start:] + eps[:start]
        out: list[Target] = []
        for ep in eps:
            if ep.path is not None:
                out.append((socket.AF_UNIX, ep.path, None))
                continue
            addrs = self.resolved.get(ep) if not self.settings.delay else None
            if addrs is None:
                try:
                    addrs = await resolve(ep)
                except OSError as exc:
                    caller.log(3, f'Error resolving "{ep.host}": {exc.strerror or exc}')
                    continue
                if not self.settings.delay:  # not resolvable at start-up; it is now
                    self.resolved[ep] = addrs
            out.extend((fam, addr, ep.host or "localhost") for fam, addr in addrs)
        if not out:
            return Failed("No remote host resolved")
        if len(out) > 1:  # stunnel's line before the attempts, when there is a choice
            rr = self.settings.failover == "rr"
            caller.log(
                6,
                f"failover: round-robin, starting at entry #{start}"
                if rr
                else "failover: priority, starting at entry #0",
            )
        return out

    async def dial(
        self,
        caller: Caller,
        targets: list[Target],
        client: Any,
        out_of_fds: Callable[[OSError], None],
        protocol: asyncio.BaseProtocol | None = None,
    ) -> Dialed | Failed | None:
        """TCP-connect the first reachable target (failover), each bounded by TIMEOUTconnect.
        With ``protocol``, a plain TCP target may be connected by uvloop with it (``transport``).

        None when the caller gave up meanwhile (its connection ended)."""
        loop = asyncio.get_running_loop()
        opts = self.settings
        timeout = float(opts.TIMEOUTconnect)
        source = transparent.uses_source(opts.transparent) and not opts.local
        direct = protocol is not None and not source and not opts.local and not self._before_connect
        for family, addr, name in targets:
            if caller.reason is not None:
                return None
            shown = format_sockaddr(addr)
            if direct and protocol is not None and _plain_ip(family, addr):
                got = await self._direct(caller, protocol, (addr, shown, name), timeout)
                if isinstance(got, Dialed):
                    return got if caller.reason is None else _dropped(got)
                if not got:
                    continue  # refused, timed out (logged): the next target
            sock = await self._new_socket(caller, family, out_of_fds)
            if sock is None:
                break
            try:
                if source and not transparent.bind_source(
                    client, sock, family, addr, opts.transparent, caller.log
                ):
                    sock.close()  # the client's address does not fit this target: the next one
                    continue
            except TransparentError as exc:
                sock.close()
                return Failed(str(exc))
            sock.setblocking(False)
            try:
                if family != socket.AF_UNIX:
                    apply_socket_options(sock, family, self._before_connect)
                    if opts.local:
                        sock.bind((opts.local, 0))
                        caller.log(6, "bind succeeded on an ephemeral port")
                caller.log(6, f"s_connect: connecting {shown}")
                await connect(loop, sock, family, addr, timeout)
            except (OSError, TimeoutError) as exc:
                sock.close()
                _log_failed(caller, exc, shown)
                continue
            if caller.reason is not None:
                sock.close()
                return None
            return Dialed(sock, shown, name)
        return Failed("No more addresses to connect")

    async def _direct(
        self,
        caller: Caller,
        protocol: asyncio.BaseProtocol,
        target: tuple[Any, str, str | None],
        timeout: float,
    ) -> Dialed | bool:
        """uvloop's own connect (a numeric address: no resolver, no Python socket, no writable
        wait): ≈ 13 µs of CPU less than ours.  False: failed (logged); True: out of descriptors,
        our way (which waits for one) is to try."""
        addr, shown, name = target
        caller.log(6, f"s_connect: connecting {shown}")
        try:
            transport = await connect_direct(protocol, addr, timeout)
        except (OSError, TimeoutError) as exc:
            if exc.errno in OUT_OF_RESOURCES:
                return True
            _log_failed(caller, exc, shown)
            return False
        return Dialed(None, shown, name, transport)

    async def _new_socket(
        self, caller: Caller, family: int, out_of_fds: Callable[[OSError], None]
    ) -> socket.socket | None:
        """A socket for the upstream.  Out of descriptors: stop accepting and wait for one to
        be freed (up to TIMEOUTconnect) rather than drop a client that is already in."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + float(self.settings.TIMEOUTconnect)
        delay = 0.02
        while True:
            try:
                return socket.socket(family, socket.SOCK_STREAM)
            except OSError as exc:
                if exc.errno not in OUT_OF_RESOURCES or loop.time() + delay > deadline or caller.reason:
                    caller.log(3, f"s_connect: socket: {os.strerror(exc.errno or 0)} ({exc.errno})")
                    return None
                out_of_fds(exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    # ---- exec: the program is the far end ------------------------------------------------
    async def spawn(self, env: Mapping[str, str], foreground: bool, ident: str) -> socket.socket | Failed:
        """Start ``exec`` on a socket pair."""
        assert self.settings.exec is not None
        try:
            return await program.spawn(
                self.settings.exec,
                program.argv_of(self.settings.exec, self.settings.execArgs),
                dict(env),
                stderr_to_socket=not foreground,
                ident=ident,
            )
        except OSError as exc:
            return self._exec_failed(exc)

    async def spawn_pty(self, env: Mapping[str, str], foreground: bool, ident: str) -> int | Failed:
        """Start ``exec`` on a pseudo-terminal (``pty = yes``); its master descriptor."""
        assert self.settings.exec is not None
        try:
            return await program.spawn_pty(
                self.settings.exec,
                program.argv_of(self.settings.exec, self.settings.execArgs),
                dict(env),
                stderr_to_terminal=not foreground,
                ident=ident,
            )
        except OSError as exc:
            return self._exec_failed(exc)

    def _exec_failed(self, exc: OSError) -> Failed:
        return Failed(f"execv {self.settings.exec}: {exc.strerror or exc} ({exc.errno})")


async def connect(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, family: int, addr: Any, timeout: float
) -> None:
    """A non-blocking TCP connect bounded by ``timeout`` (TimeoutError): ``connect_ex``, then one
    wait until the socket is writable and its error read.  uvloop's ``sock_connect`` under
    ``asyncio.timeout`` cost ≈ 40 µs more CPU a connection on loopback."""
    if family == socket.AF_UNIX:
        async with asyncio.timeout(timeout):
            await loop.sock_connect(sock, addr)
        return
    err = sock.connect_ex(addr)
    if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EINTR):
        done = loop.create_future()
        fd = sock.fileno()
        loop.add_writer(fd, _writable, done)
        timer = loop.call_later(timeout, _expired, done)
        try:
            await done
        finally:
            timer.cancel()
            loop.remove_writer(fd)
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))  # e.g. ConnectionRefusedError, as sock_connect raised


def _writable(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)


def _expired(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_exception(TimeoutError())


def _log_failed(caller: Caller, exc: OSError, shown: str) -> None:
    """stunnel's line for a target that could not be connected."""
    if isinstance(exc, TimeoutError) and not exc.errno:
        caller.log(3, f"s_connect: s_poll_wait {shown}: TIMEOUTconnect exceeded")
    else:
        text = os.strerror(exc.errno) if exc.errno else str(exc)
        caller.log(3, f"s_connect: connect {shown}: {text} ({exc.errno})")


def _plain_ip(family: int, addr: Any) -> bool:
    """A target uvloop can connect by its numbers alone (an IPv6 scope needs our socket)."""
    return family == socket.AF_INET or (family == socket.AF_INET6 and not addr[3])


def _dropped(got: Dialed) -> None:
    """The caller gave up while uvloop connected: nothing to hand over."""
    if got.transport is not None:
        got.transport.close()


async def connect_direct(protocol: asyncio.BaseProtocol, addr: Any, timeout: float) -> asyncio.BaseTransport:
    """uvloop's ``create_connection`` to a numeric address with ``protocol``, bounded by ``timeout``
    (TimeoutError) through a timer that cancels this task, as ``asyncio.timeout`` does, cheaper."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    expired: list[bool] = []
    timer = loop.call_later(timeout, _cancel, task, expired)
    try:
        transport, _ = await loop.create_connection(lambda: protocol, addr[0], addr[1])
    except asyncio.CancelledError:
        if not expired:
            raise
        task.uncancel()
        raise TimeoutError() from None
    finally:
        timer.cancel()
    return transport


def _cancel(task: asyncio.Task[Any], expired: list[bool]) -> None:
    expired.append(True)
    task.cancel()
