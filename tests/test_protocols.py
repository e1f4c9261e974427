"""``protocol =``: STARTTLS and friends, against real servers, under pytunnel and stunnel4.

SMTP: aiosmtpd with STARTTLS (port-587 style, AUTH only after TLS) as the upstream of a
client-mode tunnel; smtplib speaks plaintext to the tunnel, as the origin scenario's old
server does.  Server mode: smtplib does STARTTLS against the tunnel, which relays to a
plaintext aiosmtpd.
"""

from __future__ import annotations

import smtplib
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session
from conftest import Certs, TunnelFactory, stunnel4_lacks
from loopback_support import free_port

USER, PASSWORD = "moo", "secret"


class Recorder:
    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.tls_seen: list[bool] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.lock:
            self.messages.append(bytes(envelope.original_content or b""))
            self.tls_seen.append(session.ssl is not None)
        return "250 OK"


def authenticator(
    server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = (
        mechanism in ("PLAIN", "LOGIN")
        and isinstance(auth_data, LoginPassword)
        and auth_data.login == USER.encode()
        and auth_data.password == PASSWORD.encode()
    )
    return AuthResult(success=ok, handled=False)


class StartTLSController(Controller):
    """aiosmtpd offering STARTTLS and requiring it before AUTH and mail."""

    def __init__(self, handler: Recorder, port: int, tls: ssl.SSLContext | None, **kw: Any) -> None:
        self.tls = tls
        super().__init__(handler, hostname="127.0.0.1", port=port, **kw)

    def factory(self) -> SMTP:  # noqa: D102
        if self.tls is None:
            return SMTP(self.handler, hostname="mail.test")
        return SMTP(
            self.handler,
            tls_context=self.tls,
            require_starttls=True,
            authenticator=authenticator,
            auth_required=True,
            auth_require_tls=True,
            hostname="mail.test",
        )


@pytest.fixture
def starttls_server(certs: Certs) -> Iterator[tuple[int, Recorder]]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(certs.server_pem))
    rec = Recorder()
    port = free_port()
    ctl = StartTLSController(rec, port, ctx)
    ctl.start()
    try:
        yield port, rec
    finally:
        ctl.stop()


@pytest.fixture
def plain_smtp() -> Iterator[tuple[int, Recorder]]:
    rec = Recorder()
    port = free_port()
    ctl = StartTLSController(rec, port, None)
    ctl.start()
    try:
        yield port, rec
    finally:
        ctl.stop()


MESSAGE = b"From: moo@lambda.test\r\nTo: wizard@example.test\r\nSubject: starttls\r\n\r\nbody line\r\n"


def smtp_client_conf(tunnels: TunnelFactory, certs: Certs, port: int, extra: str = "") -> Any:
    return tunnels.conf(
        "[smtp]\nclient = yes\nprotocol = smtp\naccept = 127.0.0.1:0\n"
        f"connect = 127.0.0.1:{port}\nverifyChain = yes\nCAfile = {certs.ca_pem}\n"
        f"checkHost = localhost\n{extra}"
    )


def test_smtp_client_starttls(
    tunnels: TunnelFactory, certs: Certs, starttls_server: tuple[int, Recorder], impl: str
) -> None:
    """The app speaks plaintext SMTP with AUTH PLAIN; the upstream gets it inside STARTTLS."""
    port, rec = starttls_server
    t = tunnels.start(smtp_client_conf(tunnels, certs, port), impl=impl)
    with smtplib.SMTP("127.0.0.1", t.port("smtp"), timeout=30) as client:
        code, banner = client.ehlo("moo.local")
        assert code == 250
        # the upstream's greeting reached the app unchanged; the EHLO reply is from inside TLS
        assert "STARTTLS" not in client.esmtp_features  # already inside TLS
        client.login(USER, PASSWORD)
        client.sendmail("moo@lambda.test", ["wizard@example.test"], MESSAGE)
    assert rec.messages == [MESSAGE]
    assert rec.tls_seen == [True]
    t.wait_for(r"TLS connected: new session negotiated")
    assert t.stop() == 0


def test_smtp_client_auth_by_the_tunnel(
    tunnels: TunnelFactory, certs: Certs, starttls_server: tuple[int, Recorder], impl: str
) -> None:
    """protocolUsername/protocolPassword: the tunnel authenticates (stunnel's smtp late phase)."""
    if impl == "stunnel4":
        stunnel4_lacks(
            "it greets with HELO after STARTTLS, and aiosmtpd, as RFC 4954 wants, "
            "knows AUTH only after EHLO (pytunnel sends EHLO there)"
        )
    port, rec = starttls_server
    conf = smtp_client_conf(
        tunnels,
        certs,
        port,
        f"protocolUsername = {USER}\nprotocolPassword = {PASSWORD}\nprotocolAuthentication = login\n",
    )
    t = tunnels.start(conf, impl=impl)
    with smtplib.SMTP("127.0.0.1", t.port("smtp"), timeout=30) as client:
        client.ehlo("moo.local")
        client.sendmail("moo@lambda.test", ["wizard@example.test"], MESSAGE)  # no login of its own
    assert rec.messages == [MESSAGE]
    assert t.stop() == 0
    assert PASSWORD not in t.log


