"""``sandbox = yes``: a Landlock sandbox the process puts itself in once it has started.

After everything is bound, loaded and dropped (chroot, setuid, pid file), the process gives
up every file and (on Landlock ABI 4 and newer) every TCP port its configuration does not
name.  Landlock is unprivileged, inherited by every child (``exec`` programs, ``--workers``)
and cannot be undone.  Three system calls through ctypes (no maintained PyPI binding covers
the network rules): ``landlock_create_ruleset``, ``landlock_add_rule``,
``landlock_restrict_self``, after ``prctl(PR_SET_NO_NEW_PRIVS)``.

What stays allowed (:func:`plan`, pure, so ``pytunnel check`` and the tests can show it):

* read: the directories of the configuration file and includes, of the certificates, keys,
  CA files and directories, CRLs and PSK secrets (directories, not files: a rotated
  certificate is a new file, and Landlock binds a rule to the inode it was given); the Python
  installation (``sys.path``, ``sys.prefix``); name resolution files; ``/dev/urandom``;
  ``/proc`` (the status server's process metrics); system libraries (for ``exec``);
* write: the ``output`` log's and the pid file's directories (reopen after rotation, remove
  at exit); ``/dev/null``; ``/dev/pts`` and ``/dev/ptmx`` with ``pty = yes``;
* execute: the ``exec`` programs and their ``#!`` interpreters, and the system library
  directories they load from;
* TCP (ABI >= 4): bind only the ``accept`` ports (and port 0 for ``local``); connect only to
  the ``connect``/``redirect`` ports, OCSP responders' ports (``OCSP``, and for stapling
  those a server certificate names when the sandbox starts), 113 for ``ident`` and 53
  for DNS over TCP.  A configuration whose targets are decided per connection
  (``transparent``, OCSPaia, a SOCKS or CONNECT server) leaves that kind of access unrestricted.

Imports settings and logs (and stapling, lazily, for a server certificate's responders).
"""

from __future__ import annotations

import ctypes
import os
import struct
import sys
from dataclasses import dataclass, field

from tunnel.logs import log
from tunnel.settings import ServiceSettings, Settings

SYS_CREATE, SYS_ADD_RULE, SYS_RESTRICT = 444, 445, 446  # the same on every Linux architecture
CREATE_VERSION = 1
RULE_PATH_BENEATH, RULE_NET_PORT = 1, 2
PR_SET_NO_NEW_PRIVS = 38

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR, MAKE_REG = 1 << 4, 1 << 5, 1 << 6, 1 << 7, 1 << 8
MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
BIND_TCP, CONNECT_TCP = 1 << 0, 1 << 1

READ = READ_FILE | READ_DIR
WRITE = WRITE_FILE | MAKE_REG | REMOVE_FILE | TRUNCATE | IOCTL_DEV
RESOLVER = ("/etc/hosts", "/etc/resolv.conf", "/etc/nsswitch.conf", "/etc/host.conf", "/etc/gai.conf")
SYSTEM_LIBS = ("/lib", "/lib64", "/usr/lib", "/usr/lib64", "/usr/local/lib", "/etc/ld.so.cache")
SYSTEM_FILES = ("/etc/services", "/etc/protocols", "/etc/localtime", "/usr/share/zoneinfo", "/etc/ssl")


