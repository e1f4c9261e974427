"""inetd mode (a file without ``[section]``) on standard input/output that are not a socket:
pipes (``printf ... | stunnel client.conf``, an SSH ProxyCommand), ``/dev/null``.  Same config
file under pytunnel and stunnel4; stunnel's lines and exit status (0 once the connection was
served, whatever became of it)."""

from __future__ import annotations

import os
import re
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import ROOT, Certs, EchoServer, Tunnel, TunnelFactory, need_stunnel


def command(conf: Path, impl: str) -> tuple[list[str], dict[str, str]]:
    cmd = [need_stunnel(), str(conf)] if impl == "stunnel4" else [sys.executable, "-m", "tunnel", str(conf)]
    return cmd, dict(os.environ, PYTHONPATH=str(ROOT))


def inetd_conf(tmp_path: Path, body: str) -> Path:
    conf = tmp_path / "inetd.conf"
    conf.write_text(f"foreground = yes\nsyslog = no\npid =\ndebug = 6\n{body}")
    return conf


@pytest.fixture
def tls_server(tunnels: TunnelFactory, certs: Certs, echo: EchoServer) -> Tunnel:
    return tunnels.start(
        tunnels.conf(
            f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
        )
    )


def client_conf(tmp_path: Path, certs: Certs, server: Tunnel, port: int | None = None) -> Path:
    return inetd_conf(
        tmp_path,
        f"client = yes\nconnect = 127.0.0.1:{port or server.port('srv')}\nCAfile = {certs.ca_pem}\n"
        "verifyChain = yes\ncheckHost = localhost\n",
    )


@pytest.mark.parametrize("size", [8, 3_000_000])
def test_client_on_a_pipeline(tmp_path: Path, certs: Certs, tls_server: Tunnel, impl: str, size: int) -> None:
    """``printf 'EHLO x\\r\\n' | stunnel client.conf``: standard input goes through TLS, the
    answer comes out on standard output, and the process exits when standard input ends."""
    data = b"EHLO x\r\n" if size == 8 else os.urandom(size)
    cmd, env = command(client_conf(tmp_path, certs, tls_server), impl)
    out = subprocess.run(cmd, input=data, capture_output=True, env=env, timeout=60)
    log = out.stderr.decode(errors="replace")
    assert out.returncode == 0, log
    assert out.stdout == data, log
    assert re.search(r"LOG5\[\d+\]: Service \[stunnel\] accepted connection$", log, re.M), log
    assert f"Connection closed: {size} byte(s) sent to TLS, {size} byte(s) sent to socket" in log


def test_client_on_devnull(tmp_path: Path, certs: Certs, tls_server: Tunnel, impl: str) -> None:
    cmd, env = command(client_conf(tmp_path, certs, tls_server), impl)
    with open(os.devnull, "rb") as null_in:
        out = subprocess.run(cmd, stdin=null_in, capture_output=True, env=env, timeout=60)
    log = out.stderr.decode(errors="replace")
    assert (out.returncode, out.stdout) == (0, b""), log
    assert "Connection closed: 0 byte(s) sent to TLS, 0 byte(s) sent to socket" in log


def test_failed_connection_still_exits_zero(tmp_path: Path, certs: Certs, impl: str) -> None:
    """stunnel's exit status in inetd mode is 0 once the connection was served, even when
    the connect failed; its lines say why."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    conf = inetd_conf(tmp_path, f"client = yes\nconnect = 127.0.0.1:{closed}\n")
    cmd, env = command(conf, impl)
    out = subprocess.run(cmd, input=b"x", capture_output=True, env=env, timeout=60)
    log = out.stderr.decode(errors="replace")
    assert out.returncode == 0, log
    assert f"s_connect: connect 127.0.0.1:{closed}: Connection refused (111)" in log
    assert "Connection reset: 0 byte(s) sent to TLS, 0 byte(s) sent to socket" in log


def test_server_on_pipes(tmp_path: Path, certs: Certs, echo: EchoServer, impl: str) -> None:
    """Server mode: the TLS client speaks through the process's standard input/output pipes
    (Python's ssl over memory BIOs here); the plaintext goes to ``connect``."""
    conf = inetd_conf(tmp_path, f"connect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n")
    cmd, env = command(conf, impl)
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    errors: list[bytes] = []
    reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")

    def pump(step: object) -> object:
        while True:
            try:
                result = step()  # type: ignore[operator]
            except ssl.SSLWantReadError:
                proc.stdin.write(outgoing.read())  # type: ignore[union-attr]
                proc.stdin.flush()  # type: ignore[union-attr]
                chunk = os.read(proc.stdout.fileno(), 65536)  # type: ignore[union-attr]
                if not chunk:
                    incoming.write_eof()
                else:
                    incoming.write(chunk)
                continue
            proc.stdin.write(outgoing.read())  # type: ignore[union-attr]
            proc.stdin.flush()  # type: ignore[union-attr]
            return result

    pump(tls.do_handshake)
    pump(lambda: tls.write(b"through pipes"))
    got = b""
    while len(got) < len(b"through pipes"):
        got += pump(lambda: tls.read(100))  # type: ignore[operator]
    assert got == b"through pipes"
    proc.stdin.close()
    assert proc.wait(30) == 0
    reader.join(30)
    log = errors[0].decode(errors="replace") if errors else ""
    assert re.search(r"LOG5\[\d+\]: Service \[stunnel\] accepted connection$", log, re.M), log
