"""systemd integration without systemd: a real NOTIFY_SOCKET and real LISTEN_FDS sockets."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, Certs, EchoServer, Tunnel, TunnelFactory, roundtrip


class NotifySocket:
    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(15)

    def next(self) -> dict[str, str]:
        data = self.sock.recv(4096).decode()
        return dict(line.split("=", 1) for line in data.splitlines())

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_ready_reloading_stopping(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, tmp_path: Path, abstract: bool
) -> None:
    name = f"pytunnel-test-{os.getpid()}-{abstract}"
    address = "\0" + name if abstract else str(tmp_path / "notify")
    notify = NotifySocket(address)
    try:
        conf = tunnels.conf(
            f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
        )
        env = {"NOTIFY_SOCKET": "@" + name if abstract else address}
        t = tunnels.start(conf, mode="run", extra_env=env)
        msg = notify.next()
        assert msg["READY"] == "1"
        assert "Accepting connections for 1 service(s)" in msg["STATUS"]
        assert "Accepting new connections" in t.log  # READY comes once it accepts

        t.signal(signal.SIGHUP)
        msg = notify.next()
        assert msg["RELOADING"] == "1"
        assert int(msg["MONOTONIC_USEC"]) > 0
        msg = notify.next()
        assert msg["READY"] == "1" and "reloaded" in msg["STATUS"]

        t.signal(signal.SIGTERM)
        msg = notify.next()
        assert msg["STOPPING"] == "1"
        assert t.proc.wait(15) == 0
    finally:
        notify.close()


def test_no_notify_socket_sends_nothing_and_runs(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer
) -> None:
    conf = tunnels.conf(
        f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
    )
    t = tunnels.start(conf, mode="run", extra_env={"NOTIFY_SOCKET": ""})
    t.wait_for("Accepting new connections")
    assert t.stop() == 0


def activated(conf: Path, socks: list[socket.socket], log: Path, names: str = "") -> Tunnel:
    """Start pytunnel the way systemd does: sockets at fd 3.., LISTEN_PID = its own pid."""
    fds = [s.fileno() for s in socks]
    script = (
        "import os, sys\n"
        f"for i, fd in enumerate({fds}):\n"
        "    os.dup2(fd, 3 + i)\n"
        "os.environ['LISTEN_PID'] = str(os.getpid())\n"
        f"os.environ['LISTEN_FDS'] = '{len(socks)}'\n"
        f"os.environ['LISTEN_FDNAMES'] = '{names}'\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'tunnel', 'run', sys.argv[1]])\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(conf)],
            pass_fds=[s.fileno() for s in socks],
            stdin=subprocess.DEVNULL,
            stdout=fh,
            stderr=subprocess.STDOUT,
            env=env,
        )
    return Tunnel(proc=proc, log_path=log)


def listening(host: str = "127.0.0.1") -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, 0))
    s.listen(16)
    return s


def test_socket_activation_uses_the_passed_socket(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, tmp_path: Path
) -> None:
    """Server side: systemd holds the port; pytunnel serves TLS on it without binding.
    A second passed socket that matches no accept address is reported, not used."""
    passed = listening()
    stray = listening()
    port = passed.getsockname()[1]
    server_conf = tunnels.conf(
        f"[srv]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
    )
    t = activated(server_conf, [passed, stray], tmp_path / "act.log")
    try:
        t.wait_for(rf"Service \[srv\] \(FD=3\) bound to 127\.0\.0\.1:{port}$")
        t.wait_for(r"Socket passed by systemd matches no accept address, ignored: fd 4 \(127\.0\.0\.1:\d+\)")
        t.wait_for("Accepting new connections")
        # the parent's copy of the socket is closed: only pytunnel can accept on it now
        passed.close()
        client_conf = tunnels.conf(
            f"[cli]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{port}\n"
            f"CAfile = {certs.ca_pem}\ncheckHost = localhost\n"
        )
        c = tunnels.start(client_conf, mode="run")
        data = os.urandom(100_000)
        assert roundtrip(c.port("cli"), data) == data
        assert c.stop() == 0
    finally:
        stray.close()
        assert t.stop() == 0


def test_activation_for_another_pid_is_ignored(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, tmp_path: Path
) -> None:
    conf = tunnels.conf(
        f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
    )
    t = tunnels.start(conf, mode="run", extra_env={"LISTEN_PID": "1", "LISTEN_FDS": "1"})
    assert t.port("srv") > 0
    assert "passed by systemd" not in t.log
    assert t.stop() == 0


def test_unit_files_are_what_the_docs_promise() -> None:
    unit = (ROOT / "contrib/systemd/pytunnel@.service").read_text()
    for line in (
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=CAP_NET_BIND_SERVICE",
    ):
        assert line in unit.splitlines(), line
    sock = (ROOT / "contrib/systemd/pytunnel-smtps.socket").read_text()
    assert "ListenStream=127.0.0.1:25" in sock and "Service=pytunnel@smtps.service" in sock
