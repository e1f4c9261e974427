"""inetd mode's one connection: standard input and output, whatever they are.

stunnel serves a file without ``[section]`` on its standard input and output: a socket
from inetd or systemd ``Accept=yes``, but just as well a pair of pipes (an SSH
``ProxyCommand``, a git transport, ``printf 'EHLO x\\r\\n' | stunnel client.conf``), a file or
``/dev/null``.  :func:`open_stdio` gives the event loop a connected stream socket either way:

* standard input is a stream socket: that socket (a duplicate of it);
* anything else: one end of a socket pair, whose other end two threads pump -- standard
  input into it (its end of file becomes a half-close, as a peer's EOF would), and what
  comes out of it to standard output (closed when the connection ends, so the reader of
  our output sees its end of file).  Blocking reads and writes on pipes, files and
  terminals stay off the event loop.

In both cases descriptors 0 and 1 are pointed at ``/dev/null`` afterwards: a program that
``exec`` starts must not hold the connection open.  A leaf: imports nothing of tunnel.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading

CHUNK = 65536


class Stdio:
    """The connection's socket, and (pipes) the threads that pump standard input/output."""

    def __init__(self, sock: socket.socket, threads: list[threading.Thread]) -> None:
        self.sock = sock
        self.threads = threads

    @property
    def piped(self) -> bool:
        return bool(self.threads)

    def finish(self) -> None:
        """After the connection ended: let what it wrote reach standard output."""
        for thread in self.threads[1:]:  # the output pump; the input one may wait for ever
            thread.join()


def open_stdio() -> Stdio:
    """Standard input/output as a connected stream socket (see the module's docstring).
    Raises OSError when standard input or output is closed."""
    os.fstat(0)
    os.fstat(1)
    sock = _stdin_socket()
    if sock is not None:
        _point_at_devnull()
        return Stdio(sock, [])
    outer, inner = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    src, dst = os.dup(0), os.dup(1)
    _point_at_devnull()
    threads = [
        threading.Thread(target=_pump_in, args=(src, inner), name="stdin", daemon=True),
        threading.Thread(target=_pump_out, args=(inner, dst), name="stdout", daemon=True),
    ]
    for thread in threads:
        thread.start()
    return Stdio(outer, threads)


def _stdin_socket() -> socket.socket | None:
    """Standard input when it is a connected stream socket (inetd's, systemd's)."""
    try:
        sock = socket.socket(fileno=os.dup(0))
    except OSError:
        return None
    try:
        if sock.type == socket.SOCK_STREAM:
            sock.getsockname()
            return sock
    except OSError:
        pass
    sock.close()
    return None


def _point_at_devnull() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)


def _pump_in(fd: int, sock: socket.socket) -> None:
    """Standard input into the connection; its end becomes the connection's half-close."""
    try:
        while data := os.read(fd, CHUNK):
            sock.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)
        os.close(fd)


def _pump_out(sock: socket.socket, fd: int) -> None:
    """What the connection delivers, to standard output, until it ends."""
    try:
        while data := sock.recv(CHUNK):
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
    except OSError:
        pass
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RD)
