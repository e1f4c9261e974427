"""Certificate verification, both modes, asserted on what the app sees and on the log line.

Client-mode cases run the tunnel under test (pytunnel or stunnel4, same config) against a
stunnel4 TLS server; server-mode cases put Python's ssl module in front as the TLS client.
After every refusal the same process still serves a good connection."""

from __future__ import annotations

import datetime
import shutil
import socket
import ssl
import subprocess
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from conftest import Certs, EchoServer, Tunnel, TunnelFactory, need_tool, roundtrip
from identity_support import write_crl
from loopback_support import refused


@dataclass
class Extra:
    expired_pem: Path
    revoked_pem: Path
    crl_pem: Path
    leaf_only_pem: Path  # the server cert alone (no key) for verifyPeer pinning


@pytest.fixture(scope="module")
def extra(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Extra:
    d = tmp_path_factory.mktemp("extra")
    now = datetime.datetime.now(datetime.UTC)
    expired = certs.ca.issue_cert(
        "localhost",
        "127.0.0.1",
        not_before=now - datetime.timedelta(days=30),
        not_after=now - datetime.timedelta(days=1),
    )
    expired.private_key_and_cert_chain_pem.write_to_path(str(d / "expired.pem"))
    revoked = certs.ca.issue_cert("localhost", "127.0.0.1")
    revoked.private_key_and_cert_chain_pem.write_to_path(str(d / "revoked.pem"))
    write_crl(certs.ca, revoked, d / "crl.pem")
    # the leaf certificate of certs.server_pem, alone
    server_chain = certs.server_pem.read_bytes()
    start = server_chain.index(b"-----BEGIN CERTIFICATE-----")
    end = server_chain.index(b"-----END CERTIFICATE-----") + len(b"-----END CERTIFICATE-----\n")
    (d / "leaf.pem").write_bytes(server_chain[start:end])
    return Extra(d / "expired.pem", d / "revoked.pem", d / "crl.pem", d / "leaf.pem")


def tls_server(tunnels: TunnelFactory, echo: EchoServer, cert: Path) -> Tunnel:
    """A stunnel4 TLS server in front of the echo backend."""
    return tunnels.start(
        tunnels.conf(f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {cert}\n"),
        impl="stunnel4",
    )


def client_tunnel(
    tunnels: TunnelFactory, impl: str, server: Tunnel, verify: str, mode: str = "compat"
) -> Tunnel:
    body = f"[cli]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{server.port('srv')}\n{verify}"
    return tunnels.start(tunnels.conf(body), impl=impl, mode=mode)


def good(port: int) -> None:
    assert roundtrip(port, b"still serving") == b"still serving"


# ------------------------------------------------------------------ client mode


def test_good_chain_and_host(tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str) -> None:
    server = tls_server(tunnels, echo, certs.server_pem)
    t = client_tunnel(
        tunnels,
        impl,
        server,
        f"verifyChain = yes\nCAfile = {certs.ca_pem}\ncheckHost = localhost\nsni = localhost\n",
    )
    good(t.port("cli"))
    # stunnel's line for the verified peer (tools learn who is on the other end from it)
    t.wait_for(r"LOG5\[\d+\]: Certificate accepted at depth=0: O=trustme[^,]*, OU=Testing cert #")
    t.wait_for(r"LOG6\[\d+\]: SNI: sending servername: localhost$")
    t.wait_for(r"LOG6\[\d+\]: TLSv1\.3 ciphersuite: TLS_AES_256_GCM_SHA384 \(256-bit encryption\)")


def test_unknown_ca_is_refused(tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str) -> None:
    bad_server = tls_server(tunnels, echo, certs.other_server_pem)
    t = client_tunnel(tunnels, impl, bad_server, f"verifyChain = yes\nCAfile = {certs.ca_pem}\n")
    assert refused(t.port("cli"))
    t.wait_for(r"certificate verify failed")
    assert echo.received == 0


def test_wrong_host_name_is_refused(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    server = tls_server(tunnels, echo, certs.server_pem)
    t = client_tunnel(
        tunnels, impl, server, f"verifyChain = yes\nCAfile = {certs.ca_pem}\ncheckHost = other.example\n"
    )
    assert refused(t.port("cli"))
    t.wait_for(r"CERT: Subject checks failed")
    t.wait_for(r"LOG4\[\d+\]: Rejected by CERT at depth=0: O=trustme[^,]*, OU=Testing cert #")
    t.wait_for(r"certificate verify failed")
    assert echo.received == 0


def test_check_ip(tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str) -> None:
    server = tls_server(tunnels, echo, certs.server_pem)
    t = client_tunnel(
        tunnels, impl, server, f"verifyChain = yes\nCAfile = {certs.ca_pem}\ncheckIP = 127.0.0.1\n"
    )
    good(t.port("cli"))
    t2 = client_tunnel(
        tunnels, impl, server, f"verifyChain = yes\nCAfile = {certs.ca_pem}\ncheckIP = 127.0.0.9\n"
    )
    assert refused(t2.port("cli"))


def test_verify_peer_pins_the_leaf(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, extra: Extra, impl: str
) -> None:
    server = tls_server(tunnels, echo, certs.server_pem)
    t = client_tunnel(tunnels, impl, server, f"verifyPeer = yes\nCAfile = {extra.leaf_only_pem}\n")
    good(t.port("cli"))
    other = tls_server(tunnels, echo, certs.wrong_name_pem)  # same CA, another leaf
    t2 = client_tunnel(tunnels, impl, other, f"verifyPeer = yes\nCAfile = {extra.leaf_only_pem}\n")
    assert refused(t2.port("cli"))
    t2.wait_for(r"certificate verify failed|CERT")


def test_expired_certificate_is_refused(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, extra: Extra, impl: str
) -> None:
    server = tls_server(tunnels, echo, extra.expired_pem)
    t = client_tunnel(tunnels, impl, server, f"verifyChain = yes\nCAfile = {certs.ca_pem}\n")
    assert refused(t.port("cli"))
    t.wait_for(r"certificate verify failed|certificate has expired")


@pytest.mark.parametrize("option", ["CRLfile", "CRLpath"])
def test_revoked_certificate_is_refused(
    tunnels: TunnelFactory,
    certs: Certs,
    echo: EchoServer,
    extra: Extra,
    impl: str,
    option: str,
    tmp_path: Path,
) -> None:
    """CRLfile, or CRLpath: a directory of hashed CRLs (`openssl rehash`'s HASH.r0 names)."""
    where = str(extra.crl_pem)
    if option == "CRLpath":
        openssl = need_tool("openssl")  # it names the CRLpath entries by hash
        crl_dir = tmp_path / "crl.d"
        crl_dir.mkdir()
        name_hash = subprocess.run(
            [openssl, "crl", "-hash", "-noout", "-in", where], capture_output=True, text=True, check=True
        ).stdout.strip()
        shutil.copy(extra.crl_pem, crl_dir / f"{name_hash}.r0")
        where = str(crl_dir)
    verify = f"verifyChain = yes\nCAfile = {certs.ca_pem}\n{option} = {where}\n"
    revoked = tls_server(tunnels, echo, extra.revoked_pem)
    t = client_tunnel(tunnels, impl, revoked, verify)
    assert refused(t.port("cli"))
    t.wait_for(r"certificate verify failed|revoked")
    t.wait_for(r"certificate revoked")
    fine = tls_server(tunnels, echo, certs.server_pem)
    good(client_tunnel(tunnels, impl, fine, verify).port("cli"))
    assert echo.received == len(b"still serving")


def test_refusals_leave_the_process_serving(tunnels: TunnelFactory, certs: Certs, echo: EchoServer) -> None:
    bad_server = tls_server(tunnels, echo, certs.other_server_pem)
    good_server = tls_server(tunnels, echo, certs.server_pem)
    t = tunnels.start(
        tunnels.conf(
            f"verifyChain = yes\nCAfile = {certs.ca_pem}\nclient = yes\n"
            f"[bad]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{bad_server.port('srv')}\n"
            f"[good]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{good_server.port('srv')}\n"
        )
    )
    for _ in range(5):
        assert refused(t.port("bad"))
        good(t.port("good"))
    assert t.log.count("certificate verify failed") == 5


def test_secure_mode_verifies_without_being_told(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer
) -> None:
    """`pytunnel run` refuses an untrusted upstream; `pytunnel CONF` keeps stunnel's defaults."""
    bad_server = tls_server(tunnels, echo, certs.other_server_pem)
    secure = client_tunnel(tunnels, "pytunnel", bad_server, "", mode="run")
    assert refused(secure.port("cli"))
    secure.wait_for(r"certificate verify failed")
    compat = client_tunnel(tunnels, "pytunnel", bad_server, "")
    compat.wait_for(r"Service \[cli\] needs authentication to prevent MITM attacks")
    good(compat.port("cli"))


def test_secure_mode_opt_out_is_logged(tunnels: TunnelFactory, certs: Certs, echo: EchoServer) -> None:
    bad_server = tls_server(tunnels, echo, certs.other_server_pem)
    t = client_tunnel(tunnels, "pytunnel", bad_server, "verifyChain = no\n", mode="run")
    t.wait_for(r"upstream certificate verification is OFF")
    good(t.port("cli"))


# ------------------------------------------------------------------ server mode


@pytest.fixture
def mtls_server(tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str) -> Iterator[Tunnel]:
    yield tunnels.start(
        tunnels.conf(
            f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
            f"verifyChain = yes\nCAfile = {certs.ca_pem}\n"
        ),
        impl=impl,
    )


def tls_exchange(port: int, certs: Certs, client_cert: Path | None, data: bytes = b"hello") -> bytes:
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    if client_cert is not None:
        ctx.load_cert_chain(str(client_cert))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=15) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        s.sendall(data)
        return s.recv(len(data))


def test_client_certificate_required_and_presented(mtls_server: Tunnel, certs: Certs) -> None:
    assert tls_exchange(mtls_server.port("srv"), certs, certs.client_pem) == b"hello"


def test_missing_client_certificate_is_refused(mtls_server: Tunnel, certs: Certs) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):
        assert tls_exchange(mtls_server.port("srv"), certs, None) == b"hello"
    mtls_server.wait_for(r"peer did not return a certificate")
    assert tls_exchange(mtls_server.port("srv"), certs, certs.client_pem) == b"hello"


def test_client_certificate_from_another_ca_is_refused(mtls_server: Tunnel, certs: Certs) -> None:
    stranger = trustme.CA().issue_cert("client.example")
    path = certs.dir / "stranger.pem"
    stranger.private_key_and_cert_chain_pem.write_to_path(str(path))
    with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):
        assert tls_exchange(mtls_server.port("srv"), certs, path) == b"hello"
    mtls_server.wait_for(r"certificate verify failed|unknown ca")


