"""``exec``/``execArgs``/``retry``/``setEnv`` and inetd mode: real programs, real TLS, both implementations."""

from __future__ import annotations

import os
import re
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, Certs, EchoServer, Tunnel, TunnelFactory, need_stunnel


def tls(port: int, certs: Certs, client_cert: bool = False) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    if client_cert:
        ctx.load_cert_chain(str(certs.client_pem))
    raw = socket.create_connection(("127.0.0.1", port), timeout=15)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def read_all(s: socket.socket) -> bytes:
    out = b""
    while chunk := s.recv(65536):
        out += chunk
    return out


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def children_of(pid: int) -> list[str]:
    out = subprocess.run(["ps", "-o", "pid=,stat=", "--ppid", str(pid)], capture_output=True, text=True)
    return [line.split() for line in out.stdout.splitlines() if line.strip()]  # type: ignore[misc]


def test_server_exec_cat_echoes(tunnels: TunnelFactory, certs: Certs, impl: str) -> None:
    conf = tunnels.conf(
        f"[cat]\naccept = 127.0.0.1:0\nexec = /bin/cat\nexecArgs = cat\ncert = {certs.server_pem}\n"
    )
    t = tunnels.start(conf, impl=impl)
    data = os.urandom(300_000)
    for _ in range(3):
        with tls(t.port("cat"), certs) as s:
            s.sendall(data)
            got = b""
            while len(got) < len(data):
                chunk = s.recv(65536)
                assert chunk, "EOF before the echo was complete"
                got += chunk
            assert got == data
    # every child was reaped: no zombies under the tunnel
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and children_of(t.proc.pid):
        time.sleep(0.1)
    assert not [c for c in children_of(t.proc.pid) if c[1].startswith("Z")]
    assert t.stop() == 0


def test_server_exec_environment(tunnels: TunnelFactory, certs: Certs, impl: str, tmp_path: Path) -> None:
    prog = script(
        tmp_path,
        "env.sh",
        'printf "host=%s port=%s dn=%s idn=%s\\n" "$REMOTE_HOST" "$REMOTE_PORT" "$SSL_CLIENT_DN" "$SSL_CLIENT_I_DN"\n',
    )
    conf = tunnels.conf(
        f"[env]\naccept = 127.0.0.1:0\nexec = {prog}\ncert = {certs.server_pem}\n"
        f"verifyChain = yes\nCAfile = {certs.ca_pem}\n"
    )
    t = tunnels.start(conf, impl=impl)
    with tls(t.port("env"), certs, client_cert=True) as s:
        local_port = s.getsockname()[1]
        line = read_all(s).decode()
    m = re.fullmatch(r"host=(\S+) port=(\d+) dn=(.*) idn=(.*)\n", line)
    assert m, line
    assert m.group(1) == "127.0.0.1"
    assert m.group(2) == str(local_port)
    # OpenSSL's one-line form of the client certificate's subject and of its issuer
    assert re.fullmatch(r"O=trustme v[\d.]+, OU=Testing cert #\S+", m.group(3)), line
    assert re.fullmatch(r"O=trustme v[\d.]+, OU=Testing CA #\S+", m.group(4)), line
    assert t.stop() == 0


def test_set_env_reaches_the_child(tunnels: TunnelFactory, certs: Certs, tmp_path: Path) -> None:
    # setEnv is new in stunnel 5.75; Debian's 5.68 does not know it
    prog = script(tmp_path, "setenv.sh", 'printf "%s|%s\\n" "$GREETING" "$EMPTY"\n')
    conf = tunnels.conf(
        f"setEnv = GREETING=hello world\nsetEnv = EMPTY=\n[e]\naccept = 127.0.0.1:0\nexec = {prog}\n"
        f"cert = {certs.server_pem}\n"
    )
    t = tunnels.start(conf)
    with tls(t.port("e"), certs) as s:
        assert read_all(s) == b"hello world|\n"
    assert t.stop() == 0


def test_exec_args_split_on_whitespace(
    tunnels: TunnelFactory, certs: Certs, impl: str, tmp_path: Path
) -> None:
    prog = script(tmp_path, "args.sh", 'printf "[%s]" "$0" "$@"\n')
    conf = tunnels.conf(
        f"[a]\naccept = 127.0.0.1:0\nexec = {prog}\nexecArgs = myname  one   two\ncert = {certs.server_pem}\n"
    )
    t = tunnels.start(conf, impl=impl)
    with tls(t.port("a"), certs) as s:
        got = read_all(s)
    # $0 is the script path for /bin/sh; the arguments arrive split, without empty ones
    assert got.endswith(b"[one][two]")
    assert t.stop() == 0


