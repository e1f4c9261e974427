"""The server: bind, serve, signals, drain, and reload with listener hand-over.

A ``Server`` runs one loaded :class:`~tunnel.config.Config` (uvicorn's ``Server``).

* :meth:`Server.prepare` does what comes before serving, in stunnel's order: hold the
  handled signals, bind every listener (and the status port), seed the RNG, daemonize,
  tune malloc, make the event loop, preload modules, resolve early, chroot, drop
  privileges, write the pid file.  The mechanics are in :mod:`tunnel.process`.
* :meth:`Server.serve` runs the event loop: start the services, the status server and
  the certificate watcher, install the signal handlers, say ready, wait for a stop,
  drain (:meth:`_shutdown`).  SIGHUP re-reads the configuration (:meth:`reload`): the new
  services take over the old ones' listening sockets by address, so no connection
  attempt meets a closed port, and the old services' connections go on.
* :meth:`Server.run` is both; :meth:`Server.run_inetd` serves the one connection inetd
  passed on stdin.

The pre-fork supervisor (:mod:`tunnel.workers`) sits above: it calls ``prepare`` in the
parent and ``serve`` in each forked child.  The server knows of workers only the count
it is given (``SO_REUSEPORT``, early resolution) and an ``on_ready`` callback.

May import: config, process, sandbox, status, certwatch, service, systemd, logs, metrics, errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from tunnel import process, sandbox, status, systemd
from tunnel.addr import Endpoint
from tunnel.certwatch import CertWatcher
from tunnel.config import Config, build_services, record_certs, warn_services
from tunnel.errors import STARTUP_FAILURE, ConfigError, Problem, StartupError
from tunnel.listener import BUDGET, Listener
from tunnel.logs import log
from tunnel.metrics import STATS
from tunnel.service import Service
from tunnel.settings import Settings
from tunnel.stdio import open_stdio

if TYPE_CHECKING:
    from tunnel.acmeserve import Renewals

HANDLED_SIGNALS = {
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
}


class Server:
    def __init__(
        self,
        config: Config,
        workers: int = 1,
        stop_trigger: Callable[[Server], None] | None = None,
    ) -> None:
        assert config.settings is not None, "Server(config) wants a loaded config"
        self.config = config
        self.settings: Settings = config.settings
        self.services: list[Service] = config.services
        self.retired: list[Service] = []  # replaced by a reload; their connections go on
        self.workers = workers  # processes serving the same sockets (SO_REUSEPORT when > 1)
        self.drain_timeout = config.ops.drain_timeout
        self.draining = False
        self.ready = False
        self.status: status.StatusServer | None = None
        self.watcher: CertWatcher | None = None
        self.renewals: Renewals | None = None  # ACMEdirectory services (tunnel/acmeserve.py)
        self.orders_acme = True  # this process renews (with --workers: worker 0 only)
        self.generation = 0
        self.stop_event: asyncio.Event | None = None
        self.stopping = 0
        self.stop_trigger = stop_trigger  # called once serving: tests stop without signals
        self.on_ready: Callable[[Server], None] | None = None  # a worker tells its parent
        self.pidfile: str | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._resolved = False
        self.sandbox: sandbox.Plan | None = None  # what the Landlock sandbox allows, if any

    def all_services(self) -> list[Service]:
        return self.services + self.retired

    def snapshot(self) -> status.Snapshot:
        """What /readyz and /metrics show (and a worker sends its supervisor)."""
        return status.snapshot(self.ready, self.draining, self.services, self.all_services())

    # ---- before serving ------------------------------------------------------------------
    def run(self) -> int:
        """One process: prepare, then serve until stopped.  Returns the exit code."""
        return self.prepare() or self.serve()

    def prepare(self) -> int:
        """Everything before the event loop runs, in stunnel's order.  Returns 0 or an
        exit code (after closing what was opened)."""
        # No window in which a signal kills us with its default action: hold them until
        # the loop's handlers are installed (stunnel has such a window; we do not).
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        code = self.bind()
        if code:
            self.close_all()
            return code
        g = self.settings.globals
        process.seed_rng(g.RNDfile, g.RNDbytes, g.RNDoverwrite)
        self._detach()
        process.tune_malloc()
        self.loop = process.new_loop()
        if g.chroot or self.settings.defaults.setuid or self.settings.defaults.setgid:
            # after chroot (or setuid, when Python's files are not world-readable) no module
            # can be imported: load now what connections, reloads and /metrics will need
            self._preload()
        code = self._resolve_early() or self._enter_jail() or self._write_pid_file()
        if code:
            return code
        self._enter_sandbox()
        if os.getpid() == 1:
            log.ui(6, "Running as PID 1: installing explicit TERM/INT handlers")
        return 0

    def bind(self) -> int:
        failed = False
        activation = systemd.Activation()
        if activation.sockets:
            activation.plan(
                [(s.name, ep.host, ep.port, ep.path) for s in self.services for ep in s.settings.accept]
            )
            for (name, host, port, path), sock in activation.by_order:
                wanted = path or f"{host or '*'}:{port}"
                log.ui(
                    4,
                    f"Service [{name}]: socket passed by systemd at fd {sock.fileno()} is bound to "
                    f"{systemd.sockname(sock)}, not {wanted}; used by order, as stunnel does",
                )
            if activation.sockets:
                log.ui(
                    3, f"Too many listening file descriptors received from systemd, got {activation.count}"
                )
                for extra in activation.leftovers():
                    log.ui(3, f"Socket passed by systemd matches no accept line: {extra}")
                return STARTUP_FAILURE
        for service in self.services:
            service.reuse_port = self.workers > 1
            errors = service.bind(activation)
            if service.settings.accept and not service.listeners:
                failed = True
            del errors
        address = self.config.ops.status
        if address and not failed:
            self.status = status.StatusServer(address, self.snapshot)
            try:
                self.status.bind()
            except OSError as exc:
                log.ui(3, f"Binding the status server to {address}: {exc.strerror} ({exc.errno})")
                failed = True
        return STARTUP_FAILURE if failed else 0

    def _detach(self) -> None:
        if self.settings.globals.foreground != "no":
            return
        if os.getpid() == 1:
            # a container's PID 1 that forks away ends the container: stay, and say so
            log.ui(4, "Running as PID 1: staying in the foreground (foreground = no would end the container)")
        else:
            log.to_stderr = False
            process.daemonize()

    def _preload(self) -> None:
        process.preload()
        if self.status is not None:
            self.status.preload()

    def _resolve_early(self) -> int:
        g = self.settings.globals
        if not (g.chroot or self.workers > 1):  # the jail has no /etc/hosts; workers inherit the answers
            return 0
        assert self.loop is not None
        try:
            self.loop.run_until_complete(self._resolve())
        except StartupError as exc:
            log.ui(3, str(exc))
            return self._abort()
        return 0

    def _enter_jail(self) -> int:
        g = self.settings.globals
        try:
            who = process.ids(self.settings.defaults.setuid, self.settings.defaults.setgid)
            if g.chroot:
                process.enter_jail(g.chroot, who)
            process.drop_privileges(who)
        except (OSError, KeyError) as exc:
            log.ui(3, f"Start-up failed: {exc}")
            return self._abort()
        return 0

    def _write_pid_file(self) -> int:
        path = self.settings.globals.pid
        if not path:
            log.ui(7, "No pid file being created")
            return 0
        try:  # after setuid, as stunnel: the user that runs can remove it at the end
            process.write_pid_file(path)
        except OSError as exc:
            log.ui(3, f"Cannot create pid file {path}")
            log.ui(3, f"create: {exc.strerror} ({exc.errno})")
            return self._abort()
        self.pidfile = path
        return 0

    def _enter_sandbox(self) -> None:
        """Last: Landlock binds this thread and the threads it starts later, so the worker
        threads of an early resolution are not used again (a fresh default executor)."""
        bound = {port for service in self.services for port in service.ports()}
        self.sandbox = sandbox.enter(self.settings, self.config.source.path, self.config.secure, bound)
        if self.sandbox is not None and self.loop is not None:
            self.loop.set_default_executor(ThreadPoolExecutor(thread_name_prefix="pytunnel"))

    def _abort(self) -> int:
        """Start-up failed after binding: close every socket and the loop."""
        self.close_all()
        if self.loop is not None:
            self.loop.close()
            self.loop = None
        return STARTUP_FAILURE

    async def _resolve(self) -> None:
        """stunnel resolves `connect` names when it starts (before chroot), not per connection.
        A name that does not resolve yet (DNS not up at boot) is logged and, as in stunnel,
        looked up again for each connection until it does: the service runs meanwhile."""
        if self._resolved:
            return
        self._resolved = True
        for service in self.services:
            for err in await service.resolve_all():
                log.ui(3, err)

    def close_all(self) -> None:
        """Close every listening socket and the status port (live connections go on)."""
        for service in self.services:
            service.close_listeners()
        if self.status is not None:
            self.status.close()

    # ---- serving -------------------------------------------------------------------------
    def serve(self) -> int:
        """Run the event loop until stopped and drained; then close everything."""
        loop = self.loop or process.new_loop()
        self.loop = None
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(self._main())
        except StartupError as exc:
            log.ui(3, str(exc))
            return STARTUP_FAILURE
        finally:
            self.close_all()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            process.remove_pid_file(self.pidfile)

    async def _main(self) -> int:
        await self._start()
        log.ui(6, "Accepting new connections")
        self.ready = True
        systemd.ready(f"Accepting connections for {len(self.services)} service(s)")
        if self.on_ready is not None:
            self.on_ready(self)
        if self.stop_trigger is not None:
            self.stop_trigger(self)
        assert self.stop_event is not None
        await self.stop_event.wait()
        return await self._shutdown()

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_exception_handler)
        self.stop_event = asyncio.Event()
        await self._resolve()
        BUDGET.configure()
        for service in self.services:
            await service.start()
        if self.status is not None:
            await self.status.start()
        interval = self.config.ops.cert_reload_interval
        if interval > 0:
            self.watcher = CertWatcher(lambda: self.services, self.config.secure, interval)
            self.watcher.start()
            log.ui(6, f"Certificate files checked for changes every {interval:g} s")
        else:
            log.ui(6, "Certificate files not watched (PYTUNNEL_CERT_RELOAD_INTERVAL = 0)")
        self._follow_acme()
        self._install_signals(loop)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)

    def _follow_acme(self) -> None:
        """ACME renewal tasks for the services now in use (at start and after each reload);
        renewed files reach every process through the certificate watcher."""
        acme_services = [s.settings for s in self.services if s.settings.ACMEdirectory]
        if not self.orders_acme or (self.renewals is None and not acme_services):
            return
        if self.renewals is None:
            from tunnel.acmeserve import Renewals

            self.renewals = Renewals()
        self.renewals.update(acme_services)

    async def _acme_before(self, settings: Settings) -> str | None:
        """The first certificate of an ACME service a reload brings (tunnel/acmeserve.py)."""
        if not any(s.ACMEdirectory for s in settings.services):
            return None
        from tunnel.acmeserve import before_reload

        live = {lst.endpoint: (s.tls.context, s.settings.alpn) for s in self.services for lst in s.listeners}
        return await before_reload(settings.services, self.orders_acme, live)

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            loop.add_signal_handler(sig, self.request_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))
        loop.add_signal_handler(signal.SIGUSR1, self._reopen_log)
        loop.add_signal_handler(signal.SIGUSR2, self._list_connections)

    def request_stop(self, sig: int = signal.SIGTERM) -> None:
        self.stopping += 1
        if self.stopping == 1:
            log.ui(5, f"Received signal {sig}; terminating")
            if self.stop_event is not None:
                self.stop_event.set()
        else:
            log.ui(5, "Second termination signal: closing every connection now")
            for service in self.all_services():
                service.abort_all()

    async def _shutdown(self) -> int:
        self.draining = True
        systemd.stopping("Draining connections")
        delay = self.config.ops.pre_drain_delay
        if delay > 0 and self.stopping < 2:
            log.ui(5, f"Not ready (/readyz 503); still accepting for {delay:g} seconds (pre-drain delay)")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._second_signal()
        self.ready = False
        if self.watcher is not None:
            self.watcher.stop()
        if self.renewals is not None:
            self.renewals.stop()
        queued = sum(await asyncio.gather(*(s.stop_accepting() for s in self.services)))
        log.ui(5, "Stopped accepting new connections")
        if queued:
            log.ui(6, f"Took {queued} connection(s) already queued by the kernel before closing")
        everyone = self.all_services()
        live = sum(len(s.connections) for s in everyone)
        if live and self.drain_timeout > 0 and self.stopping < 2:
            log.ui(5, f"Draining {live} connection(s) for up to {self.drain_timeout:g} seconds")
            results = await asyncio.gather(*(s.drain(self.drain_timeout) for s in everyone))
            if all(results):
                log.ui(5, "All connections finished")
            else:
                left = sum(len(s.connections) for s in everyone)
                log.ui(5, f"Drain deadline reached: closing {left} connection(s)")
        for service in everyone:
            service.abort_all()
        await asyncio.sleep(0)
        if self.status is not None:
            self.status.close()
        log.ui(5, "Terminated")
        return 0

    async def _second_signal(self) -> None:
        while self.stopping < 2:
            await asyncio.sleep(0.05)

    def _reopen_log(self) -> None:
        log.reopen()  # on failure: stunnel's "Cannot open log file", the old file goes on
        log.ui(5, "Log file reopened")

    def _list_connections(self) -> None:
        """SIGUSR2: stunnel logs the list at LOG0, so it shows at any debug level."""
        total = 0
        log.ui(0, "Active connections:")
        for service in self.all_services():
            for line in service.connection_list():
                total += 1
                log.ui(0, f"Active connection {total}: {line}")
        log.ui(0, f"Listed {total} active connection(s)")

    # ---- reload ----------------------------------------------------------------------------
    async def reload(self) -> None:
        if self.stopping:
            return
        log.ui(5, "Received SIGHUP: reloading the configuration")
        systemd.reloading()
        source = self.config.source
        if source.data is not None:
            log.ui(4, "The configuration came from a file descriptor and cannot be re-read")
            systemd.ready("Reload impossible: the configuration came from a file descriptor")
            return
        log.ui(5, f"Reading configuration from file {source.path}")
        try:
            settings = source.load()
            refused = sandbox.reload_problem(self.sandbox, settings, source.path)
            if refused is not None:
                raise ConfigError([Problem(refused)])
            refused = await self._acme_before(settings)
            if refused is not None:
                raise ConfigError([Problem(refused)])
            self.generation += 1
            services = build_services(settings, self.config.secure, self.generation)
        except ConfigError as exc:
            for problem in exc.problems:
                log.ui(3, problem.render())
            log.ui(3, "Configuration failed")
            log.ui(3, "Failed to reload the configuration file")
            log.ui(5, "Keeping the old configuration: every service goes on as before")
            STATS.reloaded(False)
            systemd.ready("Reload failed; the old configuration stays in use")
            return
        await self._hand_over(services)
        self.services = services
        self.settings = settings
        self.retired = [s for s in self.retired if s.connections]
        g = settings.globals
        log.reconfigure(settings.log_level, g.output, g.syslog, g.service, settings.defaults.debug[0])
        warn_services(services, self.config.secure)
        STATS.reloaded(True)
        record_certs(services)
        self._follow_acme()
        log.ui(5, "Configuration successful")
        systemd.ready(f"Configuration reloaded; {len(services)} service(s)")

    async def _hand_over(self, services: list[Service]) -> None:
        """Retire the services in use and start ``services`` in their place.

        Listening sockets go by address, not by service name: a renamed service, or two
        that swap ports, keep the sockets (no moment without a listener, no lost backlog).
        Sockets no new service wants are closed before any new address is bound."""
        pool: dict[Endpoint, list[Listener]] = {}
        for prev in self.services:
            for lst in prev.listeners:
                pool.setdefault(lst.endpoint, []).append(lst)
        handed: dict[str, list[Listener]] = {}
        for service in services:
            for ep in service.settings.accept:
                if pool.get(ep):
                    handed.setdefault(service.name, []).append(pool[ep].pop(0))
        kept = {id(lst) for lsts in handed.values() for lst in lsts}
        names = {s.name for s in services}
        for prev in self.services:
            prev.listeners = [lst for lst in prev.listeners if id(lst) not in kept]
            await prev.stop_accepting()  # serves what waits in the closing sockets' backlog
            self.retired.append(prev)
            if prev.name not in names:
                log.ui(5, f"Service [{prev.name}] removed; its live connections continue")
        for service in services:
            service.reuse_port = self.workers > 1
            mine = handed.get(service.name, [])
            service.adopt(mine)
            missing = [ep for ep in service.settings.accept if ep not in {lst.endpoint for lst in mine}]
            if missing and service.bind(endpoints=missing):
                self._rebind_later(service, missing)
            await service.start()
            for err in await service.resolve_all():
                log.ui(3, err)

    def _rebind_later(self, service: Service, endpoints: list[Endpoint]) -> None:
        """A reload moved ``accept`` to an address that is busy (the old owner of a port
        has not let go yet): try again every second, as stunnel retries its reload, until
        it binds, a later reload replaces the service, or the process stops."""

        def unbound(eps: list[Endpoint]) -> list[Endpoint]:
            have = {lst.endpoint for lst in service.listeners}
            return [ep for ep in eps if ep not in have]

        async def again() -> None:
            todo = unbound(endpoints)
            while todo and service in self.services and not self.stopping:
                await asyncio.sleep(1.0)
                if service not in self.services or self.stopping:
                    return
                service.bind(endpoints=todo, quiet=True)  # the first failure was logged
                await service.start()
                todo = unbound(todo)

        asyncio.get_running_loop().create_task(again())

    # ---- inetd mode ------------------------------------------------------------------------
    def run_inetd(self) -> int:
        """No [section]: serve the one connection on standard input/output -- a socket from
        inetd or systemd Accept=yes, or pipes, a file, /dev/null (tunnel/stdio.py).  The exit
        status is stunnel's: 0 once the connection was served, whatever became of it."""
        service = self.services[0]
        try:
            stdio = open_stdio()
        except OSError as exc:
            log.ui(3, f"inetd mode needs standard input and output: {exc}")
            return STARTUP_FAILURE
        sock = stdio.sock
        service.on_pipes = stdio.piped
        try:
            process.drop_privileges(process.ids(self.settings.defaults.setuid, self.settings.defaults.setgid))
        except (OSError, KeyError) as exc:
            log.ui(3, f"Start-up failed: {exc}")
            return STARTUP_FAILURE
        log.ui(7, f"Service [{self.settings.globals.service}] started")
        loop = process.new_loop()
        asyncio.set_event_loop(loop)

        async def serve() -> int:
            loop.set_exception_handler(_exception_handler)
            for err in await service.resolve_all():
                log.ui(3, err)
            sock.setblocking(False)
            await loop.connect_accepted_socket(service.factory, sock)
            await service.drain(float("inf"))
            await asyncio.sleep(0)
            return 0

        try:
            return loop.run_until_complete(serve())
        finally:
            loop.close()
            sock.close()
            stdio.finish()


def _exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
    exc = context.get("exception")
    if isinstance(exc, (ssl.SSLError, ConnectionError)):
        log.ui(7, f"{context.get('message')}: {exc}")
        return
    log.ui(3, f"Internal error: {context.get('message')}: {exc!r}")
    if log.enabled(7):
        loop.default_exception_handler(context)
