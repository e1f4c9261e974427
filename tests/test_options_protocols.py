"""Protocol-level options run for real, against real peers: ``protocolAuthentication`` in an
SMTP client tunnel (what the mail server is sent), ``OCSPnonce`` in a client tunnel asking
a responder (what is sent, and which answers are taken), and the PROXY header received by
HAProxy with ``accept-proxy`` (stunnel's v1 under both implementations, pytunnel's v2).
"""

from __future__ import annotations

import base64
import os
import re
import smtplib
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Certs, EchoServer, TunnelFactory, need_tool, roundtrip, stunnel4_lacks
from cryptography import x509
from cryptography.x509 import ocsp
from loopback_support import Listener, free_port, refused
from test_ocsp import FakeResponder, Pki, fake, fetch_real, forge, http_ok, pki  # noqa: F401 - fixtures
from test_ocsp_tunnel import pem_pair, server_for

USER, PASSWORD = "moo", "secret"


# ------------------------------------------------------------------ protocolAuthentication


class MailServer(Listener):
    """A small SMTP server with STARTTLS and AUTH PLAIN/LOGIN that takes HELO as well as EHLO
    (stunnel 5.68 greets with HELO after STARTTLS) and keeps every command it is sent."""

    timeout = 30.0

    def __init__(self, certs: Certs) -> None:
        self.starttls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.starttls.load_cert_chain(str(certs.server_pem))
        self.commands: list[tuple[bool, str]] = []  # (inside TLS, line)
        self.authenticated: list[str] = []  # the mechanisms that succeeded
        self.messages: list[bytes] = []
        super().__init__(backlog=8)

    def handle(self, conn: Any) -> None:
        f = conn.makefile("rwb")
        tls = False

        def say(*lines: str) -> None:
            f.write(b"".join(line.encode() + b"\r\n" for line in lines))
            f.flush()

        def hear() -> str:
            line = f.readline().decode().rstrip("\r\n")
            self.commands.append((tls, line))
            return line

        try:
            say("220 mail.test ESMTP")
            while line := hear():
                verb = line.split(" ")[0].upper()
                if verb == "EHLO":
                    say(
                        "250-mail.test", "250-AUTH PLAIN LOGIN", "250 STARTTLS" if not tls else "250 8BITMIME"
                    )
                elif verb == "HELO":
                    say("250 mail.test")
                elif verb == "STARTTLS":
                    say("220 go ahead")
                    conn = self.starttls.wrap_socket(conn, server_side=True)
                    f, tls = conn.makefile("rwb"), True
                elif verb == "AUTH":
                    self._auth(line, say, hear)
                elif verb == "DATA":
                    say("354 go on")
                    body = b""
                    while (chunk := f.readline()) not in (b".\r\n", b""):
                        body += chunk
                    self.messages.append(body)
                    say("250 queued")
                elif verb == "QUIT":
                    say("221 bye")
                    return
                else:
                    say("250 ok")
        except (OSError, ValueError):
            return
        finally:
            conn.close()

    def _auth(self, line: str, say: Callable[..., None], hear: Callable[[], str]) -> None:
        parts = line.split(" ")
        if parts[1].upper() == "PLAIN":
            ok = base64.b64decode(parts[2]) == b"\0" + USER.encode() + b"\0" + PASSWORD.encode()
        else:
            say("334 VXNlcm5hbWU6")
            user = base64.b64decode(hear())
            say("334 UGFzc3dvcmQ6")
            ok = (user, base64.b64decode(hear())) == (USER.encode(), PASSWORD.encode())
        if ok:
            self.authenticated.append(parts[1].upper())
        say("235 ok" if ok else "535 no")


@pytest.fixture
def mail_server(certs: Certs) -> Iterator[MailServer]:
    server = MailServer(certs)
    yield server
    server.close()


@pytest.mark.parametrize("auth", ["plain", "login", None])
def test_protocol_authentication(
    tunnels: TunnelFactory, certs: Certs, mail_server: MailServer, impl: str, auth: str | None
) -> None:
    """protocol = smtp with protocolUsername/Password: after STARTTLS the tunnel logs in
    with the configured mechanism (AUTH PLAIN with the token, or AUTH LOGIN), PLAIN when
    none is given; the app's own mail then goes through unauthenticated by it."""
    conf = tunnels.conf(
        f"[smtp]\nclient = yes\nprotocol = smtp\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{mail_server.port}\n"
        f"verifyChain = yes\nCAfile = {certs.ca_pem}\ncheckHost = localhost\n"
        f"protocolUsername = {USER}\nprotocolPassword = {PASSWORD}\n"
        + (f"protocolAuthentication = {auth}\n" if auth else "")
    )
    t = tunnels.start(conf, impl=impl)
    with smtplib.SMTP("127.0.0.1", t.port("smtp"), timeout=30) as client:
        client.ehlo("app.local")
        client.sendmail("moo@lambda.test", ["wizard@example.test"], b"Subject: auth\r\n\r\nbody\r\n")
    assert mail_server.messages == [b"Subject: auth\r\n\r\nbody\r\n"]
    mechanism = (auth or "plain").upper()
    assert mail_server.authenticated == [mechanism]
    auth_lines = [line for inside, line in mail_server.commands if line.upper().startswith("AUTH")]
    assert all(inside for inside, line in mail_server.commands if line.upper().startswith("AUTH"))
    if mechanism == "PLAIN":
        token = base64.b64encode(b"\0" + USER.encode() + b"\0" + PASSWORD.encode()).decode()
        assert auth_lines == [f"AUTH PLAIN {token}"]
    else:
        assert auth_lines == ["AUTH LOGIN"]
    assert PASSWORD not in t.log


