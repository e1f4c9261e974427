"""Process mechanics: what the operating system sees of pytunnel, and nothing about tunnels.

Daemonizing (stunnel's ``foreground = no``), the chroot jail, dropping to ``setuid`` /
``setgid``, the pid file, seeding OpenSSL's RNG from ``RNDfile``, glibc's malloc tuning,
the modules to import before the jail closes, and the event loop (uvloop when it is
there).  The server calls these in stunnel's order (bind, seed, daemonize, chroot,
setuid, pid file); each is a plain function of plain values.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import sys

from tunnel.logs import log
from tunnel.values import gid_of, uid_of

Ids = tuple[int | None, int | None]  # (uid, gid) to switch to; None: keep


def seed_rng(path: str | None, nbytes: int, overwrite: bool) -> None:
    """stunnel's RNDfile / RNDbytes / RNDoverwrite: mix ``nbytes`` of the file into OpenSSL's
    RNG and, when it is a regular file, rewrite it with new random data (1024 bytes, as
    OpenSSL's RAND_write_file does), with stunnel's log lines.  (stunnel 5.68 with OpenSSL 3
    skips all of it, "No PRNG seeding was required"; pytunnel does what the option says.)"""
    if not path or nbytes == 0:
        return
    try:
        with open(path, "rb") as fh:
            data = fh.read(nbytes)
    except OSError as exc:
        log.ui(4, f"Cannot read RNDfile {path}: {exc.strerror}")
        return
    if not data:
        log.ui(6, f"Cannot retrieve any random data from {path}")
        return
    ssl.RAND_add(data, len(data))
    log.ui(7, f"Snagged {len(data)} random bytes from {path}")
    if overwrite and os.path.isfile(path):
        try:
            with open(path, "wb") as fh:
                fh.write(ssl.RAND_bytes(RAND_FILE_SIZE))
        except OSError as exc:
            log.ui(4, f"Failed to write strong random data to {path} - {exc.strerror}")
            return
        log.ui(7, f"Wrote {RAND_FILE_SIZE} new random bytes to {path}")


RAND_FILE_SIZE = 1024  # what OpenSSL's RAND_write_file writes


def ids(user: str | None, group: str | None) -> Ids:
    """setuid/setgid as numbers, looked up before chroot (the jail has no /etc/passwd).
    Raises KeyError for an unknown name."""
    return (uid_of(user) if user else None), (gid_of(group) if group else None)


def enter_jail(root: str, who: Ids) -> None:
    """chroot to ``root`` (before the privileges go).  Raises OSError."""
    os.chroot(root)
    os.chdir("/")
    log.entered_jail(*who)


def drop_privileges(who: Ids) -> None:
    """Become ``who``: supplementary groups, then the group, then the user.  Raises OSError."""
    uid, gid = who
    if gid is not None:
        os.setgroups([gid])
        os.setgid(gid)
    if uid is not None:
        if gid is None:
            os.setgroups([])
        os.setuid(uid)


def write_pid_file(path: str) -> None:
    """``pid = PATH``.  Raises OSError."""
    # bytes, not text: inside a chroot no codec module can be imported any more
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"%d\n" % os.getpid())
    finally:
        os.close(fd)


def remove_pid_file(path: str | None) -> None:
    if path:
        with contextlib.suppress(OSError):
            os.unlink(path)


def daemonize() -> None:
    """Fork twice and detach from the terminal; the caller goes on in the grandchild."""
    if os.fork() > 0:
        os._exit(0)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def preload() -> None:
    """After chroot (or setuid, when Python's files are not world-readable) no module can
    be imported: load now what connections and reloads will need."""
    import datetime  # noqa: F401 - JSON log lines, a reload's certificate warnings
    import difflib  # noqa: F401 - a reload's did-you-mean hints
    import encodings.idna  # noqa: F401 - getaddrinfo() of a host name needs it
    import grp  # noqa: F401
    import json  # noqa: F401 - JSON log lines
    import pwd  # noqa: F401
    import secrets  # noqa: F401 - logId = unique
    import shlex  # noqa: F401 - the sandbox's plan of a reload (exec's interpreter)
    import urllib.parse  # noqa: F401 - the sandbox's plan of a reload (OCSP, ACME ports)

    import cryptography.hazmat.primitives.serialization.pkcs12  # noqa: F401
    import cryptography.x509  # noqa: F401


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
