"""The process: configuration to services, the event loop, signals, reload, exit code."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import platform
import signal
import socket
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tunnel import STUNNEL_COMPAT_VERSION, __version__, conf, rules, systemd
from tunnel.addr import Endpoint
from tunnel.certwatch import CertWatcher, record_not_after
from tunnel.envconf import EnvConfig
from tunnel.errors import CONFIG_FAILURE, STARTUP_FAILURE, ConfigError, Problem, StartupError
from tunnel.listener import BUDGET, Listener
from tunnel.logs import log
from tunnel.metrics import STATS
from tunnel.service import Service
from tunnel.settings import ServiceSettings, Settings
from tunnel.tls import TlsConfigError
from tunnel.tls import build as build_tls
from tunnel.values import gid_of, uid_of

if TYPE_CHECKING:
    from tunnel.health import StatusServer


@dataclass
class Ops:
    """How the process is operated, beyond stunnel.conf: flags of `pytunnel run`, or
    PYTUNNEL_* variables for stunnel's command line (`pytunnel CONFIG`)."""

    drain_timeout: float = 5.0
    pre_drain_delay: float = 0.0
    status: str | None = None  # HOST:PORT of /livez /readyz /metrics
    cert_reload_interval: float = 10.0  # 0 turns the certificate watcher off
    log_format: str = "text"
    workers: str | None = None  # N or auto; None: the config's `workers`, else 1

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Ops:
        """For `pytunnel CONFIG`: the same settings from PYTUNNEL_* variables.  ValueError names one."""
        env = dict(os.environ) if env is None else env
        ops = cls()
        for var, attr in (
            ("PYTUNNEL_DRAIN_TIMEOUT", "drain_timeout"),
            ("PYTUNNEL_PRE_DRAIN_DELAY", "pre_drain_delay"),
            ("PYTUNNEL_CERT_RELOAD_INTERVAL", "cert_reload_interval"),
        ):
            text = env.get(var)
            if text:
                try:
                    value = float(text)
                    if value < 0 or value != value:
                        raise ValueError
                except ValueError:
                    raise ValueError(f"{var}={text!r}: expected a number of seconds >= 0") from None
                setattr(ops, attr, value)
        if env.get("PYTUNNEL_STATUS"):
            ops.status = env["PYTUNNEL_STATUS"]
        if env.get("PYTUNNEL_WORKERS"):
            from tunnel.workers import worker_count

            try:
                worker_count(env["PYTUNNEL_WORKERS"])
            except ValueError as exc:
                raise ValueError(f"PYTUNNEL_WORKERS: {exc}") from None
            ops.workers = env["PYTUNNEL_WORKERS"]
        fmt = env.get("PYTUNNEL_LOG_FORMAT")
        if fmt:
            if fmt not in ("text", "json"):
                raise ValueError(f"PYTUNNEL_LOG_FORMAT={fmt!r}: expected text or json")
            ops.log_format = fmt
        return ops


HANDLED_SIGNALS = {
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
}


def banner() -> list[str]:
    machine = platform.machine() or "unknown"
    system = platform.system().lower() or "unknown"
    ver = ssl.OPENSSL_VERSION.removeprefix("OpenSSL ")
    return [
        f"stunnel {STUNNEL_COMPAT_VERSION} (pytunnel {__version__}) on {machine}-{system} platform",
        f"Compiled/running with OpenSSL {ver}",
        "Threading:ASYNCIO Sockets:UVLOOP,IPv6 TLS:"
        + ("PSK,SNI" if hasattr(ssl.SSLContext, "set_psk_client_callback") else "SNI"),
    ]


@dataclass
class Source:
    """Where the configuration comes from: a path, bytes read once from ``-fd N``, or
    the environment (``envconf``)."""

    path: str
    data: bytes | None = None
    env: EnvConfig | None = None

    def load(self) -> Settings:
        if self.env is not None:
            return self.env.load()
        if self.data is not None:
            return conf.load_bytes(self.data, self.path)
        return conf.load(os.path.abspath(self.path))

    def text(self) -> str:
        """The effective stunnel.conf (`--print-config`)."""
        if self.env is not None:
            return self.env.text
        if self.data is not None:
            return self.data.decode("utf-8", "replace")
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            return fh.read()


