"""The configuration of one run: where it comes from, how the process is operated, and the
services it describes (uvicorn's ``Config``: the command line builds one, the server runs it).

``Source`` says where stunnel.conf comes from (a path, bytes read once from ``-fd N``, the
environment); ``Ops`` holds what stunnel.conf cannot say (drain timeouts, the status
address, the certificate watcher, the log format, the workers).  ``OPS`` is the one parser
of those settings: ``pytunnel run``'s flags and their PYTUNNEL_* variables (click) and
``pytunnel CONFIG``'s PYTUNNEL_* variables (:meth:`Ops.from_env`) both go through it.
``Config.load`` reads and checks everything, builds every TLS context and ``Service``, and
binds nothing; ``check`` is ``pytunnel check``.

May import: settings, conf, envconf, tls, service (to build services), certwatch's
``record_not_after``, status's ``parse_status``, logs, metrics, errors.  Nothing above.
"""

from __future__ import annotations

import os
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunnel import STUNNEL_COMPAT_VERSION, __version__, conf, envconf, ossl, rules
from tunnel.certwatch import record_not_after
from tunnel.errors import CONFIG_FAILURE, STARTUP_FAILURE, ConfigError, Problem, Severity
from tunnel.logs import log
from tunnel.metrics import STATS
from tunnel.service import Service
from tunnel.settings import ServiceSettings, Settings
from tunnel.startlines import service_lines
from tunnel.status import parse_status
from tunnel.tls import TlsConfig, TlsConfigError
from tunnel.tls import build as build_tls


def banner() -> list[str]:
    uname = os.uname()  # what platform.machine() and .system() return on POSIX, without platform
    machine = uname.machine or "unknown"
    system = uname.sysname.lower() or "unknown"
    ver = ssl.OPENSSL_VERSION.removeprefix("OpenSSL ")
    return [
        f"stunnel {STUNNEL_COMPAT_VERSION} (pytunnel {__version__}) on {machine}-{system} platform",
        f"Compiled/running with OpenSSL {ver}",
        "Threading:ASYNCIO Sockets:UVLOOP,IPv6 TLS:"
        + ("PSK,SNI" if hasattr(ssl.SSLContext, "set_psk_client_callback") else "SNI"),
    ]


# ---- Ops: how the process is operated, and the one parser of its settings ------------------
def worker_count(value: str | int | None) -> int:
    """``N`` or ``auto`` (the CPUs this process may run on).  ValueError otherwise."""
    if value is None or value == "":
        return 1
    if isinstance(value, int):
        n = value
    elif str(value).strip().lower() == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    else:
        text = str(value).strip()
        if not text.isdigit():
            raise ValueError(f"workers = {value!r}: expected a number of processes or auto")
        n = int(text)
    if not 1 <= n <= 256:
        raise ValueError(f"workers = {n}: expected 1 to 256")
    return n


def _seconds(text: str) -> float:
    try:
        value = float(text)
        if value < 0 or value != value:
            raise ValueError
    except ValueError:
        raise ValueError("expected a number of seconds >= 0") from None
    return value


def _status(text: str) -> str | None:
    if not text:
        return None
    parse_status(text)
    return text


def _workers(text: str) -> str | None:
    if not text:
        return None
    worker_count(text)
    return text


def _log_format(text: str) -> str:
    if text not in ("text", "json"):
        raise ValueError("expected text or json")
    return text


@dataclass(frozen=True)
class OpsVar:
    """One ``Ops`` setting: its field, its variables and its parser."""

    attr: str
    envvars: tuple[str, ...]  # `pytunnel CONFIG` reads the first; `pytunnel run` reads each
    parse: Callable[[str], Any]  # the value, or ValueError saying what is expected
    names_value: bool = False  # the parser's message quotes the value itself

    def error(self, var: str, text: str, why: str) -> str:
        return f"{var}: {why}" if self.names_value else f"{var}={text!r}: {why}"


