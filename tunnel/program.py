"""``exec``: a local program whose stdin/stdout is one end of the connection (inetd style).

The program gets one end of a socket pair as stdin and stdout (and stderr too when the
process is not in the foreground, as stunnel does); the tunnel relays the other end like
any socket.  ``execArgs`` is split on whitespace with no quoting (stunnel's rule) and gives
argv including ``$0``.  The child's environment is the tunnel's plus ``setEnv`` lines and
stunnel's ``REMOTE_HOST``/``REMOTE_PORT`` (the accepted peer) and, in server mode with a
client certificate, ``SSL_CLIENT_DN``/``SSL_CLIENT_I_DN``.  Every child is reaped by the
event loop's child watcher and its exit logged (stunnel's ``Child process PID finished with code N``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
from collections.abc import Mapping

from tunnel.logs import log
from tunnel.relaytypes import SharedBuffer


def argv_of(path: str, exec_args: str | None) -> list[str]:
    return exec_args.split() if exec_args and exec_args.split() else [path]


def child_env(
    set_env: list[str],
    peer: tuple[str, int] | None = None,
    client_dn: tuple[str, str] | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for item in set_env:
        name, _, value = item.partition("=")
        env[name] = value
    if peer is not None:
        env["REMOTE_HOST"] = peer[0]
        env["REMOTE_PORT"] = str(peer[1])
    if client_dn is not None:
        env["SSL_CLIENT_DN"], env["SSL_CLIENT_I_DN"] = client_dn
    return env


async def spawn(
    path: str,
    argv: list[str],
    env: dict[str, str],
    stderr_to_socket: bool,
    ident: str,
) -> socket.socket:
    """Start the program; the returned socket is our end of its stdin/stdout.  Raises OSError."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = _start(path, argv, env, theirs.fileno(), theirs.fileno() if stderr_to_socket else None, False)
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    log.write(6, ident, f"Local mode child started (PID={proc.pid})")
    _watch(proc)
    ours.setblocking(False)
    return ours


def _start(
    path: str, argv: list[str], env: dict[str, str], stdio: int, stderr: int | None, new_session: bool
) -> subprocess.Popen[bytes]:
    """fork+exec with every other descriptor closed.  Not the event loop's subprocess API:
    uvloop's (libuv's) spawn leaves duplicates of the stdio descriptors open in the child,
    so a program that closes its stdout would not end the connection while it lives on."""
    return subprocess.Popen(
        argv,
        executable=path,
        stdin=stdio,
        stdout=stdio,
        stderr=stderr,
        env=env,
        close_fds=True,
        start_new_session=new_session,
    )


def _watch(proc: subprocess.Popen[bytes]) -> None:
    """Reap the child when it exits (a pidfd in the event loop; a thread where there is none)
    and log it in stunnel's words."""
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        loop.run_in_executor(None, proc.wait).add_done_callback(lambda _f: _reaped(proc))
        return

    def ready() -> None:
        loop.remove_reader(pidfd)
        os.close(pidfd)
        proc.wait()
        _reaped(proc)

    loop.add_reader(pidfd, ready)


def _reaped(proc: subprocess.Popen[bytes]) -> None:
    code = proc.returncode
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        log.write(6, "ui", f"Child process {proc.pid} terminated on {name}")
    else:
        log.write(6, "ui", f"Child process {proc.pid} finished with code {code}")


# ---- pty = yes ------------------------------------------------------------------------------


async def spawn_pty(
    path: str, argv: list[str], env: dict[str, str], stderr_to_terminal: bool, ident: str
) -> int:
    """Start the program on a pseudo-terminal (raw mode: bytes pass unchanged); returns the
    master descriptor, our end.  Raises OSError."""
    import tty

    master, slave = os.openpty()
    try:
        tty.setraw(slave)
        # a new session: the terminal becomes the child's session's own
        proc = _start(path, argv, env, slave, slave if stderr_to_terminal else None, True)
    except BaseException:
        os.close(master)
        raise
    finally:
        os.close(slave)
    log.write(6, ident, f"Local mode child started on a pty (PID={proc.pid})")
    _watch(proc)
    return master


class PtyTransport(asyncio.Transport):
    """The master side of a pty as one transport for a relay side: reads through a pipe
    transport, writes straight to the descriptor (buffered, with flow control).  When the
    child's side closes, the kernel answers reads with EIO: the end of the stream."""

    HIGH_WATER = 256 * 1024

    def __init__(self, side: SharedBuffer) -> None:
        super().__init__()
        self.side = side
        self.reader: asyncio.ReadTransport | None = None
        self.fd = -1
        self.wbuf = bytearray()
        self.paused = False
        self.closed = False
        self.eof_seen = False

    async def attach(self, master: int) -> None:
        loop = asyncio.get_running_loop()
        os.set_blocking(master, False)
        self.fd = os.dup(master)  # ours for writing; the read transport owns ``master``
        self.reader, _ = await loop.connect_read_pipe(
            lambda: _PtyReader(self), os.fdopen(master, "rb", buffering=0)
        )
        self.side.connection_made(self)

    # Transport API used by the relay
    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            return
        if not self.wbuf:
            try:
                n = os.write(self.fd, data)
            except BlockingIOError:
                n = 0
            except OSError:
                self.close()
                return
            data = data[n:]
            if not data:
                return
            asyncio.get_running_loop().add_writer(self.fd, self._flush)
        self.wbuf += data
        if not self.paused and len(self.wbuf) > self.HIGH_WATER:
            self.paused = True
            self.side.pause_writing()

    def _flush(self) -> None:
        try:
            n = os.write(self.fd, self.wbuf)
        except BlockingIOError:
            return
        except OSError:
            self.close()
            return
        del self.wbuf[:n]
        if not self.wbuf:
            asyncio.get_running_loop().remove_writer(self.fd)
            if self.paused:
                self.paused = False
                self.side.resume_writing()

    def can_write_eof(self) -> bool:
        return False  # a terminal has no half-close; the program sees the end when we close

    def pause_reading(self) -> None:
        if self.reader is not None and not self.closed:
            self.reader.pause_reading()

    def resume_reading(self) -> None:
        if self.reader is not None and not self.closed:
            self.reader.resume_reading()

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.wbuf:
            asyncio.get_running_loop().remove_writer(self.fd)
        os.close(self.fd)
        if self.reader is not None:
            self.reader.close()  # its connection_lost tells the side

    def abort(self) -> None:
        self.close()

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def _eof(self) -> None:
        if not self.eof_seen:
            self.eof_seen = True
            self.side.eof_received()

    def _lost(self) -> None:
        self._eof()
        if not self.closed:
            self.closed = True
            if self.wbuf:
                asyncio.get_running_loop().remove_writer(self.fd)
            os.close(self.fd)
        self.side.connection_lost(None)


class _PtyReader(asyncio.Protocol):
    def __init__(self, owner: PtyTransport) -> None:
        self.owner = owner

    def data_received(self, data: bytes) -> None:
        self.owner.side.data_received(data)

    def eof_received(self) -> bool:
        self.owner._eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._lost()  # EIO once the child's side of the terminal is closed: the end