# ------------------------------------------------------------------ OCSPnonce


def nonce_of(request_der: bytes) -> bytes | None:
    try:
        ext = ocsp.load_der_ocsp_request(request_der).extensions.get_extension_for_class(x509.OCSPNonce)
    except x509.ExtensionNotFound:
        return None
    return ext.value.nonce


@pytest.mark.parametrize(
    ("nonce", "answer", "passes"),
    [
        (True, "echo", True),
        (True, "none", False),  # a replayed (or nonce-less) response
        (True, "wrong", False),
        (False, "none", True),
    ],
)
def test_ocsp_nonce_through_a_tunnel(
    pki: Pki,  # noqa: F811
    fake: Callable[..., FakeResponder],  # noqa: F811
    tunnels: TunnelFactory,
    echo: EchoServer,
    impl: str,
    nonce: bool,
    answer: str,
    passes: bool,
) -> None:
    """Client mode, OCSP = a responder: OCSPnonce = yes puts a nonce in each request and
    takes only a response that echoes it; OCSPnonce = no sends none and takes a response
    without one."""
    requests: list[bytes] = []
    genuine = fetch_real(pki.url["ca"], pki.leaf_good, pki.root)

    def respond(req: bytes) -> bytes:
        requests.append(req)
        if answer == "echo":
            return http_ok(forge(pki, req))
        if answer == "wrong":
            return http_ok(forge(pki, req, nonce=b"y" * 16))
        return http_ok(genuine)

    responder = fake(respond)
    upstream = server_for(tunnels, echo, pem_pair(pki, "good", pki.leaf_good, pki.leaf_good_key))
    conf = tunnels.conf(
        f"[c]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{upstream}\n"
        f"verifyChain = yes\nCAfile = {pki.dir / 'root.pem'}\ncheckHost = localhost\n"
        f"OCSP = {responder.url}\nOCSPnonce = {'yes' if nonce else 'no'}\n"
    )
    t = tunnels.start(conf, impl=impl)
    if passes:
        assert roundtrip(t.port("c"), b"nonce" * 1000) == b"nonce" * 1000
    else:
        assert refused(t.port("c"), half_close=True)
    assert requests, "the responder was never asked"
    assert [nonce_of(r) is not None for r in requests] == [nonce] * len(requests)


# ------------------------------------------------------------------ PROXY header to HAProxy


class HAProxy:
    """HAProxy in TCP mode, ``bind ... accept-proxy`` in front of a backend; it logs each
    connection's client and destination as it read them from the PROXY header."""

    def __init__(self, backend: int, tmp: Path) -> None:
        self.port = free_port()
        cfg = tmp / "haproxy.cfg"
        cfg.write_text(
            "global\n  log stdout format raw local0\n"
            "defaults\n  mode tcp\n  log global\n  timeout connect 5s\n  timeout client 30s\n"
            "  timeout server 30s\n"
            '  log-format "proxied client=%ci:%cp dst=%fi:%fp bytes=%B"\n'
            f"frontend f\n  bind 127.0.0.1:{self.port} accept-proxy\n  default_backend b\n"
            f"backend b\n  server s1 127.0.0.1:{backend}\n"
        )
        self.log_path = tmp / "haproxy.log"
        self.fh = open(self.log_path, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [need_tool("haproxy"), "-db", "-f", str(cfg)], stdout=self.fh, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                assert self.proc.poll() is None and time.monotonic() < deadline, self.log
                time.sleep(0.05)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if m := re.search(pattern, self.log):
                return m
            time.sleep(0.02)
        raise AssertionError(f"haproxy never logged /{pattern}/:\n{self.log}")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.fh.close()


@pytest.fixture
def haproxy(echo: EchoServer, tmp_path: Path) -> Iterator[HAProxy]:
    server = HAProxy(echo.port, tmp_path)
    yield server
    server.close()


@pytest.mark.parametrize("protocol", ["proxy", "proxy-v2"])
def test_haproxy_accepts_the_proxy_header(
    tunnels: TunnelFactory, certs: Certs, haproxy: HAProxy, impl: str, protocol: str
) -> None:
    """HAProxy with accept-proxy reads the header the tunnel sends: the connection is
    relayed to its backend, and HAProxy logs the tunnel's client as the client."""
    if impl == "stunnel4" and protocol == "proxy-v2":
        stunnel4_lacks("protocol = proxy-v2 (it sends only the v1 text header)")
    conf = tunnels.conf(
        f"[p]\nprotocol = {protocol}\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{haproxy.port}\n"
        f"cert = {certs.server_pem}\n"
    )
    t = tunnels.start(conf, impl=impl)
    port = t.port("p")
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    data = os.urandom(50_000)
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        cport = raw.getsockname()[1]
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            got = b""
            for at in range(0, len(data), 10_000):
                s.sendall(data[at : at + 10_000])
                while len(got) < at + 10_000:
                    chunk = s.recv(65536)
                    assert chunk, "haproxy closed the connection (a header it did not accept?)"
                    got += chunk
    assert got == data
    haproxy.wait_for(rf"proxied client=127\.0\.0\.1:{cport} dst=127\.0\.0\.1:{port} ")
