"""Drop-in parity of the connection-opening paths (issue 16): SNI virtual services verify as
their own section says, a PSK handshake needs no certificate, ``redirect`` logs stunnel's
lines and keeps session resumption.  Every scenario runs the same config file under pytunnel
and stunnel4; PSK runs pytunnel under Python >= 3.13 (.venv313)."""

from __future__ import annotations

import re
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Certs, EchoServer, Tunnel, TunnelFactory, need_py313, need_stunnel, roundtrip
from identity_support import write_crl
from loopback_support import TagServer, free_port

HEX_KEY = "00112233445566778899aabbccddeeff"
# OpenSSL's words for a failed handshake: a redirected client must never cause them
OPENSSL_FAILURES = ("certificate verify failed", "peer did not return a certificate")


@pytest.fixture
def tags() -> Iterator[dict[str, TagServer]]:
    servers = {name: TagServer(f"{name.upper()}:".encode()) for name in ("primary", "virt", "elsewhere")}
    yield servers
    for server in servers.values():
        server.close()


_CONTEXTS: dict[tuple[str, str | None, ssl.TLSVersion | None], ssl.SSLContext] = {}


def tls_client(
    certs: Certs,
    port: int,
    name: str = "localhost",
    cert: Path | None = None,
    session: ssl.SSLSession | None = None,
    version: ssl.TLSVersion | None = None,
) -> tuple[bytes, ssl.SSLSession | None, bool]:
    """One TLS connection sending ``hi``: (reply up to EOF, session, resumed).  A refused
    handshake returns an empty reply.  One context per (certificate, version), so that a
    session resumes on the context it was made with."""
    key = (str(certs.ca_pem), str(cert) if cert else None, version)
    ctx = _CONTEXTS.get(key)
    if ctx is None:
        ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
        ctx.check_hostname = False
        if cert is not None:
            ctx.load_cert_chain(str(cert))
        if version is not None:
            ctx.maximum_version = version
        _CONTEXTS[key] = ctx
    out = b""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as raw:
        try:
            s = ctx.wrap_socket(raw, server_hostname=name, session=session)
        except (ssl.SSLError, OSError):
            return b"", None, False
        with s:
            try:
                s.sendall(b"hi")
                while chunk := s.recv(1000):
                    out += chunk
            except (ssl.SSLError, OSError):
                pass
            return out, s.session, s.session_reused


# ------------------------------------------------------------------ 1. SNI secondaries verify


@pytest.fixture(scope="module")
def virt_pem(certs: Certs) -> Path:
    path = certs.dir / "virt.pem"
    certs.ca.issue_cert("a.example.com").private_key_and_cert_chain_pem.write_to_path(str(path))
    return path


def sni_conf(
    tunnels: TunnelFactory, certs: Certs, tags: dict[str, TagServer], virt_pem: Path, extra: str
) -> Path:
    """A primary that asks for no certificate; a secondary with its own verification."""
    return tunnels.conf(
        f"[primary]\naccept = 127.0.0.1:{free_port()}\nconnect = 127.0.0.1:{tags['primary'].port}\n"
        f"cert = {certs.server_pem}\n"
        f"[virt]\nsni = primary:*.example.com\nconnect = 127.0.0.1:{tags['virt'].port}\n"
        f"cert = {virt_pem}\nCAfile = {certs.ca_pem}\n{extra}"
    )


@pytest.mark.parametrize("option", ["verifyChain", "verifyPeer", "requireCert"])
def test_sni_secondary_asks_for_and_checks_the_client_certificate(
    tunnels: TunnelFactory,
    certs: Certs,
    tags: dict[str, TagServer],
    virt_pem: Path,
    impl: str,
    option: str,
) -> None:
    """OpenSSL's SSL_set_SSL_CTX keeps the primary's verify mode: the secondary's own
    verification must be set on the switched connection, as stunnel's servername callback
    does.  A client with the matching name and a good certificate reaches the secondary."""
    extra = f"{option} = yes\n"
    if option == "verifyPeer":  # the client's own certificate is the one pinned
        extra = f"verifyPeer = yes\nCAfile = {certs.client_pem}\n"
    t = tunnels.start(sni_conf(tunnels, certs, tags, virt_pem, extra), impl=impl)
    port = t.port("primary")
    assert tls_client(certs, port, "a.example.com", cert=certs.client_pem)[0] == b"VIRT:hi"
    t.wait_for(r"SNI: switched to service \[virt\]")
    assert tls_client(certs, port, "a.example.com")[0] == b""  # no certificate: refused
    t.wait_for(r"peer did not return a certificate")
    if option != "requireCert":  # requireCert alone takes any certificate
        assert tls_client(certs, port, "a.example.com", cert=certs.other_server_pem)[0] == b""
        t.wait_for(r"certificate verify failed")
    # the primary still asks nobody for a certificate
    assert tls_client(certs, port, "localhost")[0] == b"PRIMARY:hi"
    assert tags["virt"].connections == 1


