"""The scenario pytunnel was born from, end to end.

An old server can only send plaintext SMTP with AUTH PLAIN to localhost.  A client-mode
tunnel wraps it in implicit TLS to a real SMTP server (aiosmtpd on an implicit-TLS port,
AUTH PLAIN required).  A real client (smtplib, and swaks) speaks plaintext to the tunnel.
"""

from __future__ import annotations

import hashlib
import smtplib
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from conftest import Certs, TunnelFactory, need_tool

USER, PASSWORD = "moo", "secret"


class Recorder:
    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert session.authenticated, "the server accepted mail without AUTH"
        with self.lock:
            self.messages.append(bytes(envelope.original_content or b""))
        return "250 OK"


def authenticator(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = (
        mechanism == "PLAIN"
        and isinstance(auth_data, LoginPassword)
        and auth_data.login == USER.encode()
        and auth_data.password == PASSWORD.encode()
    )
    return AuthResult(success=ok, handled=False)  # handled=True (the default) sends no 535


class ImplicitTLSController(Controller):
    """aiosmtpd speaking SMTP inside TLS from the first byte (port-465 style)."""

    def factory(self) -> SMTP:  # noqa: D102
        return SMTP(
            self.handler,
            authenticator=authenticator,
            auth_required=True,
            auth_require_tls=False,  # TLS is the socket itself; aiosmtpd cannot see it
            hostname="mail.test",
        )


@pytest.fixture
def smtps(certs: Certs) -> Iterator[tuple[int, Recorder]]:
    yield from _smtps(certs.server_pem)


@pytest.fixture
def untrusted_smtps(certs: Certs) -> Iterator[tuple[int, Recorder]]:
    yield from _smtps(certs.other_server_pem)


def _smtps(cert: Path) -> Iterator[tuple[int, Recorder]]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert))
    rec = Recorder()
    with socket.socket() as probe:  # aiosmtpd's start() needs a concrete port to self-test
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ctl = ImplicitTLSController(rec, hostname="127.0.0.1", port=port, ssl_context=ctx)
    ctl.start()
    try:
        yield port, rec
    finally:
        ctl.stop()


def tunnel_conf(tunnels: TunnelFactory, certs: Certs, port: int) -> Path:
    return tunnels.conf(
        "[smtp]\n"
        "client = yes\n"
        "accept = 127.0.0.1:0\n"
        f"connect = 127.0.0.1:{port}\n"
        "socket = l:TCP_NODELAY=1\n"
        "socket = r:TCP_NODELAY=1\n"
        "verifyChain = yes\n"
        f"CAfile = {certs.ca_pem}\n"
        "checkHost = localhost\n"
        "TIMEOUTclose = 5\n"
    )