def build_services(settings: Settings, secure: bool, generation: int = 0) -> list[Service]:
    """TLS contexts for every service (once per load); raises ConfigError."""
    problems: list[Problem] = []
    tls_of: dict[str, object] = {}
    for svc in settings.services:
        rule = rules.names_need_verify(svc, secure)
        if rule is not None:
            problems.append(rule)
            continue
        try:
            tls_of[svc.name] = build_tls(svc, secure, generation)
            if svc.cert:  # stunnel's lines: "HUP, then grep" confirms a rotation
                log.ui(6, f"Initializing service [{svc.name}]")
                log.ui(6, f"Certificate loaded from file: {svc.cert}")
                log.ui(6, f"Private key loaded from file: {svc.key or svc.cert}")
        except TlsConfigError as exc:
            file, line, text = svc.locations.get(exc.option, (settings.source, 0, ""))
            problems.append(
                Problem(
                    f"Service [{svc.name}]: {exc}",
                    file,
                    line or None,
                    text or None,
                    "Failed to initialize TLS context",
                )
            )
    if problems:
        raise ConfigError(problems)
    secondaries: dict[str, list[ServiceSettings]] = {}
    for svc in settings.services:
        if not svc.client and svc.sni and ":" in svc.sni:
            secondaries.setdefault(svc.sni.split(":", 1)[0], []).append(svc)
    made: dict[str, Service] = {}
    for svc in settings.services:
        if svc.name in {s.name for group in secondaries.values() for s in group}:
            made[svc.name] = Service(svc, tls_of[svc.name], secure)  # type: ignore[arg-type]
    out: list[Service] = []
    for svc in settings.services:
        if svc.name in made:
            continue
        subs = [made[s.name] for s in secondaries.get(svc.name, [])]
        out.append(Service(svc, tls_of[svc.name], secure, subs))  # type: ignore[arg-type]
    for service in out + list(made.values()):
        service.set_env = list(settings.globals.setEnv)
        service.foreground = settings.globals.foreground == "yes"
    return out


PROTOCOL_OPTIONS = (
    "protocolAuthentication",
    "protocolHost",
    "protocolUsername",
    "protocolPassword",
    "protocolHeader",
)


def warn_services(services: list[Service], secure: bool) -> None:
    for service in services:
        svc = service.settings
        pol = service.tls.policy
        if svc.client and not (pol.verify_chain or pol.verify_peer or svc.PSKsecrets):
            log.ui(4, f"Service [{svc.name}] needs authentication to prevent MITM attacks")
            if secure:
                log.ui(
                    4, f"Service [{svc.name}]: upstream certificate verification is OFF (verifyChain = no)"
                )
        if svc.client:
            for ep in svc.accept:
                if ep.path is None and not _is_loopback(ep.host):
                    log.ui(
                        4,
                        f"Service [{svc.name}]: plaintext listener {ep.display()} is not on loopback; "
                        "anyone who can reach it can use the tunnel (use accept = 127.0.0.1:PORT)",
                    )
        if svc.cert:
            _warn_cert(svc.name, svc.cert)
            _warn_key_mode(svc.key or svc.cert)
        if (svc.OCSP or svc.OCSPaia) and not pol.verify_chain:
            log.ui(4, f"Service [{svc.name}]: OCSP has no effect without verifyChain = yes")
        elif svc.OCSPflag:
            from tunnel import ocsp

            for note in ocsp.flag_notes(svc.OCSPflag):
                log.ui(4 if "forged" in note else 5, f"Service [{svc.name}]: {note}")
        if svc.PSKsecrets:
            _warn_key_mode(svc.PSKsecrets)
        if svc.PSKidentity and not (svc.client and svc.PSKsecrets):
            why = "in server mode (the client chooses)" if not svc.client else "without PSKsecrets"
            log.ui(4, f"Service [{svc.name}]: PSKidentity has no effect {why}")
        if not svc.protocol:
            idle = [n for n in PROTOCOL_OPTIONS if getattr(svc, n)]
            if idle:
                log.ui(
                    4,
                    f"Service [{svc.name}]: {', '.join(idle)} {'has' if len(idle) == 1 else 'have'} no effect without protocol",
                )
        elif svc.protocol.lower() == "smtp" and (svc.protocolAuthentication or "").lower() == "basic":
            log.ui(
                4,
                f"Service [{svc.name}]: protocolAuthentication = basic is not an SMTP method; "
                "plain is used, as stunnel does",
            )
        if svc.retry and not (svc.exec and svc.connect):
            log.ui(4, f"Service [{svc.name}]: retry has no effect without exec and connect")
        if svc.stack != 65536:
            log.ui(4, f"Service [{svc.name}]: stack has no effect (pytunnel runs no thread per connection)")


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "0.0.0.0").is_loopback  # noqa: S104
    except ValueError:
        return False


