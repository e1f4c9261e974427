"""Endpoints: IPv6, Unix sockets, several accept lines, a source address (`local`)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path

from conftest import Certs, EchoServer, TunnelFactory, roundtrip


def _unix_echo(path: Path) -> socket.socket:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(16)

    def serve() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)
                conn.shutdown(socket.SHUT_WR)

    threading.Thread(target=serve, daemon=True).start()
    return srv


def _unix_roundtrip(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = bytearray()
        while chunk := s.recv(65536):
            out.extend(chunk)
        return bytes(out)


def test_ipv6_accept_and_connect(tunnels: TunnelFactory, certs: Certs, impl: str) -> None:
    echo6 = EchoServer("::1")
    try:
        server = tunnels.start(
            tunnels.conf(f"[srv6]\naccept = ::1:0\nconnect = ::1:{echo6.port}\ncert = {certs.server_pem}\n"),
            impl=impl,
        )
        assert server.wait_for(r"bound to ::1:(\d+)$")
        client = tunnels.start(
            tunnels.conf(
                f"[cli6]\nclient = yes\naccept = 127.0.0.1:0\nconnect = [::1]:{server.port('srv6')}\n"
                f"verifyChain = yes\nCAfile = {certs.ca_pem}\ncheckIP = ::1\n"
            ),
            impl="pytunnel",
        )
        data = os.urandom(200_000)
        assert roundtrip(client.port("cli6"), data) == data
        server.wait_for(r"accepted connection from ::1:\d+")
    finally:
        echo6.close()


def test_unix_socket_upstream_and_listener(
    tunnels: TunnelFactory, certs: Certs, tmp_path: Path, impl: str
) -> None:
    backend = _unix_echo(tmp_path / "backend.sock")
    try:
        server = tunnels.start(
            tunnels.conf(
                f"[srv]\naccept = 127.0.0.1:0\nconnect = {tmp_path / 'backend.sock'}\ncert = {certs.server_pem}\n"
            ),
            impl=impl,
        )
        listen_path = tmp_path / "front.sock"
        client = tunnels.start(
            tunnels.conf(
                f"[cli]\nclient = yes\naccept = {listen_path}\nconnect = 127.0.0.1:{server.port('srv')}\n"
                f"verifyChain = yes\nCAfile = {certs.ca_pem}\ncheckHost = localhost\n"
            ),
            impl="pytunnel",
            wait=False,
        )
        client.wait_for(r"Accepting new connections")
        data = b"over unix sockets\n" * 1000
        assert _unix_roundtrip(listen_path, data) == data
    finally:
        backend.close()


def test_two_accept_lines_and_local_source(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    server = tunnels.start(
        tunnels.conf(
            f"[srv]\naccept = 127.0.0.1:0\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\n"
            f"local = 127.0.0.2\ncert = {certs.server_pem}\n"
        ),
        impl=impl,
    )
    assert len(server.ports["srv"]) == 2
    client = tunnels.start(
        tunnels.conf(
            f"[a]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{server.ports['srv'][0]}\n"
            f"[b]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{server.ports['srv'][1]}\n"
        ),
        impl="pytunnel",
    )
    for name in ("a", "b"):
        data = name.encode() * 5000
        assert roundtrip(client.port(name), data) == data
    # `local = 127.0.0.2`: the upstream connection came from that source address
    server.wait_for(r"connected remote server from 127\.0\.0\.2:\d+")


def test_unresolvable_connect_name_at_start_keeps_running(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    """DNS not up at boot: the name is logged as unresolved, the tunnel starts anyway (as
    stunnel does) and serves its other services; each connection to the unresolved one
    tries the name again and ends with stunnel's line."""
    t = tunnels.start(
        tunnels.conf(
            "[later]\nclient = yes\naccept = 127.0.0.1:0\nconnect = no-such-host.invalid:443\n"
            f"[plain]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\n"
        ),
        impl=impl,
    )
    t.wait_for(r'LOG3\[ui\]: Error resolving "no-such-host\.invalid"')
    for _ in range(2):
        with (
            socket.create_connection(("127.0.0.1", t.port("later")), timeout=15) as s,
            contextlib.suppress(ConnectionResetError),
        ):
            assert s.recv(10) == b""
    t.wait_for(r"LOG3\[\d+\]: No remote host resolved")
    assert t.log.count('Error resolving "no-such-host.invalid"') >= 3  # start-up + once a connection
    assert t.proc.poll() is None
    assert t.stop() == 0
