"""``--workers N``: N processes serving the same ports, and a parent that supervises them.

The parent reads the configuration, builds every TLS context and binds every listening
socket (one per worker and address, with ``SO_REUSEPORT``, so the kernel spreads new
connections), drops privileges, then forks.  Forking after the contexts exist means the
workers share one session-ticket key per service: a ticket issued by one worker resumes
on another.  The parent keeps each worker's sockets open, so the connections that queue
for a worker that died wait for its replacement instead of being reset.

The parent runs no event loop of its own: a ``selectors`` loop wakes on signals (through
``signal.set_wakeup_fd``), on each worker's control socket and on the status port.
It forwards TERM/INT/QUIT/HUP/USR1/USR2 to the workers, restarts a worker that exits
unexpectedly (back-off 1 s doubling to 30 s, reset after a worker lived 60 s), waits
for every worker to drain on stop, and answers ``/livez``, ``/readyz`` and ``/metrics``
for all of them: it asks each worker for a snapshot over its control socket and merges
them (``status.merge``).

This room sits above the server: the parent runs :meth:`Server.prepare` (bind, chroot,
setuid, pid file), then forks; each child keeps its own share of the sockets and runs
:meth:`Server.serve`, telling the parent it is ready through the server's ``on_ready``
callback.  The server never imports this module.

May import: server, status, systemd, logs (and service for types).
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tunnel import process, status, systemd
from tunnel.errors import STARTUP_FAILURE
from tunnel.logs import log
from tunnel.server import HANDLED_SIGNALS, Server

if TYPE_CHECKING:
    from tunnel.listener import Listener

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0
STATS_TIMEOUT = 2.0


@dataclass
class Worker:
    index: int
    pid: int = 0
    control: socket.socket | None = None
    buffer: bytes = b""
    started: float = 0.0
    ready: bool = False
    backoff: float = 0.0
    restart_at: float | None = None
    exits: list[int] = field(default_factory=list)


class Supervisor:
    """The parent of ``count`` workers that each run ``server`` (prepared: bound, jailed)."""

    def __init__(self, server: Server, count: int) -> None:
        self.server = server
        self.count = count
        self.sets: list[list[list[Listener]]] = []  # [worker][service] -> its listeners
        self.workers = [Worker(i) for i in range(count)]
        self.stopping = 0
        self.sel = selectors.DefaultSelector()
        self.announced = False
        self._prom: Any = None

    # ---- process management ------------------------------------------------------------
    def spawn(self, w: Worker) -> None:
        parent_end, child_end = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # the worker
            parent_end.close()
            code = 1
            try:
                code = run_worker(self.server, self.sets[w.index], child_end, self._close_in_child())
            finally:
                os._exit(code)
        child_end.close()
        parent_end.setblocking(False)
        w.pid, w.control, w.buffer, w.ready = pid, parent_end, b"", False
        w.started = time.monotonic()
        self.sel.register(parent_end, selectors.EVENT_READ, ("control", w))
        log.ui(5, f"Worker {w.index} started (PID={pid})")

    def _close_in_child(self) -> list[socket.socket]:
        """What a worker must not keep: the other workers' control sockets and the status port."""
        out = [w.control for w in self.workers if w.control is not None]
        if self.server.status is not None and self.server.status.sock is not None:
            out.append(self.server.status.sock)
        return out

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            w = next((w for w in self.workers if w.pid == pid), None)
            if w is None:
                continue
            w.pid = 0
            w.ready = False
            if w.control is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self.sel.unregister(w.control)
                w.control.close()
                w.control = None
            if self.stopping:
                log.ui(5, f"Worker {w.index} (PID={pid}) exited with code {code}")
                continue
            lived = time.monotonic() - w.started
            w.backoff = 1.0 if lived > STABLE_AFTER or not w.backoff else min(w.backoff * 2, BACKOFF_MAX)
            w.restart_at = time.monotonic() + w.backoff
            how = f"signal {-code}" if code < 0 else f"code {code}"
            log.ui(3, f"Worker {w.index} (PID={pid}) exited with {how}; restarting in {w.backoff:g} s")

    def forward(self, sig: int) -> None:
        for w in self.workers:
            if w.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, sig)

    # ---- the loop --------------------------------------------------------------------
    def run(self) -> int:
        """Fork the workers and supervise them until they have all stopped; the exit code."""
        server = self.server
        if server.loop is not None:
            server.loop.close()  # the parent runs no event loop; each worker makes its own
            server.loop = None
        try:
            self.sets = [[s.listeners for s in server.services]]
            for _ in range(self.count - 1):
                self.sets.append([s.clone_listeners() for s in server.services])
        except OSError as exc:
            log.ui(3, f"Binding the workers' sockets: {exc.strerror} ({exc.errno})")
            server.close_all()
            return STARTUP_FAILURE
        log.ui(5, f"Starting {self.count} workers")
        try:
            return self._supervise()
        finally:
            server.close_all()
            process.remove_pid_file(server.pidfile)

    def _supervise(self) -> int:
        rfd, wfd = os.pipe()
        os.set_blocking(rfd, False)
        os.set_blocking(wfd, False)
        pending: list[int] = []
        for sig in (*FORWARDED, signal.SIGCHLD):
            signal.signal(sig, lambda s, _f: pending.append(s))
        signal.set_wakeup_fd(wfd)
        self.sel.register(rfd, selectors.EVENT_READ, ("signal", None))
        for w in self.workers:
            self.spawn(w)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {*FORWARDED, signal.SIGCHLD})
        port = self.server.status
        if port is not None and port.sock is not None:
            port.sock.setblocking(False)
            self.sel.register(port.sock, selectors.EVENT_READ, ("status", None))
            log.ui(5, f"Status server listening on http://{port.address()} (/livez /readyz /metrics)")
        while True:
            for key, _ in self.sel.select(timeout=0.5):
                kind, obj = key.data
                if kind == "signal":
                    with contextlib.suppress(BlockingIOError):
                        os.read(rfd, 512)
                elif kind == "control":
                    self._control(obj)
                elif kind == "status":
                    self._status()
            while pending:
                self._signal(pending.pop(0))
            if self.stopping and not any(w.pid for w in self.workers):
                log.ui(5, "Terminated")
                return 0
            now = time.monotonic()
            for w in self.workers:
                if not self.stopping and not w.pid and w.restart_at is not None and now >= w.restart_at:
                    w.restart_at = None
                    self.spawn(w)

    def _signal(self, sig: int) -> None:
        if sig == signal.SIGCHLD:
            self.reap()
            return
        if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            self.stopping += 1
            if self.stopping == 1:
                log.ui(5, f"Received signal {sig}; stopping {self.count} worker(s)")
                systemd.stopping("Draining connections")
            else:
                log.ui(5, "Second termination signal: workers close every connection now")
        elif sig == signal.SIGHUP:
            log.ui(5, "Received SIGHUP: every worker reloads the configuration")
        elif sig == signal.SIGUSR1:
            log.reopen()
        self.forward(sig)

    def _control(self, w: Worker) -> None:
        assert w.control is not None
        try:
            data = w.control.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            return
        w.buffer += data
        self._take_lines(w)
        self._maybe_announce()

    def _maybe_announce(self) -> None:
        if not self.announced and all(x.ready for x in self.workers):
            self.announced = True
            log.ui(6, f"All {self.count} workers accept connections")
            systemd.ready(f"Accepting connections with {self.count} worker(s)")

    # ---- status ------------------------------------------------------------------------
    def _snapshots(self) -> list[dict[str, Any]]:
        """Ask every live worker for its snapshot; wait up to STATS_TIMEOUT for the answers."""
        live = [w for w in self.workers if w.pid and w.control is not None]
        for w in live:
            assert w.control is not None
            with contextlib.suppress(OSError):
                w.control.sendall(b"stats\n")
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + STATS_TIMEOUT
        for w in live:
            assert w.control is not None
            w.control.setblocking(True)
            snap: dict[str, Any] | None = None
            try:
                while snap is None:
                    snap = self._take_lines(w)
                    left = deadline - time.monotonic()
                    if snap is not None or left <= 0:
                        break
                    w.control.settimeout(left)
                    chunk = w.control.recv(1 << 20)
                    if not chunk:
                        break
                    w.buffer += chunk
            except OSError:
                pass
            finally:
                w.control.setblocking(False)
            if snap is not None:
                out.append(snap)
        self._maybe_announce()
        return out

    @staticmethod
    def _take_lines(w: Worker) -> dict[str, Any] | None:
        """Consume the complete lines a worker sent: ``ready``, and its snapshot (JSON) if there."""
        *lines, w.buffer = w.buffer.split(b"\n")
        snap = None
        for line in lines:
            if line == b"ready":
                w.ready = True
            elif line.startswith(b"{"):
                with contextlib.suppress(ValueError):
                    snap = json.loads(line)
        return snap

    def _status(self) -> None:
        port = self.server.status
        assert port is not None and port.sock is not None
        try:
            conn, _ = port.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(status.REQUEST_TIMEOUT)
            try:
                request = conn.recv(8192).split(b"\r\n", 1)[0]
                answer = self._answer(request)
                conn.sendall(status.http_response(request, *answer))
            except OSError:
                return

    def _answer(self, request: bytes) -> status.Answer:
        target = status.request_target(request)
        if isinstance(target, tuple):
            return target
        if target == "/livez":
            alive = sum(1 for w in self.workers if w.pid)
            ok = alive > 0
            body = f"ok: {alive} of {self.count} workers\n".encode()
            return ("200 OK" if ok else "503 Service Unavailable"), "text/plain", body
        if target == "/readyz":
            snaps = self._snapshots()
            merged = status.merge(snaps)
            if len(snaps) < self.count or self.stopping:
                merged["ready"] = False
            merged["draining"] = merged["draining"] or bool(self.stopping)
            return status.readyz(merged, workers=len(snaps))
        if target == "/metrics":
            if self._prom is None:
                self._prom = status.load_prometheus()
            return status.metrics(self._prom, status.merge(self._snapshots()))
        return status.NOT_FOUND


