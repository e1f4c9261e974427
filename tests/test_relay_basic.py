"""Bytes through a client-mode and a server-mode tunnel, against a real stunnel4 peer."""

from __future__ import annotations

import hashlib
import os

from conftest import Certs, EchoServer, TunnelFactory, roundtrip, xfail_if_stunnel4_truncated


def test_client_mode_through_stunnel4_server(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    server = tunnels.start(
        tunnels.conf(
            f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
        ),
        impl="stunnel4",
    )
    client = tunnels.start(
        tunnels.conf(
            f"[cli]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{server.port('srv')}\n"
            f"verifyChain = yes\nCAfile = {certs.ca_pem}\ncheckHost = localhost\n"
        ),
        impl=impl,
    )
    data = os.urandom(3 * 1024 * 1024)
    back = roundtrip(client.port("cli"), data)
    xfail_if_stunnel4_truncated(impl, data, back)  # stunnel4 on both ends: pytunnel not in the path
    assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
    client.wait_for(r"Connection closed: 3145728 byte\(s\) sent to TLS, 3145728 byte\(s\) sent to socket")
    assert client.stop() == 0


def test_server_mode_behind_stunnel4_client(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    server = tunnels.start(
        tunnels.conf(
            f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
        ),
        impl=impl,
    )
    client = tunnels.start(
        tunnels.conf(
            f"[cli]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{server.port('srv')}\n"
            f"verifyChain = yes\nCAfile = {certs.ca_pem}\ncheckHost = localhost\n"
        ),
        impl="stunnel4",
    )
    data = os.urandom(1024 * 1024) + b"end"
    assert roundtrip(client.port("cli"), data) == data
    server.wait_for(r"TLS accepted: new session negotiated")
    server.wait_for(r"Connection closed: 1048579 byte\(s\) sent to TLS, 1048579 byte\(s\) sent to socket")
    assert server.stop() == 0


def test_client_resumes_the_tls_session_by_default(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    server = tunnels.start(
        tunnels.conf(
            f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
        ),
        impl="stunnel4",
    )
    client = tunnels.start(
        tunnels.conf(
            f"[cli]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{server.port('srv')}\n"
        ),
        impl=impl,
    )
    for i in range(3):
        assert roundtrip(client.port("cli"), b"x" * (i + 1)) == b"x" * (i + 1)
    client.wait_for(r"TLS connected: new session negotiated")
    client.wait_for(r"TLS connected: previous session reused")
    server.wait_for(r"TLS accepted: previous session reused")


def test_session_resume_off(tunnels: TunnelFactory, certs: Certs, echo: EchoServer) -> None:
    server = tunnels.start(
        tunnels.conf(
            f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
        ),
        impl="stunnel4",
    )
    client = tunnels.start(
        tunnels.conf(
            f"[cli]\nclient = yes\nsessionResume = no\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{server.port('srv')}\n"
        )
    )
    for _ in range(3):
        assert roundtrip(client.port("cli"), b"abc") == b"abc"
    client.wait_for(r"(?s)(TLS connected: new session negotiated.*){3}")
    assert "previous session reused" not in client.log


def test_stunnel4_client_resumes_against_pytunnel_server(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer
) -> None:
    server = tunnels.start(
        tunnels.conf(
            f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
        )
    )
    client = tunnels.start(
        tunnels.conf(
            f"[cli]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{server.port('srv')}\n"
        ),
        impl="stunnel4",
    )
    for _ in range(3):
        assert roundtrip(client.port("cli"), b"hello") == b"hello"
    server.wait_for(r"TLS accepted: previous session reused")


def test_enotconn_is_a_peer_reset_not_a_socket_error() -> None:
    """ENOTCONN (write_eof on a socket the peer already reset) ends the connection like
    EPIPE, as stunnel does: not a LOG3 "socket error"."""
    import asyncio
    import errno
    from types import SimpleNamespace

    from tunnel.reasons import CloseReason
    from tunnel.relay import Connection, PlainSide

    lines: list[tuple[int, str]] = []
    owner = SimpleNamespace(
        name="t",
        settings=SimpleNamespace(TIMEOUTidle=43200, TIMEOUTclose=60, reset=True),
        log_conn=lambda level, _id, text, _fields=None: lines.append((level, text)),
        connection_ended=lambda _conn: None,
    )

    async def lose() -> Connection:
        conn = Connection(owner, "1")  # type: ignore[arg-type]
        conn.plain = PlainSide(conn)
        conn.side_lost(conn.plain, OSError(errno.ENOTCONN, os.strerror(errno.ENOTCONN)))
        return conn

    conn = asyncio.run(lose())
    assert conn.reason is CloseReason.PEER_RESET
    assert not [text for level, text in lines if level <= 3], lines