OPS = {
    v.attr: v
    for v in (
        OpsVar("drain_timeout", ("PYTUNNEL_DRAIN_TIMEOUT", "PYTUNNEL_RUN_DRAIN_TIMEOUT"), _seconds),
        OpsVar("pre_drain_delay", ("PYTUNNEL_PRE_DRAIN_DELAY",), _seconds),
        OpsVar("cert_reload_interval", ("PYTUNNEL_CERT_RELOAD_INTERVAL",), _seconds),
        OpsVar("status", ("PYTUNNEL_STATUS",), _status, names_value=True),
        OpsVar("workers", ("PYTUNNEL_WORKERS",), _workers, names_value=True),
        OpsVar("log_format", ("PYTUNNEL_LOG_FORMAT",), _log_format),
    )
}


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
        for var in OPS.values():
            text = env.get(var.envvars[0])
            if text:
                try:
                    setattr(ops, var.attr, var.parse(text))
                except ValueError as exc:
                    raise ValueError(var.error(var.envvars[0], text, str(exc))) from None
        return ops


# ---- Source: where stunnel.conf comes from ---------------------------------------------------
@dataclass
class Source:
    """Where the configuration comes from: a path, bytes read once from ``-fd N``, or
    the environment (``envconf``)."""

    path: str
    data: bytes | None = None
    env: envconf.EnvConfig | None = None

    def load(self) -> Settings:
        if self.env is not None:
            return self.env.load()
        if self.data is not None:
            return conf.load_bytes(self.data, self.path)
        return conf.load(os.path.abspath(self.path))

    def raw(self) -> conf.RawConfig:
        """The configuration read, not yet validated (``pytunnel check`` validates it twice)."""
        if self.env is not None:
            return conf.read_bytes(self.env.text.encode(), envconf.SOURCE)
        if self.data is not None:
            return conf.read_bytes(self.data, self.path)
        return conf.read(os.path.abspath(self.path))

    def text(self) -> str:
        """The effective stunnel.conf (`--print-config`)."""
        if self.env is not None:
            return self.env.text
        if self.data is not None:
            return self.data.decode("utf-8", "replace")
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            return fh.read()


def fd_source(fd: int) -> Source | int:
    """``-fd N``: the configuration read once from a descriptor, or CONFIG_FAILURE after
    printing why it cannot be read."""
    try:
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read()
    except OSError as exc:  # stunnel's words, then why
        sys.stderr.write(f"[!] Cannot open configuration file\n[!] -fd {fd}: {exc.strerror}\n")
        sys.stderr.write("[!] Configuration failed\n")
        return CONFIG_FAILURE
    return Source(f"FD={fd}", data)


def env_source() -> Source | int:
    """The env-only service, or CONFIG_FAILURE after printing why it cannot be built."""
    try:
        return Source(envconf.SOURCE, env=envconf.build())
    except ConfigError as exc:
        for problem in exc.problems:
            sys.stderr.write(f"[!] {problem.render()}\n")
        sys.stderr.write("[!] Configuration failed\n")
        return CONFIG_FAILURE


def _has_bom(source: Source) -> bool:
    try:
        data = source.data
        if data is None:
            with open(source.path, "rb") as fh:
                data = fh.read(3)
    except OSError:
        return False
    return data.startswith(b"\xef\xbb\xbf")


