"""stunnel's TLS defaults where they differ from OpenSSL's or CPython's, and options that
only make a default: both implementations, the same config, asserted on the wire."""

from __future__ import annotations

import re
import socket
import ssl
import subprocess

import pytest
from conftest import Certs, EchoServer, Tunnel, TunnelFactory, need_tool


def server(tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, extra: str = "") -> Tunnel:
    return tunnels.start(
        tunnels.conf(
            f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n{extra}"
        ),
        impl=impl,
    )


def handshake(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=15)
    s = ctx.wrap_socket(raw, server_hostname="localhost")
    s.sendall(b"ping")
    assert s.recv(4) == b"ping"
    return s


def client_ctx(certs: Certs, cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    if cert:
        ctx.load_cert_chain(str(certs.client_pem))
    return ctx


def s_client(port: int, *args: str) -> str:
    openssl = need_tool("openssl")
    out = subprocess.run(
        [openssl, "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost", *args],
        input=b"",
        capture_output=True,
        timeout=30,
    )
    return (out.stdout + out.stderr).decode(errors="replace")


def test_require_cert_no_keeps_the_certificate_optional(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    """verifyChain makes a client certificate required only by default: with an explicit
    requireCert = no a client without one is served, one with a bad one is not."""
    t = server(tunnels, certs, echo, impl, f"CAfile = {certs.ca_pem}\nverifyChain = yes\nrequireCert = no\n")
    handshake(t.port("srv"), client_ctx(certs)).close()
    handshake(t.port("srv"), client_ctx(certs, cert=True)).close()
    other = client_ctx(certs)
    other.load_cert_chain(str(certs.other_server_pem))
    with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):
        handshake(t.port("srv"), other).close()
    plain = server(tunnels, certs, echo, impl, f"CAfile = {certs.ca_pem}\nverifyChain = yes\n")
    with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):
        handshake(plain.port("srv"), client_ctx(certs)).close()
    # the order of the lines matters, as in stunnel: verifyChain read later requires it again
    before = server(
        tunnels, certs, echo, impl, f"CAfile = {certs.ca_pem}\nrequireCert = no\nverifyChain = yes\n"
    )
    with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):
        handshake(before.port("srv"), client_ctx(certs)).close()


def test_session_lifetime_is_stunnels_300_seconds(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    """sessionCacheTimeout's default is stunnel's 300 s, not OpenSSL's 7200 s."""
    t = server(tunnels, certs, echo, impl)
    ctx = client_ctx(certs)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with handshake(t.port("srv"), ctx) as s:
        assert s.session is not None
        assert s.session.ticket_lifetime_hint == 300
    t2 = server(tunnels, certs, echo, impl, "sessionCacheTimeout = 42\n")
    with handshake(t2.port("srv"), ctx) as s:
        assert s.session is not None
        assert s.session.ticket_lifetime_hint == 42


def test_the_clients_cipher_order_wins(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    """stunnel does not set CIPHER_SERVER_PREFERENCE (CPython does, on every context)."""
    t = server(tunnels, certs, echo, impl)
    ctx = client_ctx(certs)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384")
    with handshake(t.port("srv"), ctx) as s:
        cipher = s.cipher()
        assert cipher is not None and "AES128" in cipher[0], cipher
    pref = server(tunnels, certs, echo, impl, "options = CIPHER_SERVER_PREFERENCE\n")
    with handshake(pref.port("srv"), ctx) as s:
        cipher = s.cipher()
        assert cipher is not None and "AES256" in cipher[0], cipher


def test_client_ca_names_are_sent(tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str) -> None:
    """The CertificateRequest names CAfile's CAs, so a client with several certificates can
    pick the right one."""
    t = server(tunnels, certs, echo, impl, f"CAfile = {certs.ca_pem}\nverifyChain = yes\n")
    out = s_client(t.port("srv"), "-tls1_2")
    assert "Acceptable client certificate CA names" in out, out
    assert "Testing CA" in out.split("Acceptable client certificate CA names")[1].split("Requested")[0]


def test_default_groups_exclude_ffdhe(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    """stunnel's curves default (X25519:P-256:X448:P-521:P-384): a client offering only a
    finite-field group gets no handshake, one offering X25519 does."""
    t = server(tunnels, certs, echo, impl)
    assert "Cipher is (NONE)" in s_client(t.port("srv"), "-tls1_3", "-groups", "ffdhe2048")
    assert "Server Temp Key: X25519" in s_client(t.port("srv"), "-tls1_3", "-groups", "X25519")


def test_seclevel_inside_ciphers_is_honoured(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    """`ciphers = ...@SECLEVEL=0` lets a TLS 1.0 client in (stunnel applies the default
    securityLevel only where ciphers does not say otherwise)."""
    t = server(tunnels, certs, echo, impl, "sslVersion = TLSv1\nciphers = DEFAULT@SECLEVEL=0\n")
    out = s_client(t.port("srv"), "-tls1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert re.search(r"New, TLSv1(\.0)?, Cipher is \w", out), out


def test_timeout_close_is_logged_as_an_error(tunnels: TunnelFactory, certs: Certs, impl: str) -> None:
    """The backend says BYE and closes; the TLS client never answers close_notify: after
    TIMEOUTclose the tunnel gives up with stunnel's LOG3 line."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def backend() -> None:
        c, _ = srv.accept()
        with c:
            c.sendall(b"BYE")

    import threading

    threading.Thread(target=backend, daemon=True).start()
    t = tunnels.start(
        tunnels.conf(
            f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{srv.getsockname()[1]}\n"
            f"cert = {certs.server_pem}\nTIMEOUTclose = 1\n"
        ),
        impl=impl,
    )
    raw = socket.create_connection(("127.0.0.1", t.port("srv")), timeout=15)
    s = client_ctx(certs).wrap_socket(raw, server_hostname="localhost")
    try:
        got = b""
        while chunk := s.recv(100):
            got += chunk
        assert got == b"BYE"  # then close_notify, which this client leaves unanswered
        t.wait_for(r"LOG3\[\d+\]: transfer: s_poll_wait: TIMEOUTclose exceeded: closing")
    finally:
        raw.close()
        srv.close()


@pytest.mark.parametrize(
    ("line", "without_cert"),
    [("verify = 0", True), ("requireCert = yes", False)],
)
def test_a_requested_certificate_that_nobody_verifies(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, line: str, without_cert: bool
) -> None:
    """verify = 0 asks for a client certificate and takes any (or none); requireCert = yes
    alone demands one but takes it from any CA: stunnel's "verification disabled"."""
    t = server(tunnels, certs, echo, impl, f"{line}\n")
    other = client_ctx(certs)
    other.load_cert_chain(str(certs.other_server_pem))  # from a CA the tunnel never heard of
    handshake(t.port("srv"), other).close()
    handshake(t.port("srv"), client_ctx(certs, cert=True)).close()
    if without_cert:
        handshake(t.port("srv"), client_ctx(certs)).close()
    else:
        with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):
            handshake(t.port("srv"), client_ctx(certs)).close()