def test_missing_program_fails_one_connection(tunnels: TunnelFactory, certs: Certs, echo: EchoServer) -> None:
    conf = tunnels.conf(
        f"[bad]\naccept = 127.0.0.1:0\nexec = /nonexistent/prog\ncert = {certs.server_pem}\n"
        f"[good]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
    )
    t = tunnels.start(conf)
    with tls(t.port("bad"), certs) as s, pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        s.sendall(b"x")
        if not s.recv(1):
            raise ConnectionResetError("closed")
    t.wait_for(r"execv /nonexistent/prog: No such file or directory \(2\)")
    with tls(t.port("good"), certs) as s:
        s.sendall(b"still")
        assert s.recv(5) == b"still"
    assert t.stop() == 0


def test_exec_connect_with_retry(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, tmp_path: Path
) -> None:
    """exec + connect (no accept): the program is the local end; retry restarts it."""
    server = tunnels.start(
        tunnels.conf(
            f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
        )
    )
    log = tmp_path / "runs.txt"
    prog = script(
        tmp_path,
        "client.sh",
        # say hello through the tunnel, read the echo, record it, exit
        f'printf "hello\\n"; read -r line; printf "%s\\n" "$line" >> {log}\n',
    )
    conf = tunnels.conf(
        f"[cli]\nclient = yes\nexec = {prog}\nconnect = 127.0.0.1:{server.port('srv')}\n"
        f"CAfile = {certs.ca_pem}\nverifyChain = yes\ncheckHost = localhost\nretry = yes\n"
    )
    t = tunnels.start(conf, impl=impl, wait=False)
    t.wait_for("Configuration successful")
    if impl == "pytunnel":  # stunnel 5.75's line; 5.68 logs none
        t.wait_for(r"Starting exec\+connect service \[cli\]")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if log.exists() and log.read_text().count("hello") >= 3:
            break
        time.sleep(0.1)
    assert log.read_text().splitlines()[:3] == ["hello"] * 3
    assert "Retrying an exec+connect section" in t.log
    assert re.search(r"Child process \d+ finished with code 0", t.log)
    assert t.stop() == 0
    assert not re.search(r"LOG[0-3]\[ui\]", t.log.split("Terminated")[-1]), t.log  # a clean stop
    assert server.stop() == 0


def test_closing_stdout_ends_the_connection(
    tunnels: TunnelFactory, certs: Certs, impl: str, tmp_path: Path
) -> None:
    """A program that closes its stdin/stdout and goes on living (a daemon-like helper) ends
    the connection at once: no other copy of its socket may stay open in the child.  The
    program lives until the test lets it go (a file appears), so the EOF cannot come from its
    exit however slow the machine is; reading waits up to 30 s."""
    go = tmp_path / "go"
    prog = script(
        tmp_path,
        "closer.sh",
        f"echo hello\nexec 0<&- 1>&- 2>&-\nwhile [ ! -e {go} ]; do sleep 0.1; done\n",
    )
    conf = tunnels.conf(f"[c]\naccept = 127.0.0.1:0\nexec = {prog}\ncert = {certs.server_pem}\n")
    t = tunnels.start(conf, impl=impl)
    try:
        with tls(t.port("c"), certs) as s:
            s.settimeout(30)
            try:
                assert read_all(s) == b"hello\n"
            except TimeoutError:
                raise AssertionError("no EOF in 30 s: the connection waits for the program to exit") from None
            alive = [c for c in children_of(t.proc.pid) if not c[1].startswith("Z")]
            assert alive, "the program had exited: this EOF proves nothing"
    finally:
        go.touch()
    assert t.stop() == 0


def test_child_killed_by_a_signal_is_named(
    tunnels: TunnelFactory, certs: Certs, impl: str, tmp_path: Path
) -> None:
    prog = script(tmp_path, "suicide.sh", "echo bye\nkill -9 $$\n")
    conf = tunnels.conf(f"[k]\naccept = 127.0.0.1:0\nexec = {prog}\ncert = {certs.server_pem}\n")
    t = tunnels.start(conf, impl=impl)
    with tls(t.port("k"), certs) as s:
        assert read_all(s) == b"bye\n"
    t.wait_for(r"LOG6\[ui\]: Child process \d+ terminated on SIGKILL$")
    assert t.stop() == 0