def test_smtp_client_upstream_without_starttls_fails_one_connection(
    tunnels: TunnelFactory, certs: Certs, plain_smtp: tuple[int, Recorder], impl: str
) -> None:
    port, _ = plain_smtp
    t = tunnels.start(smtp_client_conf(tunnels, certs, port), impl=impl)
    got = b""
    for _ in range(5):
        # the tunnel relays the greeting, finds no STARTTLS and resets (reset = yes); on a
        # loaded machine all of that can happen before connect() returns here, and then
        # connect() itself reports the reset: that attempt saw nothing, so try again
        try:
            s = socket.create_connection(("127.0.0.1", t.port("smtp")), timeout=10)
        except ConnectionResetError:
            continue
        with s:
            try:
                while chunk := s.recv(1000):
                    got += chunk
            except ConnectionResetError:
                pass
        break
    assert got.startswith(b"220 ")
    t.wait_for("Remote server is not RFC 2487 compliant")
    assert t.proc.poll() is None  # still serving
    assert t.stop() == 0


def smtp_server_conf(tunnels: TunnelFactory, certs: Certs, port: int) -> Any:
    return tunnels.conf(
        f"[smtps]\nprotocol = smtp\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{port}\ncert = {certs.server_pem}\n"
    )


def test_smtp_server_starttls(
    tunnels: TunnelFactory, certs: Certs, plain_smtp: tuple[int, Recorder], impl: str
) -> None:
    """A STARTTLS client meets the tunnel; the plaintext server behind it gets the mail."""
    port, rec = plain_smtp
    t = tunnels.start(smtp_server_conf(tunnels, certs, port), impl=impl)
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    with smtplib.SMTP("localhost", t.port("smtps"), timeout=30) as client:
        code, _ = client.ehlo("app.local")
        assert code == 250 and "starttls" in client.esmtp_features
        client.starttls(context=ctx)
        client.ehlo("app.local")
        client.sendmail("app@test", ["x@test"], MESSAGE)
    assert rec.messages == [MESSAGE]
    assert t.stop() == 0


def test_smtp_server_without_starttls_is_implicit_tls(
    tunnels: TunnelFactory, certs: Certs, plain_smtp: tuple[int, Recorder], impl: str
) -> None:
    """RFC 2487 detection: a client that speaks first (a TLS ClientHello) gets plain TLS."""
    port, rec = plain_smtp
    t = tunnels.start(smtp_server_conf(tunnels, certs, port), impl=impl)
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    with smtplib.SMTP_SSL("localhost", t.port("smtps"), timeout=30, context=ctx) as client:
        client.ehlo("app.local")
        client.sendmail("app@test", ["x@test"], MESSAGE)
    assert rec.messages == [MESSAGE]
    assert t.stop() == 0


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("client = yes\nprotocol = gopher\n", "Protocol not supported"),
        ("client = yes\nprotocol = capwin\n", "Windows"),
        ("client = yes\nprotocol = smtp\nprotocolAuthentication = ntlm\n", "protocolAuthentication = ntlm"),
        ("client = yes\nprotocol =\n", "Protocol not supported"),
        ("client = yes\nprotocol = connect\nprotocolAuthentication = digest\n", "use one of: basic"),
    ],
)
def test_protocol_config_errors(tunnels: TunnelFactory, body: str, needle: str) -> None:
    conf = tunnels.conf(f"[x]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\n{body}")
    t = tunnels.start(conf, wait=False)
    assert t.proc.wait(20) == 1
    assert needle in t.log
    assert "Configuration failed" in t.log


@pytest.mark.parametrize(
    ("body", "warning"),
    [
        (
            "protocolHost = mail.example\nprotocolHeader = X-A: b\n",
            "protocolHost, protocolHeader have no effect",
        ),
        ("protocol = smtp\nprotocolAuthentication = basic\n", "plain is used, as stunnel does"),
    ],
)
def test_protocol_options_stunnel_starts_with(
    tunnels: TunnelFactory, body: str, warning: str, impl: str
) -> None:
    """Lines stunnel 5.68 starts with although they change nothing (or mean plain): a
    stunnel config keeps working, and pytunnel says what they do."""
    conf = tunnels.conf(f"[x]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\n{body}")
    t = tunnels.start(conf, impl=impl)
    t.wait_for("Accepting new connections" if impl == "pytunnel" else "Configuration successful")
    if impl == "pytunnel":
        assert warning in t.log
    assert t.stop() == 0