def _warn_key_mode(path: str) -> None:
    """stunnel's warning (same text, same rule) for a private key that others may read."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & 0o007:
        log.ui(4, f"Insecure file permissions on {path}")


def _record_certs(services: list[Service]) -> None:
    STATS.cert_not_after.clear()
    for service in services:
        for s in (service, *service.secondaries):
            record_not_after(s.name, s.settings.cert)


def _warn_cert(name: str, path: str) -> None:
    """`check` and start-up say when a service's own certificate is expired or about to."""
    import datetime

    from cryptography import x509

    try:
        with open(path, "rb") as fh:
            data = fh.read()
        certs = x509.load_pem_x509_certificates(data) if b"-----BEGIN CERT" in data else []
    except (OSError, ValueError):
        return
    if not certs:
        return
    leaf = certs[0]
    now = datetime.datetime.now(datetime.UTC)
    if leaf.not_valid_after_utc < now:
        log.ui(4, f"Service [{name}]: certificate {path} expired on {leaf.not_valid_after_utc:%Y-%m-%d}")
    elif leaf.not_valid_after_utc - now < datetime.timedelta(days=14):
        log.ui(4, f"Service [{name}]: certificate {path} expires on {leaf.not_valid_after_utc:%Y-%m-%d}")
    if leaf.not_valid_before_utc > now:
        log.ui(
            4,
            f"Service [{name}]: certificate {path} is not valid before {leaf.not_valid_before_utc:%Y-%m-%d}",
        )


def _seed(settings: Settings) -> None:
    g = settings.globals
    if not g.RNDfile or g.RNDbytes == 0:
        return
    try:
        with open(g.RNDfile, "rb") as fh:
            data = fh.read(g.RNDbytes)
    except OSError as exc:
        log.ui(4, f"Cannot read RNDfile {g.RNDfile}: {exc.strerror}")
        return
    ssl.RAND_add(data, len(data))
    log.ui(7, f"Seeded PRNG with {len(data)} byte(s) from {g.RNDfile}")
    if g.RNDoverwrite and os.path.isfile(g.RNDfile):
        with contextlib.suppress(OSError), open(g.RNDfile, "wb") as fh:
            fh.write(ssl.RAND_bytes(g.RNDbytes))


def _ids(settings: Settings) -> tuple[int | None, int | None]:
    """setuid/setgid as numbers, looked up before chroot (the jail has no /etc/passwd)."""
    user, group = settings.defaults.setuid, settings.defaults.setgid
    return (uid_of(user) if user else None), (gid_of(group) if group else None)


def _drop_privileges(ids: tuple[int | None, int | None]) -> None:
    uid, gid = ids
    if gid is not None:
        os.setgroups([gid])
        os.setgid(gid)
    if uid is not None:
        if gid is None:
            os.setgroups([])
        os.setuid(uid)


