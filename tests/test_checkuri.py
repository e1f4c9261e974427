"""checkURI (pytunnel extension): URI SANs such as SPIFFE IDs, checked in both modes.

stunnel 5.68 has no checkURI, so these scenarios run pytunnel only; the peers are real:
stunnel4 as the TLS server pytunnel's client checks, Python's ssl as the client a pytunnel
server checks.  Each refusal is asserted on the app's bytes, stunnel's CERT lines and the
``uri_mismatch`` handshake-failure counter, and the same process then serves a good peer.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, Certs, EchoServer, Tunnel, TunnelFactory, roundtrip
from identity_support import issue, wait_metric
from loopback_support import refused

WEB = "spiffe://example.org/ns/prod/sa/web"


@pytest.fixture
def spiffe_pems(certs: Certs, tmp_path: Path) -> dict[str, Path]:
    return {
        "web": issue(certs.ca, tmp_path / "web.pem", "web", dns=["localhost"], uris=[WEB]),
        "db": issue(certs.ca, tmp_path / "db.pem", "db", uris=["spiffe://example.org/ns/prod/sa/db"]),
        "deep": issue(certs.ca, tmp_path / "deep.pem", "deep", uris=["spiffe://example.org/ns/a/b/sa/web"]),
    }


def good(port: int) -> None:
    assert roundtrip(port, b"spiffe ok") == b"spiffe ok"


def stunnel_server(tunnels: TunnelFactory, echo: EchoServer, cert: Path) -> Tunnel:
    return tunnels.start(
        tunnels.conf(f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {cert}\n"),
        impl="stunnel4",
    )


def client(tunnels: TunnelFactory, server: Tunnel, ca: Path, checks: str, mode: str = "compat") -> Tunnel:
    body = (
        f"[cli]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{server.port('srv')}\n"
        f"verifyChain = yes\nCAfile = {ca}\n{checks}"
    )
    return tunnels.start(tunnels.conf(body), mode=mode, extra_env={"PYTUNNEL_STATUS": "127.0.0.1:0"})


@pytest.mark.parametrize("mode", ["compat", "run"])
def test_client_checks_the_upstreams_uri(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, spiffe_pems: dict[str, Path], mode: str
) -> None:
    """Exact and one-segment wildcard patterns accept; another service's ID is refused."""
    server = stunnel_server(tunnels, echo, spiffe_pems["web"])

    def cli(checks: str) -> Tunnel:
        return client(tunnels, server, certs.ca_pem, checks, mode)

    for pattern in (WEB, "spiffe://example.org/ns/*/sa/web", "SPIFFE://Example.ORG/ns/prod/sa/*"):
        good(cli(f"checkURI = {pattern}\n").port("cli"))
    bad = cli("checkURI = spiffe://example.org/ns/*/sa/db\n")
    assert refused(bad.port("cli"))
    bad.wait_for(r"LOG4\[\d+\]: CERT: Subject checks failed")
    bad.wait_for(r"LOG4\[\d+\]: Rejected by CERT at depth=0: CN=web")
    bad.wait_for(r"certificate verify failed: URI mismatch \(expected spiffe://example\.org/ns/\*/sa/db\)")
    assert wait_metric(bad, "pytunnel_handshake_failures_total", 1, service="cli", reason="uri_mismatch") == 1
    assert echo.received == 3 * len(b"spiffe ok")


def test_wildcard_is_one_whole_segment(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, spiffe_pems: dict[str, Path]
) -> None:
    """``*`` never spans two segments: ns/a/b/sa/web does not match ns/*/sa/web."""
    server = stunnel_server(tunnels, echo, spiffe_pems["deep"])
    t = client(tunnels, server, certs.ca_pem, "checkURI = spiffe://example.org/ns/*/sa/web\n")
    assert refused(t.port("cli"))
    t.wait_for(r"URI mismatch")
    ok = client(tunnels, server, certs.ca_pem, "checkURI = spiffe://example.org/ns/*/*/sa/web\n")
    good(ok.port("cli"))