# ---- in a worker ---------------------------------------------------------------------------
def run_worker(
    server: Server, listeners: list[list[Listener]], control: socket.socket, foreign: list[socket.socket]
) -> int:
    """In a forked worker: serve ``listeners`` (one list per service) until told to stop."""
    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS | {signal.SIGCHLD})
    signal.set_wakeup_fd(-1)
    # a terminal's Ctrl-C reaches the parent only; it forwards one signal (not two)
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    for sig in (*HANDLED_SIGNALS, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    mine = {id(lst) for group in listeners for lst in group}
    for service in server.services:
        for lst in service.listeners:
            if id(lst) not in mine and lst.endpoint.path is None:
                lst.sock.close()
    for service, group in zip(server.services, listeners, strict=True):
        service.listeners = group
    for sock in foreign:
        sock.close()
    if server.status is not None:
        server.status.sock = None  # the parent serves the status port
    server.status = None
    server.pidfile = None
    os.environ.pop("NOTIFY_SOCKET", None)  # the parent speaks to systemd

    def ready(_server: Server) -> None:
        serve_control(server, control)
        control.sendall(b"ready\n")

    server.on_ready = ready
    return server.serve()


def serve_control(server: Server, sock: socket.socket) -> None:
    """In a worker: answer the parent's ``stats`` requests with a snapshot line."""
    import asyncio

    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    buffer = bytearray()

    def readable() -> None:
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the parent is gone: nobody supervises this worker any more
            loop.remove_reader(sock.fileno())
            log.ui(3, "Worker: the supervising process is gone; stopping")
            server.request_stop()
            return
        buffer.extend(data)
        while b"\n" in buffer:
            line, _, rest = bytes(buffer).partition(b"\n")
            buffer[:] = rest
            if line == b"stats":
                payload = json.dumps(server.snapshot(), separators=(",", ":")).encode() + b"\n"
                with contextlib.suppress(OSError):
                    sock.setblocking(True)
                    sock.sendall(payload)
                    sock.setblocking(False)

    loop.add_reader(sock.fileno(), readable)