def message(tag: str, size: int = 0) -> bytes:
    """CRLF lines, no leading dots: what the server records equals what was sent."""
    body = "".join(f"{tag} line {i:06d} {'x' * 60}\r\n" for i in range(size // 70 + 1))
    return (f"From: moo@lambda.test\r\nTo: wizard@example.test\r\nSubject: {tag}\r\n\r\n" + body).encode()


def send(port: int, msg: bytes, password: str = PASSWORD) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.ehlo("moo.local")
        assert "PLAIN" in client.esmtp_features.get("auth", ""), client.esmtp_features
        client.user, client.password = USER, password
        client.auth("PLAIN", client.auth_plain)
        client.sendmail("moo@lambda.test", ["wizard@example.test"], msg)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_small_message_byte_identical(
    tunnels: TunnelFactory, certs: Certs, smtps: tuple[int, Recorder], impl: str
) -> None:
    port, rec = smtps
    t = tunnels.start(tunnel_conf(tunnels, certs, port), impl=impl)
    msg = message("hello")
    send(t.port("smtp"), msg)
    assert [digest(m) for m in rec.messages] == [digest(msg)]
    t.wait_for(r"Connection closed: \d+ byte\(s\) sent to TLS, \d+ byte\(s\) sent to socket")


def test_multi_mib_message_byte_identical(
    tunnels: TunnelFactory, certs: Certs, smtps: tuple[int, Recorder]
) -> None:
    port, rec = smtps
    t = tunnels.start(tunnel_conf(tunnels, certs, port))
    msg = message("big", 4 * 1024 * 1024)
    assert len(msg) > 4 * 1024 * 1024
    send(t.port("smtp"), msg)
    assert len(rec.messages) == 1
    assert digest(rec.messages[0]) == digest(msg)


def test_twenty_at_once(tunnels: TunnelFactory, certs: Certs, smtps: tuple[int, Recorder], impl: str) -> None:
    port, rec = smtps
    t = tunnels.start(tunnel_conf(tunnels, certs, port), impl=impl)
    msgs = [message(f"parallel-{i}", 20_000 * (i % 4)) for i in range(20)]
    errors: list[BaseException] = []

    def one(m: bytes) -> None:
        try:
            send(t.port("smtp"), m)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(m,)) for m in msgs]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    assert sorted(digest(m) for m in rec.messages) == sorted(digest(m) for m in msgs)


def test_wrong_password_gets_535_and_tunnel_keeps_serving(
    tunnels: TunnelFactory, certs: Certs, smtps: tuple[int, Recorder], impl: str
) -> None:
    port, rec = smtps
    t = tunnels.start(tunnel_conf(tunnels, certs, port), impl=impl)
    with pytest.raises(smtplib.SMTPAuthenticationError) as err:
        send(t.port("smtp"), message("nope"), password="wrong")
    assert err.value.smtp_code == 535
    msg = message("after")
    send(t.port("smtp"), msg)
    assert [digest(m) for m in rec.messages] == [digest(msg)]


def test_untrusted_upstream_is_refused(
    tunnels: TunnelFactory, certs: Certs, untrusted_smtps: tuple[int, Recorder], impl: str
) -> None:
    port, rec = untrusted_smtps
    t = tunnels.start(tunnel_conf(tunnels, certs, port), impl=impl)
    with (
        pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError)),
        smtplib.SMTP("127.0.0.1", t.port("smtp"), timeout=15) as client,
    ):
        client.ehlo("moo.local")
    t.wait_for(r"certificate verify failed")
    assert rec.messages == []


def test_secure_default_refuses_untrusted_upstream_without_verify_options(
    tunnels: TunnelFactory, certs: Certs, untrusted_smtps: tuple[int, Recorder]
) -> None:
    """`pytunnel run` verifies the upstream even when the config says nothing about it."""
    port, rec = untrusted_smtps
    conf = tunnels.conf(f"[smtp]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{port}\n")
    t = tunnels.start(conf, mode="run")
    with (
        pytest.raises((smtplib.SMTPServerDisconnected, ConnectionError)),
        smtplib.SMTP("127.0.0.1", t.port("smtp"), timeout=15) as client,
    ):
        client.ehlo("moo.local")
    t.wait_for(r"certificate verify failed")


def test_swaks_through_the_tunnel(tunnels: TunnelFactory, certs: Certs, smtps: tuple[int, Recorder]) -> None:
    swaks = need_tool("swaks")
    port, rec = smtps
    t = tunnels.start(tunnel_conf(tunnels, certs, port))
    out = subprocess.run(
        [
            swaks,
            "--server", f"127.0.0.1:{t.port('smtp')}",
            "--auth", "PLAIN", "--auth-user", USER, "--auth-password", PASSWORD,
            "--from", "moo@lambda.test", "--to", "wizard@example.test",
            "--header", "Subject: swaks", "--body", "sent by swaks through pytunnel",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "235" in out.stdout  # authentication succeeded
    assert len(rec.messages) == 1
    assert b"sent by swaks through pytunnel" in rec.messages[0]