def test_any_one_check_accepts(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, spiffe_pems: dict[str, Path]
) -> None:
    """checkURI combines with checkHost as stunnel combines its check* options: any one match
    accepts; with none matching the peer is refused (counted as uri_mismatch)."""
    server = stunnel_server(tunnels, echo, spiffe_pems["web"])
    ca = certs.ca_pem
    host_only = client(tunnels, server, ca, "checkHost = localhost\ncheckURI = spiffe://other.org/x\n")
    good(host_only.port("cli"))
    uri_only = client(tunnels, server, ca, f"checkHost = nowhere.example\ncheckURI = {WEB}\n")
    good(uri_only.port("cli"))
    none = client(tunnels, server, ca, "checkHost = nowhere.example\ncheckURI = spiffe://other.org/x\n")
    assert refused(none.port("cli"))
    none.wait_for(r"Name and URI mismatch \(expected nowhere\.example, spiffe://other\.org/x\)")
    assert (
        wait_metric(none, "pytunnel_handshake_failures_total", 1, service="cli", reason="uri_mismatch") == 1
    )


def tls_client(port: int, certs: Certs, pem: Path) -> bytes:
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    ctx.load_cert_chain(str(pem))
    with socket.create_connection(("127.0.0.1", port), timeout=15) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(b"from " + pem.stem.encode())
                return s.recv(100)
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            return b""


@pytest.mark.parametrize("mode", ["compat", "run"])
def test_server_checks_client_uris(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, spiffe_pems: dict[str, Path], mode: str
) -> None:
    conf = tunnels.conf(
        f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
        f"verifyChain = yes\nCAfile = {certs.ca_pem}\ncheckURI = spiffe://example.org/ns/prod/sa/*\n"
    )
    t = tunnels.start(conf, mode=mode, extra_env={"PYTUNNEL_STATUS": "127.0.0.1:0"})
    assert tls_client(t.port("srv"), certs, spiffe_pems["web"]) == b"from web"
    assert tls_client(t.port("srv"), certs, spiffe_pems["db"]) == b"from db"
    assert tls_client(t.port("srv"), certs, spiffe_pems["deep"]) == b""
    t.wait_for(r"CERT: Subject checks failed")
    t.wait_for(r"Rejected by CERT at depth=0: CN=deep")
    assert wait_metric(t, "pytunnel_handshake_failures_total", 1, service="srv", reason="uri_mismatch") == 1
    assert tls_client(t.port("srv"), certs, spiffe_pems["web"]) == b"from web"


def check_fails(conf: Path) -> str:
    """``pytunnel check CONF`` must refuse the file: what it printed."""
    out = subprocess.run(
        [sys.executable, "-m", "tunnel", "check", str(conf)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert out.returncode != 0, out.stdout + out.stderr
    return out.stdout + out.stderr


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ("example.org/ns/web", "is not a URI"),
        ("spiffe://*.example.org/web", "not in the scheme or authority"),
        ("spiffe://example.org/ns/pr*d", "must be a whole path segment"),
    ],
)
def test_bad_patterns_are_refused_with_the_line(tmp_path: Path, certs: Certs, value: str, error: str) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text(
        f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:1\ncert = {certs.server_pem}\n"
        f"verifyChain = yes\nCAfile = {certs.ca_pem}\ncheckURI = {value}\n"
    )
    text = check_fails(conf)
    assert f"{conf}:7" in text and error in text, text


def test_checkuri_needs_verification(tmp_path: Path, certs: Certs) -> None:
    conf = tmp_path / "noverify.conf"
    conf.write_text(
        f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:1\ncert = {certs.server_pem}\ncheckURI = {WEB}\n"
    )
    assert 'Either "verifyChain" or "verifyPeer" has to be enabled' in check_fails(conf)