# ------------------------------------------------------------------ inetd mode


def inetd(conf: Path, impl: str, log: Path) -> tuple[socket.socket, subprocess.Popen[bytes]]:
    """Start the tunnel as inetd does: the accepted connection is its stdin and stdout."""
    ours, theirs = socket.socketpair()
    cmd = [need_stunnel(), str(conf)] if impl == "stunnel4" else [sys.executable, "-m", "tunnel", str(conf)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdin=theirs, stdout=theirs, stderr=fh, env=env)
    theirs.close()
    return ours, proc


def test_inetd_mode_server_exec(certs: Certs, impl: str, tmp_path: Path) -> None:
    conf = tmp_path / "inetd.conf"
    conf.write_text(
        f"foreground = yes\nsyslog = no\npid =\ndebug = 6\nexec = /bin/cat\ncert = {certs.server_pem}\n"
    )
    ours, proc = inetd(conf, impl, tmp_path / "inetd.log")
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    with ctx.wrap_socket(ours, server_hostname="localhost") as s:
        s.sendall(b"through inetd")
        got = b""
        while len(got) < 13:
            got += s.recv(100)
        assert got == b"through inetd"
    assert proc.wait(15) == 0
    log = (tmp_path / "inetd.log").read_text()
    assert re.search(r"LOG5\[\d+\]: Service \[stunnel\] accepted connection from ", log), log


def test_inetd_mode_client_connect(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, tmp_path: Path
) -> None:
    server: Tunnel = tunnels.start(
        tunnels.conf(
            f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
        )
    )
    conf = tmp_path / "inetd-client.conf"
    conf.write_text(
        f"foreground = yes\nsyslog = no\npid =\ndebug = 6\nservice = moo\nclient = yes\n"
        f"connect = 127.0.0.1:{server.port('srv')}\nCAfile = {certs.ca_pem}\nverifyChain = yes\n"
        "checkHost = localhost\n"
    )
    ours, proc = inetd(conf, impl, tmp_path / "inetd.log")
    with ours:
        ours.sendall(b"plain in, TLS out")
        ours.shutdown(socket.SHUT_WR)
        assert read_all(ours) == b"plain in, TLS out"
    assert proc.wait(15) == 0
    assert "Service [moo] accepted connection" in (tmp_path / "inetd.log").read_text()
    assert server.stop() == 0


# ------------------------------------------------------------------ pty = yes


def test_pty_gives_the_program_a_terminal(tunnels: TunnelFactory, certs: Certs, impl: str) -> None:
    conf = tunnels.conf(
        f"[tty]\naccept = 127.0.0.1:0\nexec = /usr/bin/tty\npty = yes\ncert = {certs.server_pem}\n"
    )
    t = tunnels.start(conf, impl=impl)
    with tls(t.port("tty"), certs) as s:
        got = read_all(s)
    assert re.fullmatch(rb"/dev/pts/\d+\r?\n", got), got  # a terminal, not a socket
    assert t.stop() == 0


def test_pty_is_raw_bytes_pass_unchanged(tunnels: TunnelFactory, certs: Certs) -> None:
    """pytunnel puts the terminal in raw mode: no echo, no CR/LF rewriting, any byte value
    (stunnel leaves the line discipline cooked)."""
    conf = tunnels.conf(
        f"[cat]\naccept = 127.0.0.1:0\nexec = /bin/cat\npty = yes\ncert = {certs.server_pem}\n"
    )
    t = tunnels.start(conf)
    data = bytes(b for b in range(256) if b not in (3, 4, 17, 19, 26, 28)) * 8  # no signal chars
    with tls(t.port("cat"), certs) as s:
        s.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = s.recv(65536)
            assert chunk, got
            got += chunk
    assert got == data
    assert t.stop() == 0


def test_pty_needs_exec_as_the_plaintext_end(tunnels: TunnelFactory) -> None:
    conf = tunnels.conf("[x]\nclient = yes\naccept = 127.0.0.1:0\nexec = /bin/cat\npty = yes\n")
    t = tunnels.start(conf, wait=False)
    assert t.proc.wait(20) == 1
    assert "pty = yes needs exec as the plaintext end" in t.log