def test_sni_secondary_applies_its_redirect_and_subject_checks(
    tunnels: TunnelFactory, certs: Certs, tags: dict[str, TagServer], virt_pem: Path, impl: str
) -> None:
    extra = f"verifyChain = yes\ncheckHost = client.example\nredirect = 127.0.0.1:{tags['elsewhere'].port}\n"
    t = tunnels.start(sni_conf(tunnels, certs, tags, virt_pem, extra), impl=impl)
    port = t.port("primary")
    assert tls_client(certs, port, "a.example.com", cert=certs.client_pem)[0] == b"VIRT:hi"
    assert tls_client(certs, port, "a.example.com", cert=certs.wrong_name_pem)[0] == b"ELSEWHERE:hi"
    assert tls_client(certs, port, "a.example.com", cert=certs.other_server_pem)[0] == b"ELSEWHERE:hi"
    assert tls_client(certs, port, "a.example.com")[0] == b"ELSEWHERE:hi"
    t.wait_for(r"CERT: Subject checks failed")
    assert t.log.count("Redirecting connection") == 3
    assert not any(text in t.log for text in OPENSSL_FAILURES)


def test_sni_secondary_checks_its_crl(
    tunnels: TunnelFactory,
    certs: Certs,
    tags: dict[str, TagServer],
    virt_pem: Path,
    impl: str,
    tmp_path: Path,
) -> None:
    """The secondary's CRLfile: a revoked client certificate is refused on the switched
    connection (the verification flags come with the secondary's context)."""
    revoked = certs.ca.issue_cert("revoked.example")
    revoked_pem = tmp_path / "revoked.pem"
    revoked.private_key_and_cert_chain_pem.write_to_path(str(revoked_pem))
    crl_pem = write_crl(certs.ca, revoked, tmp_path / "crl.pem")
    extra = f"verifyChain = yes\nCRLfile = {crl_pem}\n"
    t = tunnels.start(sni_conf(tunnels, certs, tags, virt_pem, extra), impl=impl)
    port = t.port("primary")
    assert tls_client(certs, port, "a.example.com", cert=certs.client_pem)[0] == b"VIRT:hi"
    assert tls_client(certs, port, "a.example.com", cert=revoked_pem)[0] == b""
    t.wait_for(r"certificate revoked")


# ------------------------------------------------------------------ 2. PSK and requireCert


def psk_file(tmp_path: Path) -> Path:
    path = tmp_path / "psk.txt"
    path.write_text(f"alice:{HEX_KEY}\n")
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    ("client_impl", "server_impl"),
    [("pytunnel", "stunnel4"), ("stunnel4", "pytunnel"), ("pytunnel", "pytunnel")],
)
@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
def test_psk_authenticates_without_a_certificate(
    tmp_path: Path,
    tunnels: TunnelFactory,
    echo: EchoServer,
    certs: Certs,
    client_impl: str,
    server_impl: str,
    version: str,
) -> None:
    """requireCert = yes in the global section (so inherited by the service) with
    PSKsecrets: a PSK handshake authenticates the peer, no certificate is asked for; a
    client with verifyChain = yes in its global section needs none from the server either.
    (A server with a certificate as well may run a certificate handshake instead in TLS 1.3,
    where OpenSSL skips a PSK whose hash does not fit the suite; then a certificate is asked
    for, by stunnel as by pytunnel.)"""
    need_stunnel()
    py = need_py313()
    psk = psk_file(tmp_path)
    server = tunnels.start(
        tunnels.conf(
            f"requireCert = yes\n[s]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\n"
            f"PSKsecrets = {psk}\n"
        ),
        impl=server_impl,
        python=py,
    )
    client = tunnels.start(
        tunnels.conf(
            f"verifyChain = yes\nCAfile = {certs.ca_pem}\n"
            f"[c]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{server.port('s')}\n"
            f"PSKsecrets = {psk}\nsslVersionMax = {version}\n"
        ),
        impl=client_impl,
        python=py,
    )
    got = roundtrip(client.port("c"), b"by key")
    assert got == b"by key", f"client:\n{client.log}\nserver:\n{server.log}"
    server.wait_for(r'Key configured for PSK identity "alice"')
    for t in (client, server):
        assert "peer did not return a certificate" not in t.log


# ------------------------------------------------------------------ 3. redirect: lines, resumption


def redirect_tunnel(tunnels: TunnelFactory, certs: Certs, tags: dict[str, TagServer], impl: str) -> Tunnel:
    conf = tunnels.conf(
        f"[r]\naccept = 127.0.0.1:{free_port()}\nconnect = 127.0.0.1:{tags['primary'].port}\n"
        f"redirect = 127.0.0.1:{tags['elsewhere'].port}\ncert = {certs.server_pem}\n"
        f"CAfile = {certs.ca_pem}\nverifyChain = yes\n"
    )
    return tunnels.start(conf, impl=impl)