def _daemonize() -> None:
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def tune_malloc() -> None:
    """Keep relay-sized buffers on glibc's heap.

    Every chunk read from a socket or a MemoryBIO is a fresh ``bytes`` of up to 256 KiB.  By
    default glibc serves those with mmap/munmap and trims the heap eagerly, so each chunk costs
    page faults: measured with bench/run.py, CPU per GiB fell from 1.5-1.7x stunnel's to
    1.0-1.1x with these two settings.  Environment variables of the same names still win.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        mallopt(m_mmap_threshold, 1 << 20)
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:
        mallopt(m_trim_threshold, 16 << 20)


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux/macOS
        return asyncio.new_event_loop()


class Runtime:
    def __init__(
        self,
        source: Source,
        secure: bool,
        ops: Ops | None = None,
        stop_trigger: Callable[[Runtime], None] | None = None,
    ) -> None:
        self.source = source
        self.secure = secure
        self.ops = ops or Ops()
        self.drain_timeout = self.ops.drain_timeout
        self.draining = False
        self.status: StatusServer | None = None
        self.watcher: CertWatcher | None = None
        self.services: list[Service] = []
        self.retired: list[Service] = []  # replaced by a reload; their connections go on
        self.settings: Settings | None = None
        self.generation = 0
        self.stop_event: asyncio.Event | None = None
        self.stopping = 0
        self.stop_trigger = stop_trigger
        self.pidfile: str | None = None
        self.ready = False
        self._resolved = False
        self.workers = 1
        self.worker_control: socket.socket | None = None

    # ---- configuration --------------------------------------------------------------
    def configure(self, apply_log: bool = True) -> int:
        """Read and check everything; bind nothing.  Returns 0 or an exit code."""
        log.json = self.ops.log_format == "json"
        for line in banner():
            log.ui(5, line)
        log.ui(5, f"Reading configuration from file {self.source.path}")
        try:
            settings = self.source.load()
            log.ui(
                5,
                "UTF-8 byte order mark detected"
                if _has_bom(self.source)
                else "UTF-8 byte order mark not detected",
            )
            log.ui(5, "FIPS mode disabled")
            try:
                services = build_services(settings, self.secure)
            except ConfigError as exc:
                if self.source.env is not None:  # name the variable, not a generated line
                    raise ConfigError([self.source.env.rename(p) for p in exc.problems]) from None
                raise
        except ConfigError as exc:
            for problem in exc.problems:
                log.ui(3, problem.render())
            log.ui(3, "Configuration failed")
            log.flush_early()
            return CONFIG_FAILURE
        self.settings = settings
        self.services = services
        g = settings.globals
        if not apply_log:
            warn_services(services, self.secure)
            return 0
        opened = log.configure(
            level=settings.log_level,
            foreground=g.foreground,
            output=g.output,
            overwrite=g.log == "overwrite",
            use_syslog=g.syslog,
            ident=g.service,
            facility=settings.defaults.debug[0],
            root=g.chroot,
        )
        if not opened:
            log.ui(3, "Configuration failed")
            return CONFIG_FAILURE
        warn_services(services, self.secure)
        _record_certs(services)
        log.ui(5, "Configuration successful")
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
        if self.ops.status and not failed:
            from tunnel.health import StatusServer

            self.status = StatusServer(self, self.ops.status)
            try:
                self.status.bind()
            except OSError as exc:
                log.ui(3, f"Binding the status server to {self.ops.status}: {exc.strerror} ({exc.errno})")
                failed = True
        return STARTUP_FAILURE if failed else 0

    # ---- main ------------------------------------------------------------------------
    def run(self) -> int:
        code = self.configure()
        if code:
            return code
        assert self.settings is not None
        if self.settings.inetd:
            return self._run_inetd()
        g = self.settings.globals
        from tunnel.workers import worker_count

        try:
            self.workers = worker_count(self.ops.workers or g.workers)
        except ValueError as exc:
            log.ui(3, str(exc))
            log.ui(3, "Configuration failed")
            return CONFIG_FAILURE
        # No window in which a signal kills us with its default action: hold them until
        # the loop's handlers are installed (stunnel has such a window; we do not).
        signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        code = self.bind()
        if code:
            self._close_all()
            return code
        _seed(self.settings)
        if g.foreground == "no" and os.getpid() == 1:
            # a container's PID 1 that forks away ends the container: stay, and say so
            log.ui(4, "Running as PID 1: staying in the foreground (foreground = no would end the container)")
        elif g.foreground == "no":
            log.to_stderr = False
            _daemonize()
        tune_malloc()
        loop = new_loop()
        if g.chroot or self.settings.defaults.setuid or self.settings.defaults.setgid:
            # after chroot (or setuid, when Python's files are not world-readable) no module
            # can be imported: load now what connections, reloads and /metrics will need
            self._preload()
        if g.chroot or self.workers > 1:  # the jail has no /etc/hosts; workers inherit the answers
            try:
                loop.run_until_complete(self._resolve())
            except StartupError as exc:
                log.ui(3, str(exc))
                self._close_all()
                loop.close()
                return STARTUP_FAILURE
        try:
            ids = _ids(self.settings)
            if g.chroot:
                os.chroot(g.chroot)
                os.chdir("/")
                log.entered_jail(*ids)
            _drop_privileges(ids)
        except (OSError, KeyError) as exc:
            log.ui(3, f"Start-up failed: {exc}")
            self._close_all()
            return STARTUP_FAILURE
        if g.pid:  # after setuid, as stunnel: the user that runs can remove it at the end
            try:
                # bytes, not text: inside a chroot no codec module can be imported any more
                fd = os.open(g.pid, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                try:
                    os.write(fd, b"%d\n" % os.getpid())
                finally:
                    os.close(fd)
            except OSError as exc:
                log.ui(3, f"Cannot create pid file {g.pid}")
                log.ui(3, f"create: {exc.strerror} ({exc.errno})")
                self._close_all()
                loop.close()
                return STARTUP_FAILURE
            self.pidfile = g.pid
        if os.getpid() == 1:
            log.ui(6, "Running as PID 1: installing explicit TERM/INT handlers")
        if self.workers > 1:
            return self._supervise(loop)
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(self._main())
        except StartupError as exc:
            log.ui(3, str(exc))
            return STARTUP_FAILURE
        finally:
            self._close_all()
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
            if self.pidfile:
                with contextlib.suppress(OSError):
                    os.unlink(self.pidfile)

    # ---- workers ----------------------------------------------------------------------
    def _supervise(self, loop: asyncio.AbstractEventLoop) -> int:
        from tunnel.workers import Supervisor

        loop.close()  # the parent runs no event loop; each worker makes its own
        try:
            sets = [[s.listeners for s in self.services]]
            for _ in range(self.workers - 1):
                sets.append([s.clone_listeners() for s in self.services])
        except OSError as exc:
            log.ui(3, f"Binding the workers' sockets: {exc.strerror} ({exc.errno})")
            self._close_all()
            return STARTUP_FAILURE
        log.ui(5, f"Starting {self.workers} workers")
        try:
            return Supervisor(self, self.workers, sets).run()
        finally:
            self._close_all()
            if self.pidfile:
                with contextlib.suppress(OSError):
                    os.unlink(self.pidfile)

    def run_worker(
        self, index: int, listeners: list[list[Any]], control: socket.socket, foreign: list[socket.socket]
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
        for service in self.services:
            for lst in service.listeners:
                if id(lst) not in mine and lst.endpoint.path is None:
                    lst.sock.close()
        for service, group in zip(self.services, listeners, strict=True):
            service.listeners = group
        for sock in foreign:
            sock.close()
        if self.status is not None:
            self.status.sock = None  # the parent serves the status port
        self.status = None
        self.pidfile = None
        os.environ.pop("NOTIFY_SOCKET", None)  # the parent speaks to systemd
        self.worker_control = control
        loop = new_loop()
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(self._main())
        except StartupError as exc:
            log.ui(3, str(exc))
            return STARTUP_FAILURE
        finally:
            for service in self.services:
                service.close_listeners()
            loop.close()

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

    def _preload(self) -> None:
        import difflib  # noqa: F401 - a reload's did-you-mean hints
        import encodings.idna  # noqa: F401 - getaddrinfo() of a host name needs it
        import grp  # noqa: F401
        import pwd  # noqa: F401

        import cryptography.hazmat.primitives.serialization.pkcs12  # noqa: F401
        import cryptography.x509  # noqa: F401

        if self.status is not None:
            self.status.preload()

    # ---- inetd mode -------------------------------------------------------------------
    def _run_inetd(self) -> int:
        """No [section]: serve the one connection inetd (or systemd Accept=yes) put on stdin/stdout."""
        assert self.settings is not None
        service = self.services[0]
        try:
            sock = socket.socket(fileno=os.dup(0))
            if sock.type != socket.SOCK_STREAM:
                raise OSError("not a stream socket")
            sock.getsockname()
        except OSError as exc:
            log.ui(3, f"inetd mode needs a connected stream socket on stdin: {exc}")
            return STARTUP_FAILURE
        # our copy is the connection now: stdin/stdout must not keep it open (the peer's EOF)
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.close(null)
        try:
            _drop_privileges(_ids(self.settings))
        except (OSError, KeyError) as exc:
            log.ui(3, f"Start-up failed: {exc}")
            return STARTUP_FAILURE
        log.ui(5, f"Service [{self.settings.globals.service}] started")
        loop = new_loop()
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

    def _close_all(self) -> None:
        for service in self.services:
            service.close_listeners()
        if self.status is not None:
            self.status.close()

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_exception_handler)
        self.stop_event = asyncio.Event()
        await self._resolve()
        BUDGET.configure()
        for service in self.services:
            await service.start()
        if self.status is not None:
            await self.status.start()
        if self.ops.cert_reload_interval > 0:
            self.watcher = CertWatcher(lambda: self.services, self.secure, self.ops.cert_reload_interval)
            self.watcher.start()
        self._install_signals(loop)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        log.ui(6, "Accepting new connections")
        self.ready = True
        systemd.ready(f"Accepting connections for {len(self.services)} service(s)")
        if self.worker_control is not None:
            from tunnel.workers import serve_control

            serve_control(self, self.worker_control)
            self.worker_control.sendall(b"ready\n")
        if self.stop_trigger is not None:
            self.stop_trigger(self)
        await self.stop_event.wait()
        return await self._shutdown()

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
        delay = self.ops.pre_drain_delay
        if delay > 0 and self.stopping < 2:
            log.ui(5, f"Not ready (/readyz 503); still accepting for {delay:g} seconds (pre-drain delay)")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._second_signal()
        self.ready = False
        if self.watcher is not None:
            self.watcher.stop()
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

    async def reload(self) -> None:
        if self.stopping:
            return
        log.ui(5, "Received SIGHUP: reloading the configuration")
        systemd.reloading()
        if self.source.data is not None:
            log.ui(4, "The configuration came from a file descriptor and cannot be re-read")
            systemd.ready("Reload impossible: the configuration came from a file descriptor")
            return
        log.ui(5, f"Reading configuration from file {self.source.path}")
        try:
            settings = self.source.load()
            self.generation += 1
            services = build_services(settings, self.secure, self.generation)
        except ConfigError as exc:
            for problem in exc.problems:
                log.ui(3, problem.render())
            log.ui(3, "Configuration failed")
            log.ui(3, "Failed to reload the configuration file")
            log.ui(5, "Keeping the old configuration: every service goes on as before")
            STATS.reloaded(False)
            systemd.ready("Reload failed; the old configuration stays in use")
            return
        # Listening sockets go by address, not by service name: a renamed service, or two
        # that swap ports, keep the sockets (no moment without a listener, no lost backlog).
        # Sockets no new service wants are closed before any new address is bound.
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
        self.services = services
        self.settings = settings
        self.retired = [s for s in self.retired if s.connections]
        g = settings.globals
        log.reconfigure(settings.log_level, g.output, g.syslog, g.service, settings.defaults.debug[0])
        warn_services(services, self.secure)
        STATS.reloaded(True)
        _record_certs(services)
        log.ui(5, "Configuration successful")
        systemd.ready(f"Configuration reloaded; {len(services)} service(s)")

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

    def all_services(self) -> list[Service]:
        return self.services + self.retired


def _has_bom(source: Source) -> bool:
    try:
        data = source.data
        if data is None:
            with open(source.path, "rb") as fh:
                data = fh.read(3)
    except OSError:
        return False
    return data.startswith(b"\xef\xbb\xbf")


def _exception_handler(loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
    exc = context.get("exception")
    if isinstance(exc, (ssl.SSLError, ConnectionError)):
        log.ui(7, f"{context.get('message')}: {exc}")
        return
    log.ui(3, f"Internal error: {context.get('message')}: {exc!r}")
    if log.enabled(7):
        loop.default_exception_handler(context)


def run_path(path: str, secure: bool, ops: Ops, fd: int | None = None) -> int:
    data = None
    if fd is not None:
        try:
            with os.fdopen(fd, "rb", closefd=False) as fh:
                data = fh.read()
        except OSError as exc:  # stunnel's words, then why
            sys.stderr.write(f"[!] Cannot open configuration file\n[!] -fd {fd}: {exc.strerror}\n")
            sys.stderr.write("[!] Configuration failed\n")
            return CONFIG_FAILURE
        path = f"FD={fd}"
    return run_source(Source(path, data), secure, ops)


def run_source(source: Source, secure: bool, ops: Ops) -> int:
    rt = Runtime(source, secure=secure, ops=ops)
    return rt.run()


def env_source() -> Source | int:
    """The env-only service, or CONFIG_FAILURE after printing why it cannot be built."""
    from tunnel import envconf

    try:
        return Source(envconf.SOURCE, env=envconf.build())
    except ConfigError as exc:
        for problem in exc.problems:
            sys.stderr.write(f"[!] {problem.render()}\n")
        sys.stderr.write("[!] Configuration failed\n")
        return CONFIG_FAILURE


def check_path(path: str, secure: bool) -> int:
    """`pytunnel check`: parse, validate, load every certificate/key/CA; bind nothing."""
    return check_source(Source(path), secure)


def check_source(source: Source, secure: bool) -> int:
    path = source.path
    rt = Runtime(source, secure=secure)
    log.early = True
    log.level = 5
    code = rt.configure(apply_log=False)
    log.flush_early()
    if code == 0:
        sys.stderr.write(f"{path}: configuration OK ({len(rt.services)} service(s))\n")
    return code