def _fs_rights(abi: int) -> int:
    rights = (1 << 13) - 1
    if abi >= 2:
        rights |= REFER
    if abi >= 3:
        rights |= TRUNCATE
    if abi >= 5:
        rights |= IOCTL_DEV
    return rights


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def abi_version() -> int:
    """The kernel's Landlock ABI version; 0 when it offers none (or refuses: disabled)."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        value = int(_libc().syscall(SYS_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_VERSION)))
    except (OSError, AttributeError):
        return 0
    return max(value, 0)


def why_unavailable() -> str:
    err = ctypes.get_errno()
    if err == 38:  # ENOSYS
        return "this kernel was built without Landlock"
    if err == 95:  # EOPNOTSUPP
        return "Landlock is disabled at boot (lsm= does not list it)"
    return f"Landlock is not available ({os.strerror(err) if err else 'unknown reason'})"


@dataclass
class Plan:
    """What stays allowed: paths by right, and TCP ports (None: that kind not restricted)."""

    read: set[str] = field(default_factory=set)
    write: set[str] = field(default_factory=set)
    execute: set[str] = field(default_factory=set)
    bind: set[int] | None = field(default_factory=set)
    connect: set[int] | None = field(default_factory=set)

    def paths(self) -> dict[str, int]:
        """path -> rights, for paths that exist."""
        out: dict[str, int] = {}
        for paths, rights in ((self.read, READ), (self.write, READ | WRITE), (self.execute, READ | EXECUTE)):
            for path in paths:
                if os.path.exists(path):
                    out[path] = out.get(path, 0) | rights
        return out

    def outside(self, other: Plan) -> list[str]:
        """What ``other`` needs that this plan does not allow (a reload's new paths)."""
        missing: list[str] = []
        for mine, theirs in (
            (self.read, other.read),
            (self.write, other.write),
            (self.execute, other.execute),
        ):
            missing += sorted(p for p in theirs - mine if not any(_beneath(p, m) for m in mine))
        for mine_ports, their_ports, what in (
            (self.bind, other.bind, "bind"),
            (self.connect, other.connect, "connect"),
        ):
            if mine_ports is not None and (their_ports is None or their_ports - mine_ports):
                missing.append(f"TCP {what} port(s) {sorted((their_ports or set()) - mine_ports) or 'any'}")
        return missing


def _beneath(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _dir_of(path: str) -> str:
    return os.path.dirname(os.path.abspath(path)) or "/"


def _interpreter(program: str) -> str | None:
    """The ``#!`` interpreter of a script (which must be executable too)."""
    try:
        with open(program, "rb") as fh:
            first = fh.readline(256)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    import shlex  # only for exec: not at start-up

    words = shlex.split(first[2:].decode("utf-8", "replace"))
    return words[0] if words else None


def _service_files(svc: ServiceSettings) -> list[str]:
    files = [svc.cert, svc.key, svc.CAfile, svc.CRLfile, svc.PSKsecrets]
    return [f for f in files if f]


def _dynamic_targets(svc: ServiceSettings) -> bool:
    proto = (svc.protocol or "").lower()
    return (
        svc.transparent in ("destination", "both")
        or svc.OCSPaia
        or (not svc.client and proto in ("socks", "connect"))
    )


def _ports(svc: ServiceSettings, plan: Plan) -> None:
    from urllib.parse import urlsplit  # only with OCSP or ACME: not at start-up

    if plan.bind is not None:
        if svc.transparent in ("source", "both"):
            plan.bind = None  # bound to each client's own port
        else:
            plan.bind |= {ep.port for ep in svc.accept if ep.path is None and ep.port}
            if svc.local:
                plan.bind.add(0)
    if plan.connect is not None:
        if _dynamic_targets(svc):
            plan.connect = None
            return
        plan.connect |= {ep.port for ep in [*svc.connect, *svc.redirect] if ep.path is None}
        if svc.OCSP:
            url = urlsplit(svc.OCSP)
            plan.connect.add(url.port or (443 if url.scheme == "https" else 80))
        if svc.cert and not svc.client:  # OCSP stapling asks the certificate's AIA responders
            from tunnel import stapling

            plan.connect |= stapling.responder_ports(svc.cert)
        if svc.ident:
            plan.connect.add(113)
        if svc.ACMEdirectory:  # the ACME server (its URLs share the directory's port)
            url = urlsplit(svc.ACMEdirectory)
            plan.connect.add(url.port or (443 if url.scheme == "https" else 80))
        if svc.protocol and svc.client and svc.protocolHost:
            plan.connect |= {ep.port for ep in svc.connect if ep.path is None}


def plan(settings: Settings, source: str) -> Plan:
    """Everything a configuration needs (see the module's docstring)."""
    p = Plan()
    p.read |= {_dir_of(source), *RESOLVER, "/dev/urandom", "/dev/random", "/proc", *SYSTEM_FILES}
    p.read |= set(SYSTEM_LIBS)  # glibc loads its NSS modules at the first name lookup
    p.read |= {d for d in (*sys.path, sys.prefix, sys.base_prefix, sys.exec_prefix) if d and os.path.isdir(d)}
    p.write |= {"/dev/null"}
    g = settings.globals
    for path in (g.output, g.pid):
        if path:
            p.write.add(_dir_of(path))
    for svc in settings.services:
        for file, _line, _text in svc.locations.values():
            p.read.add(_dir_of(file))
        p.read |= {_dir_of(f) for f in _service_files(svc)}
        p.read |= {d for d in (svc.CApath, svc.CRLpath) if d}
        if svc.exec:
            p.execute.add(os.path.abspath(svc.exec))
            interp = _interpreter(svc.exec)
            if interp:
                p.execute.add(interp)
            p.execute |= set(SYSTEM_LIBS)
        if svc.pty:
            p.write |= {"/dev/ptmx", "/dev/pts", "/dev/tty"}
        if svc.include:
            p.read.add(svc.include)
        if svc.ACMEdirectory:  # ACME state (account key, certificates) and its trust
            from tunnel.acme import state_dir

            state = str(state_dir(svc))
            p.read.add(state)
            p.write.add(state)
            if svc.ACMECAfile:
                p.read.add(_dir_of(svc.ACMECAfile))
            if svc.ACMEhttp and p.bind is not None:
                p.bind.add(svc.ACMEhttp.port)
        _ports(svc, p)
    if p.connect is not None and p.connect:
        p.connect.add(53)  # DNS over TCP (a truncated UDP answer)
    return p


# ---- the system calls ---------------------------------------------------------------------
def _call(libc: ctypes.CDLL, number: int, *args: object) -> int:
    result = int(libc.syscall(number, *args))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def apply(p: Plan, abi: int) -> int:
    """Restrict this process (and its future children) to ``p``.  Returns the rule count.
    Raises OSError."""
    libc = _libc()
    fs = _fs_rights(abi)
    net = 0
    if abi >= 4:
        net = (BIND_TCP if p.bind is not None else 0) | (CONNECT_TCP if p.connect is not None else 0)
    attr = struct.pack("=QQ", fs, net) if abi >= 4 else struct.pack("=Q", fs)
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = _call(libc, SYS_CREATE, buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
    rules = 0
    try:
        for path, rights in sorted(p.paths().items()):
            if not os.path.isdir(path):
                rights &= READ_FILE | WRITE_FILE | EXECUTE | TRUNCATE | IOCTL_DEV  # file rights only
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                rule = ctypes.create_string_buffer(struct.pack("=Qi", rights & fs, fd), 12)
                _call(
                    libc,
                    SYS_ADD_RULE,
                    ctypes.c_int(ruleset),
                    ctypes.c_int(RULE_PATH_BENEATH),
                    rule,
                    ctypes.c_uint32(0),
                )
                rules += 1
            finally:
                os.close(fd)
        for ports, right in ((p.bind, BIND_TCP), (p.connect, CONNECT_TCP)):
            if net & right and ports is not None:
                for port in sorted(ports):
                    rule = ctypes.create_string_buffer(struct.pack("=QQ", right, port), 16)
                    _call(
                        libc,
                        SYS_ADD_RULE,
                        ctypes.c_int(ruleset),
                        ctypes.c_int(RULE_NET_PORT),
                        rule,
                        ctypes.c_uint32(0),
                    )
                    rules += 1
        if int(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"prctl(PR_SET_NO_NEW_PRIVS): {os.strerror(err)}")
        _call(libc, SYS_RESTRICT, ctypes.c_int(ruleset), ctypes.c_uint32(0))
    finally:
        os.close(ruleset)
    return rules


# ---- the process's view ------------------------------------------------------------------
def wanted(settings: Settings, secure: bool) -> bool | None:
    """``sandbox``: as written; unwritten, on under ``pytunnel run`` (``secure``), off under
    ``pytunnel CONFIG`` (drop-in behaviour).  None: on only if the kernel offers it."""
    value = settings.globals.sandbox
    if value is not None:
        return value
    return None if secure else False


def enter(settings: Settings, source: str, secure: bool, bound: set[int]) -> Plan | None:
    """Start-up: restrict the process as its configuration says, and log it.  Returns the plan
    in force (None: no sandbox).  Never fails start-up: a kernel without Landlock is a warning.
    ``bound``: the TCP ports actually bound (``accept = HOST:0``; workers bind them again)."""
    want = wanted(settings, secure)
    if want is False:
        log.ui(6, "Sandbox: off (sandbox = no)" if settings.globals.sandbox is False else "Sandbox: off")
        return None
    abi = abi_version()
    if abi <= 0:
        why = why_unavailable()
        log.ui(4 if want else 5, f"Sandbox: not available: {why}; running without one")
        return None
    p = plan(settings, source)
    if p.bind is not None:
        p.bind |= bound
    try:
        rules = apply(p, abi)
    except OSError as exc:
        log.ui(4, f"Sandbox: Landlock refused the rules ({exc.strerror}); running without one")
        return None
    log.ui(5, f"Sandbox: Landlock ABI {abi}, {rules} rules")
    if abi < 4:
        log.ui(6, "Sandbox: this kernel's Landlock (ABI < 4) cannot restrict TCP ports")
    return p


def reload_problem(current: Plan | None, settings: Settings, source: str) -> str | None:
    """A reload that needs what the sandbox set up at start-up does not allow: the line that
    says so (None: it fits)."""
    if current is None:
        return None
    missing = current.outside(plan(settings, source))
    if not missing:
        return None
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    return f"Reload refused: outside the sandbox set up at start-up: {shown}; restart pytunnel to use them"
