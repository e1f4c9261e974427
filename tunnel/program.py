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
import socket
from collections.abc import Mapping

from tunnel.logs import log


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
        proc = await asyncio.create_subprocess_exec(
            *argv,
            executable=path,
            stdin=theirs.fileno(),
            stdout=theirs.fileno(),
            stderr=theirs.fileno() if stderr_to_socket else None,
            env=env,
            close_fds=True,
            start_new_session=False,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    log.write(6, ident, f"Local mode child started (PID={proc.pid})")
    asyncio.get_running_loop().create_task(_reap(proc))
    ours.setblocking(False)
    return ours


async def _reap(proc: asyncio.subprocess.Process) -> None:
    code = await proc.wait()
    if code < 0:
        log.write(6, "ui", f"Child process {proc.pid} terminated on signal {-code}")
    else:
        log.write(6, "ui", f"Child process {proc.pid} finished with code {code}")