def test_tls_1_1_is_refused(tunnels: TunnelFactory, certs: Certs, echo: EchoServer) -> None:
    t = tunnels.start(
        tunnels.conf(
            f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
        )
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with (
        socket.create_connection(("127.0.0.1", t.port("srv")), timeout=15) as raw,
        pytest.raises(ssl.SSLError),
    ):
        ctx.wrap_socket(raw)
    t.wait_for(r"SSL_accept: unsupported protocol")
    assert tls_exchange(t.port("srv"), certs, None) == b"hello"


def test_sni_routes_to_the_secondary_service(tunnels: TunnelFactory, certs: Certs, impl: str) -> None:
    """`sni = PRIMARY:PATTERN`: stunnel's patterns, where only a leading `*` is special (it takes
    any prefix, dots included) and `?`, `[` or an inner `*` are literal; names compare without
    case; no match stays on the primary service with stunnel's LOG3 line."""

    def tagged(tag: bytes) -> int:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)

        def run() -> None:
            while True:
                try:
                    c, _ = srv.accept()
                except OSError:
                    return
                with c:
                    c.sendall(tag)

        threading.Thread(target=run, daemon=True).start()
        return int(srv.getsockname()[1])

    sec_cert = certs.dir / "sec.pem"
    certs.ca.issue_cert("sec.example").private_key_and_cert_chain_pem.write_to_path(str(sec_cert))
    patterns = {
        "sec": "sec.example",
        "deep": "*.wild.example",
        "bare": "*wild.example",
        "mark": "s?c.example",
        "inner": "s*c.example",
        "bracket": "[x].example",
    }
    body = f"[primary]\ndebug = 7\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{tagged(b'PRIMARY')}\ncert = {certs.server_pem}\n"
    for name, pattern in patterns.items():
        body += f"[{name}]\nsni = primary:{pattern}\nconnect = 127.0.0.1:{tagged(name.encode())}\ncert = {sec_cert}\n"
    t = tunnels.start(tunnels.conf(body), impl=impl)
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    ctx.check_hostname = False  # the routing is under test here, not the name check
    expected = {
        "sec.example": b"sec",
        "SEC.Example": b"sec",
        "a.wild.example": b"deep",
        "a.b.wild.example": b"deep",
        "wild.example": b"bare",
        "xwild.example": b"bare",
        "sxc.example": b"PRIMARY",
        "sxyc.example": b"PRIMARY",
        "x.example": b"PRIMARY",
        "[x].example": b"bracket",
        "localhost": b"PRIMARY",
    }
    for server_name, tag in expected.items():
        with (
            socket.create_connection(("127.0.0.1", t.port("primary")), timeout=15) as raw,
            ctx.wrap_socket(raw, server_hostname=server_name) as s,
        ):
            assert s.recv(20) == tag, server_name
    t.wait_for(r"SNI: requested servername: a\.b\.wild\.example")
    t.wait_for(r"LOG7\[\d+\]: SNI: matched pattern: \*\.wild\.example")
    t.wait_for(r"LOG5\[\d+\]: SNI: switched to service \[deep\]")
    t.wait_for(r"LOG3\[\d+\]: SNI: no pattern matched servername: sxyc\.example")


