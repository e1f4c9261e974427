"""OCSP end to end: a tunnel with ``verifyChain`` and ``OCSP``/``OCSPaia`` asks a real
``openssl ocsp`` responder about the peer's chain and refuses a revoked certificate, in
client mode (the server's certificate) and in server mode (the client's).  The same
configuration file runs under stunnel4 where 5.68 has the options."""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import EchoServer, TunnelFactory, roundtrip
from loopback_support import refused
from ocsp_support import Pki, build_pki, pem_pair


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pki]:
    yield from build_pki(tmp_path_factory)


def server_for(tunnels: TunnelFactory, echo: EchoServer, cert: Path) -> int:
    t = tunnels.start(
        tunnels.conf(f"[s]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {cert}\n")
    )
    return t.port("s")


@pytest.mark.parametrize("leaf", ["good", "revoked"])
def test_client_mode_checks_the_servers_certificate(
    pki: Pki,
    tunnels: TunnelFactory,
    echo: EchoServer,
    impl: str,
    leaf: str,
) -> None:
    cert = pem_pair(pki, leaf, getattr(pki, f"leaf_{leaf}"), getattr(pki, f"leaf_{leaf}_key"))
    upstream = server_for(tunnels, echo, cert)
    conf = tunnels.conf(
        f"[c]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{upstream}\n"
        f"verifyChain = yes\nCAfile = {pki.dir / 'root.pem'}\ncheckHost = localhost\nOCSPaia = yes\n"
    )
    t = tunnels.start(conf, impl=impl)
    if leaf == "good":
        assert roundtrip(t.port("c"), b"through" * 1000) == b"through" * 1000
        t.wait_for(r"OCSP: Certificate accepted")
    else:
        assert refused(t.port("c"), half_close=True)
        t.wait_for(r"OCSP: Certificate revoked")
        if impl == "pytunnel":
            t.wait_for(r"LOG3\[\d+\]: OCSP: certificate revoked.*keyCompromise")
            assert "Traceback" not in t.log


def test_configured_url_and_server_mode(
    pki: Pki,
    tunnels: TunnelFactory,
    echo: EchoServer,
    impl: str,
) -> None:
    """Server mode: the client's certificate is checked with the configured responder."""
    server_cert = pem_pair(pki, "good", pki.leaf_good, pki.leaf_good_key)
    conf = tunnels.conf(
        f"[s]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {server_cert}\n"
        f"verifyChain = yes\nCAfile = {pki.dir / 'root.pem'}\nOCSP = {pki.url['ca']}\n"
    )
    t = tunnels.start(conf, impl=impl)
    ctx_good = ssl.create_default_context(cafile=str(pki.dir / "root.pem"))
    ctx_good.load_cert_chain(str(server_cert))
    revoked = pem_pair(pki, "revoked", pki.leaf_revoked, pki.leaf_revoked_key)
    ctx_bad = ssl.create_default_context(cafile=str(pki.dir / "root.pem"))
    ctx_bad.load_cert_chain(str(revoked))

    def talk(ctx: ssl.SSLContext) -> bytes:
        raw = socket.create_connection(("127.0.0.1", t.port("s")), timeout=15)
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            try:  # a refusal may land before the write (TLS 1.3: after the client's Finished)
                s.sendall(b"ping")
                return s.recv(100)
            except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
                return b""

    assert talk(ctx_good) == b"ping"
    assert talk(ctx_bad) == b""
    t.wait_for(r"OCSP: Certificate revoked")


def test_ocsprequire_no_accepts_an_unknown_certificate(
    pki: Pki,
    tunnels: TunnelFactory,
    echo: EchoServer,
) -> None:
    """OCSPrequire (stunnel 5.71+, not in Debian's 5.68): pytunnel only."""
    cert = pem_pair(pki, "unknown", pki.leaf_unknown, pki.leaf_unknown_key)
    upstream = server_for(tunnels, echo, cert)
    base = (
        f"client = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{upstream}\nverifyChain = yes\n"
        f"CAfile = {pki.dir / 'root.pem'}\nOCSPaia = yes\n"
    )
    t = tunnels.start(tunnels.conf(f"[strict]\n{base}[lenient]\n{base}OCSPrequire = no\n"))
    assert refused(t.port("strict"), half_close=True)
    assert roundtrip(t.port("lenient"), b"ok") == b"ok"
    t.wait_for(r"OCSP: Rejected \(OCSPrequire = yes\)")
    t.wait_for(r"OCSP: Accepted \(OCSPrequire = no\)")


def test_responder_down_fails_closed_and_the_tunnel_keeps_serving(
    pki: Pki,
    tunnels: TunnelFactory,
    echo: EchoServer,
) -> None:
    cert = pem_pair(pki, "good", pki.leaf_good, pki.leaf_good_key)
    upstream = server_for(tunnels, echo, cert)
    base = (
        f"client = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{upstream}\nverifyChain = yes\n"
        f"CAfile = {pki.dir / 'root.pem'}\n"
    )
    t = tunnels.start(
        tunnels.conf(f"[down]\n{base}OCSP = {pki.dead_url}\nTIMEOUTocsp = 2\n[up]\n{base}OCSPaia = yes\n")
    )
    assert refused(t.port("down"), half_close=True)
    t.wait_for(r"OCSP: responder unreachable")
    assert roundtrip(t.port("up"), b"still here") == b"still here"


def test_bad_ocsp_options_are_config_errors(tmp_path: Path, tunnels: TunnelFactory) -> None:
    conf = tunnels.conf(
        "[c]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\nverifyChain = yes\n"
        "CAfile = /etc/ssl/certs/ca-certificates.crt\nOCSP = ftp://x/\nOCSPflag = NONCE\n"
    )
    t = tunnels.start(conf, wait=False)
    assert t.proc.wait(30) == 1
    assert '"OCSP = ftp://x/"' in t.log and "http://" in t.log
    assert '"OCSPflag = NONCE"' in t.log and "unknown OCSP flag" in t.log
