"""ident = USER (RFC 1413): a real identd on 127.0.0.1:113 answers for the client's port."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Certs, EchoServer, TunnelFactory, need_root
from loopback_support import Listener


class Identd(Listener):
    """Answers every query with ``user``, and records the queries (as the RFC writes them)."""

    def __init__(self, user: str) -> None:
        self.user = user
        self.queries: list[str] = []
        super().__init__(backlog=16, port=113)

    def handle(self, s: Any) -> None:
        query = s.makefile("rb").readline().decode().strip()
        self.queries.append(query)
        s.sendall(f"{query} : USERID : UNIX : {self.user}\r\n".encode())


@pytest.fixture
def identd() -> Iterator[Identd]:
    need_root("port 113")
    d = Identd("alice")
    yield d
    d.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept() so the port is free for the next test
    d.sock.close()


def conf(tunnels: TunnelFactory, certs: Certs, echo: EchoServer, user: str) -> object:
    return tunnels.conf(
        f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
        f"ident = {user}\n"
    )


def tls_echo(port: int, certs: Certs, data: bytes) -> tuple[bytes, int]:
    """(echo, client port); a refused client gets b"" (both refuse before the handshake:
    no byte reaches the server)."""
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        client_port = raw.getsockname()[1]
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(data)
                return s.recv(len(data)), client_port
        except (ConnectionResetError, ssl.SSLError):
            return b"", client_port


def test_ident_user_matches(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, identd: Identd, impl: str
) -> None:
    t = tunnels.start(conf(tunnels, certs, echo, "alice"), impl=impl)  # type: ignore[arg-type]
    got, client_port = tls_echo(t.port("srv"), certs, b"who am i")
    assert got == b"who am i"
    # RFC 1413 query: the client's port, then the port it connected to (stunnel 5.68 sends 0
    # for the second; pytunnel the real one)
    local = t.port("srv") if impl == "pytunnel" else 0
    assert identd.queries == [f"{client_port} , {local}"]
    t.wait_for("IDENT authentication passed")
    t.wait_for(r"TLS accepted")
    # identd is asked first, then the connection counts as accepted (stunnel's order)
    assert t.log.index("IDENT authentication passed") < t.log.index("accepted connection from")
    assert t.stop() == 0


def test_ident_user_mismatch_is_refused(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, identd: Identd, impl: str
) -> None:
    t = tunnels.start(conf(tunnels, certs, echo, "bob"), impl=impl)  # type: ignore[arg-type]
    got, _ = tls_echo(t.port("srv"), certs, b"let me in")
    assert got == b""
    t.wait_for(r'REFUSED by IDENT \(user "alice"\)')
    assert echo.received == 0  # nothing reached the server
    assert "accepted connection from" not in t.log  # log watchers count no refused client
    assert "TLS accepted" not in t.log  # and it got no handshake
    assert t.stop() == 0
