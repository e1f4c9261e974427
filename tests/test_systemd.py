"""systemd integration without systemd: a real NOTIFY_SOCKET and real LISTEN_FDS sockets."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, Certs, EchoServer, Tunnel, TunnelFactory, need_stunnel, roundtrip


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


def activated(
    conf: Path, socks: list[socket.socket], log: Path, names: str = "", impl: str = "pytunnel"
) -> Tunnel:
    """Start the tunnel the way systemd does: sockets at fd 3.., LISTEN_PID = its own pid
    (the launcher sets the variables, then execs the tunnel, which keeps the pid)."""
    argv = [need_stunnel(), str(conf)] if impl == "stunnel4" else [sys.executable, "-m", "tunnel", str(conf)]
    fds = [s.fileno() for s in socks]
    script = (
        "import os, sys\n"
        f"for i, fd in enumerate({fds}):\n"
        "    os.dup2(fd, 3 + i)\n"
        "os.environ['LISTEN_PID'] = str(os.getpid())\n"
        f"os.environ['LISTEN_FDS'] = '{len(socks)}'\n"
        f"os.environ['LISTEN_FDNAMES'] = '{names}'\n"
        f"os.execv({argv[0]!r}, {argv!r})\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-c", script],
            pass_fds=fds,
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


def tls_roundtrip(tunnels: TunnelFactory, certs: Certs, port: int) -> None:
    """Data through a pytunnel client to the TLS server on ``port``."""
    client_conf = tunnels.conf(
        f"[cli]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{port}\n"
        f"CAfile = {certs.ca_pem}\ncheckHost = localhost\n"
    )
    c = tunnels.start(client_conf, mode="run")
    data = os.urandom(100_000)
    assert roundtrip(c.port("cli"), data) == data
    assert c.stop() == 0


def server_section(name: str, port: int, echo: EchoServer, certs: Certs) -> str:
    return (
        f"[{name}]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
    )


def test_socket_activation_uses_the_passed_socket(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, tmp_path: Path, impl: str
) -> None:
    """Server side: systemd holds the port; the tunnel serves TLS on it without binding."""
    passed = listening()
    port = passed.getsockname()[1]
    t = activated(
        tunnels.conf(server_section("srv", port, echo, certs)), [passed], tmp_path / "act.log", impl=impl
    )
    try:
        t.wait_for(r"Listening file descriptor received from systemd \(FD=3\)|\(FD=3\) bound to")
        t.wait_for("Accepting new connections|Created pid file|Configuration successful")
        passed.close()  # the launcher's copy: only the tunnel can accept on it now
        tls_roundtrip(tunnels, certs, port)
        if impl == "pytunnel":
            t.wait_for(rf"Service \[srv\] \(FD=3\) bound to 127\.0\.0\.1:{port}$")
    finally:
        assert t.stop() == 0


def test_more_sockets_than_accept_lines_refuse_to_start(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, tmp_path: Path, impl: str
) -> None:
    """stunnel's rule: a passed socket nobody takes is a broken unit, not something to ignore."""
    passed, stray = listening(), listening()
    conf = tunnels.conf(server_section("srv", passed.getsockname()[1], echo, certs))
    t = activated(conf, [passed, stray], tmp_path / "act.log", impl=impl)
    try:
        assert t.proc.wait(20) != 0
        t.wait_for(r"Too many listening file descriptors received from systemd, got 2")
        if impl == "pytunnel":
            t.wait_for(r"Socket passed by systemd matches no accept line: fd 4 \(127\.0\.0\.1:\d+\)")
    finally:
        passed.close()
        stray.close()


def test_a_socket_bound_elsewhere_is_taken_by_order(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, tmp_path: Path, impl: str
) -> None:
    """The accept line says one port, the unit another: stunnel serves on the passed socket
    (fd 3 for the first accept line), and so does pytunnel, saying so."""
    passed = listening()
    unused = listening()
    written_port = unused.getsockname()[1]
    unused.close()
    conf = tunnels.conf(server_section("srv", written_port, echo, certs))
    t = activated(conf, [passed], tmp_path / "act.log", impl=impl)
    try:
        t.wait_for("Accepting new connections|Configuration successful")
        port = passed.getsockname()[1]
        passed.close()
        tls_roundtrip(tunnels, certs, port)
        if impl == "pytunnel":
            t.wait_for(
                rf"Service \[srv\]: socket passed by systemd at fd 3 is bound to 127\.0\.0\.1:{port}, "
                rf"not 127\.0\.0\.1:{written_port}; used by order, as stunnel does"
            )
    finally:
        assert t.stop() == 0


def test_addresses_and_names_before_order(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, tmp_path: Path, impl: str
) -> None:
    """Where order and addresses disagree (the unit lists the ports the other way round),
    stunnel 5.68 gives [a] the socket of [b]'s port; pytunnel gives each service its own
    address. FileDescriptorName= (pytunnel only) names the service outright."""
    sock_a, sock_b = listening(), listening()
    port_a, port_b = sock_a.getsockname()[1], sock_b.getsockname()[1]
    conf = tunnels.conf(server_section("a", port_a, echo, certs) + server_section("b", port_b, echo, certs))
    t = activated(conf, [sock_b, sock_a], tmp_path / "act.log", impl=impl)
    try:
        t.wait_for("Accepting new connections|Configuration successful")
        sock_a.close()
        sock_b.close()
        served_on_a, other = ("a", "b") if impl == "pytunnel" else ("b", "a")
        tls_roundtrip(tunnels, certs, port_a)
        t.wait_for(rf"Service \[{served_on_a}\] accepted connection")
        assert f"Service [{other}] accepted connection" not in t.log
        tls_roundtrip(tunnels, certs, port_b)
        t.wait_for(rf"Service \[{other}\] accepted connection")
        if impl == "pytunnel":
            assert f"Service [a] (FD=4) bound to 127.0.0.1:{port_a}" in t.log
            assert f"Service [b] (FD=3) bound to 127.0.0.1:{port_b}" in t.log
    finally:
        assert t.stop() == 0
    if impl == "stunnel4":
        return
    # names: both sockets on the "wrong" service by address, named for the right one
    sock_x, sock_y = listening(), listening()
    conf = tunnels.conf(
        server_section("x", sock_y.getsockname()[1], echo, certs)
        + server_section("y", sock_x.getsockname()[1], echo, certs)
    )
    named = activated(conf, [sock_x, sock_y], tmp_path / "named.log", names="x:y")
    try:
        named.wait_for("Accepting new connections")
        assert f"Service [x] (FD=3) bound to 127.0.0.1:{sock_x.getsockname()[1]}" in named.log
        assert f"Service [y] (FD=4) bound to 127.0.0.1:{sock_y.getsockname()[1]}" in named.log
    finally:
        sock_x.close()
        sock_y.close()
        assert named.stop() == 0


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