# ------------------------------------------------------------------ key file permissions


@pytest.mark.parametrize(("mode", "warned"), [(0o644, True), (0o604, True), (0o640, False), (0o600, False)])
def test_key_readable_by_others_is_warned_like_stunnel(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, tmp_path: Path, mode: int, warned: bool
) -> None:
    key = tmp_path / "key.pem"
    key.write_bytes(certs.server_pem.read_bytes())
    key.chmod(mode)
    conf = tunnels.conf(f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {key}\n")
    t = tunnels.start(conf, impl=impl)
    assert (f"Insecure file permissions on {key}" in t.log) is warned
    assert t.stop() == 0


def test_check_email(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, tmp_path: Path, impl: str
) -> None:
    """checkEmail matches an rfc822Name in the peer's subjectAltName; another address is refused
    with stunnel's CERT line and the upstream never sees the app's bytes."""
    mail_pem = tmp_path / "mail-server.pem"
    certs.ca.issue_cert(
        "localhost", "127.0.0.1", "ops@example.com"
    ).private_key_and_cert_chain_pem.write_to_path(str(mail_pem))
    server = tls_server(tunnels, echo, mail_pem)
    verify = f"verifyChain = yes\nCAfile = {certs.ca_pem}\n"
    t = client_tunnel(
        tunnels, impl, server, verify + "checkEmail = nobody@example.com\ncheckEmail = ops@example.com\n"
    )
    good(t.port("cli"))
    t2 = client_tunnel(tunnels, impl, server, verify + "checkEmail = root@example.com\n")
    assert refused(t2.port("cli"))
    t2.wait_for(r"CERT: Subject checks failed")
    t2.wait_for(r"certificate verify failed")
    if impl == "pytunnel":
        t2.wait_for(r"Email address mismatch \(expected root@example\.com\)")
    good(t.port("cli"))
    assert echo.received == 2 * len(b"still serving")


def test_check_email_on_client_certificates(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    """Server mode: the client certificate's address is checked the same way."""

    def server(address: str) -> Tunnel:
        return tunnels.start(
            tunnels.conf(
                f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
                f"verifyChain = yes\nCAfile = {certs.ca_pem}\ncheckEmail = {address}\n"
            ),
            impl=impl,
        )

    def client(port: int) -> Tunnel:
        return tunnels.start(
            tunnels.conf(
                f"[cli]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{port}\n"
                f"cert = {certs.client_pem}\nverifyChain = yes\nCAfile = {certs.ca_pem}\ncheckHost = localhost\n"
            ),
            impl="stunnel4",
        )

    ok = server("client@example.com")
    good(client(ok.port("srv")).port("cli"))
    bad = server("admin@example.com")
    assert refused(client(bad.port("srv")).port("cli"))
    bad.wait_for(r"CERT: Subject checks failed")
    assert echo.received == len(b"still serving")