# ---- services built from settings -------------------------------------------------------------
def build_services(settings: Settings, secure: bool, generation: int = 0) -> list[Service]:
    """TLS contexts for every service (once per load); raises ConfigError."""
    problems: list[Problem] = []
    tls_of: dict[str, TlsConfig] = {}
    # ACMEdirectory: the service's cert is the stored ACME certificate (tunnel/acme.py)
    services = list(settings.services)
    if any(s.ACMEdirectory for s in services):
        from tunnel import acmeserve

        services = [acmeserve.as_built(s) if s.ACMEdirectory else s for s in services]
    for svc in services:
        rule = rules.names_need_verify(svc, secure)
        if rule is not None:
            problems.append(rule)
            continue
        try:
            tls = tls_of[svc.name] = build_tls(svc, secure, generation)
            for level, text in service_lines(svc, tls):  # stunnel's lines (HUP, then grep)
                log.ui(level, text)
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
    for svc in services:
        if not svc.client and svc.sni and ":" in svc.sni:
            secondaries.setdefault(svc.sni.split(":", 1)[0], []).append(svc)
    made: dict[str, Service] = {}
    for svc in services:
        if svc.name in {s.name for group in secondaries.values() for s in group}:
            made[svc.name] = Service(svc, tls_of[svc.name], secure)
    out: list[Service] = []
    for svc in services:
        if svc.name in made:
            continue
        subs = [made[s.name] for s in secondaries.get(svc.name, [])]
        try:
            out.append(Service(svc, tls_of[svc.name], secure, subs))
        except ossl.Unavailable as exc:  # the SNI switch cannot set a secondary's verification
            first = subs[0].settings
            file, line, text = first.locations.get("sni", (settings.source, 0, ""))
            problems.append(
                Problem(
                    f"Service [{first.name}]: sni: not available with this Python: {exc}",
                    file,
                    line or None,
                    text or None,
                )
            )
    if problems:
        raise ConfigError(problems)
    for service in out + list(made.values()):
        service.set_env = list(settings.globals.setEnv)
        service.foreground = settings.globals.foreground == "yes"
    return out


def record_certs(services: list[Service]) -> None:
    """``pytunnel_cert_not_after_seconds`` for every service's own certificate, afresh."""
    STATS.cert_not_after.clear()
    for service in services:
        for s in (service, *service.secondaries):
            record_not_after(s.name, s.settings.cert)


def warn_services(services: list[Service], secure: bool) -> None:
    """The start-up warnings (rules.START_RULES) of every built service, logged."""
    for service in services:
        pol = service.tls.policy
        seen = rules.Started(service.settings, pol.verify_chain, pol.verify_peer, secure)
        for problem in rules.start_warnings(seen):
            log.ui(5 if problem.severity is Severity.NOTICE else 4, problem.message)


# ---- Config: one run's configuration, loaded and checked ------------------------------------------
class Config:
    """Everything one run needs: ``source``, ``secure`` (``pytunnel run``'s defaults or
    stunnel's), ``ops``; after :meth:`load`, the ``settings`` and the ``services``."""

    def __init__(self, source: Source, secure: bool, ops: Ops | None = None) -> None:
        self.source = source
        self.secure = secure
        self.ops = ops or Ops()
        self.settings: Settings | None = None
        self.services: list[Service] = []

    def load(self, apply_log: bool = True) -> int:
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
            if apply_log and any(s.ACMEdirectory for s in settings.services):
                from tunnel import acmeserve  # starting, not checking: the first certificates

                failed = acmeserve.first_certificates(settings.services)
                if failed is not None:
                    log.ui(3, failed)
                    log.flush_early()
                    return STARTUP_FAILURE
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
        if not apply_log:
            warn_services(services, self.secure)
            return 0
        g = settings.globals
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
        record_certs(services)
        log.ui(5, "Configuration successful")
        return 0

    def check(self) -> int:
        """`pytunnel check`: parse, validate, load every certificate/key/CA; bind nothing."""
        log.early = True
        log.level = 5
        code = self.load(apply_log=False)
        log.flush_early()
        from tunnel import crosscheck  # pydantic: `pytunnel check` only, never the run path

        differs = crosscheck.disagreement(self.source.raw)
        if differs is not None:
            sys.stderr.write(f"pytunnel bug: the two validations of this configuration differ ({differs})\n")
            return STARTUP_FAILURE
        if code == 0:
            sys.stderr.write(f"{self.source.path}: configuration OK ({len(self.services)} service(s))\n")
        return code

    def worker_count(self) -> int:
        """``--workers`` / PYTUNNEL_WORKERS, else the config's ``workers``, else 1.  ValueError."""
        assert self.settings is not None
        return worker_count(self.ops.workers or self.settings.globals.workers)