def test_redirect_logs_stunnels_lines_never_openssls(
    tunnels: TunnelFactory, certs: Certs, tags: dict[str, TagServer], impl: str
) -> None:
    t = redirect_tunnel(tunnels, certs, tags, impl)
    port = t.port("r")
    assert tls_client(certs, port)[0] == b"ELSEWHERE:hi"
    assert tls_client(certs, port, cert=certs.other_server_pem)[0] == b"ELSEWHERE:hi"
    t.wait_for(r"LOG4\[\d+\]: CERT: Pre-verification error: unable to get local issuer certificate")
    t.wait_for(r"LOG4\[\d+\]: Rejected by CERT at depth=0: .*Testing cert")
    t.wait_for(r"LOG5\[\d+\]: Redirecting connection")
    assert t.log.count("Redirecting connection") == 2
    assert not any(text in t.log for text in OPENSSL_FAILURES)
    assert "LOG3" not in t.log.split("Accepting new connections", 1)[1]


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_redirect_keeps_resumption_and_remembers_who_was_authenticated(
    tunnels: TunnelFactory, certs: Certs, tags: dict[str, TagServer], impl: str, version: ssl.TLSVersion
) -> None:
    """stunnel keeps resumption on with redirect: a resumed session of an authenticated
    client is served normally, one of a redirected client (no certificate, or a bad one)
    is redirected again."""
    t = redirect_tunnel(tunnels, certs, tags, impl)
    port = t.port("r")
    for cert, tag in (
        (certs.client_pem, b"PRIMARY:hi"),
        (None, b"ELSEWHERE:hi"),
        (certs.other_server_pem, b"ELSEWHERE:hi"),
    ):
        reply, session, _ = tls_client(certs, port, cert=cert, version=version)
        assert reply == tag
        for _ in range(2):
            reply, session, resumed = tls_client(certs, port, cert=cert, session=session, version=version)
            assert (reply, resumed) == (tag, True), cert
    assert tags["primary"].connections == 3
    assert t.log.count("Redirecting connection") == 6
    assert len(re.findall(r"TLS accepted: previous session reused", t.log)) == 6
    assert not any(text in t.log for text in OPENSSL_FAILURES)


# ------------------------------------------------------------------ 6. start-up lines


def test_startup_lines_are_stunnels(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    """debug = 7: the per-service lines stunnel prints while it builds its contexts, in its
    words and levels (people diff these logs when they switch)."""
    conf = tunnels.conf(
        f"debug = 7\n[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
        f"CAfile = {certs.ca_pem}\nverifyChain = yes\n"
        "[cli]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\nsessionResume = no\n"
    )
    t = tunnels.start(conf, impl=impl)
    t.wait_for(r"Accepting new connections")
    pem = re.escape(str(certs.server_pem))
    expected = [
        r"LOG6\[ui\]: Initializing service \[srv\]",
        r"LOG6\[ui\]: OpenSSL security level is used: 2",
        r"LOG7\[ui\]: Ciphers: HIGH:!aNULL:!SSLv2:!DH:!kDHEPSK",
        r"LOG7\[ui\]: TLSv1\.3 ciphersuites: TLS_AES_256_GCM_SHA384:TLS_AES_128_GCM_SHA256:TLS_CHACHA20_POLY1305_SHA256",
        r"LOG7\[ui\]: TLS options: 0x[0-9a-f]+ \(\+0x0, -0x0\)",
        r"LOG6\[ui\]: Session resumption enabled",
        rf"LOG6\[ui\]: Loading certificate from file: {pem}",
        rf"LOG6\[ui\]: Certificate loaded from file: {pem}",
        rf"LOG6\[ui\]: Private key loaded from file: {pem}",
        r"LOG7\[ui\]: Private key check succeeded",
        r"LOG6\[ui\]: Configured trusted client CA: O=trustme.*Testing CA #\S+",
        r"LOG6\[ui\]: DH initialization skipped: no DH ciphersuites",
        r"LOG7\[ui\]: ECDH initialized with curves X25519:P-256:X448:P-521:P-384",
        r"LOG6\[ui\]: Initializing service \[cli\]",
        r"LOG6\[ui\]: Session resumption disabled",
        r"LOG7\[ui\]: No certificate or private key specified",
        r"LOG3\[ui\]: No trusted certificates found",
        r"LOG6\[ui\]: DH initialization skipped: client section",
        r"LOG7\[ui\]: Binding service \[srv\]",
        r"LOG7\[ui\]: No pid file being created",
    ]
    missing = [line for line in expected if not re.search(line + "$", t.log, re.M)]
    assert not missing, f"{missing}\n{t.log}"
