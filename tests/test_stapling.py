"""OCSP stapling (stunnel 5.71+), both sides, against real ``openssl ocsp`` responders.

Server: a pytunnel service whose certificate names an OCSP responder (AIA) fetches the
answer in the background and staples it; ``openssl s_client -status`` sees it.  Client:
``verifyChain = yes`` asks for the staple and checks it (``OCSP: Accepted (good)`` /
``OCSP: Rejected (revoked)``); without one it falls back to ``OCSPaia``.

Debian's stunnel4 is 5.68, which neither staples nor asks for staples.  It runs here only
as a control where that does not matter: as the client of a stapling pytunnel server (it
checks with OCSPaia itself, same configuration file), and as a server that sends no staple
(the pytunnel client's fallback)."""

from __future__ import annotations

import re
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import EchoServer, Tunnel, TunnelFactory, need_stunnel, need_tool, roundtrip
from cryptography import x509
from cryptography.x509 import ocsp
from identity_support import wait_metric
from ocsp_support import (
    Key,
    Pki,
    Responder,
    _index_line,
    _issue,
    _key,
    _key_pem,
    _pem,
    build_pki,
)

from tunnel import osslconn

STAPLED = r"OCSP stapling: Service \[s\]: {} response for .* stapled for \d+ s"


@pytest.fixture(autouse=True)
def _openssl() -> None:
    need_tool("openssl")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pki]:
    yield from build_pki(tmp_path_factory)


def full_chain(pki: Pki, name: str, cert: x509.Certificate, key: Key) -> Path:
    """The server's ``cert``: its key, its certificate, then the issuer (a full chain)."""
    path = pki.dir / f"{name}-chain.pem"
    path.write_bytes(_key_pem(key) + _pem(cert) + _pem(pki.root))
    path.chmod(0o600)
    return path


def stapling_server(
    tunnels: TunnelFactory, echo: EchoServer, cert: Path, impl: str = "pytunnel", status: bool = False
) -> Tunnel:
    conf = f"[s]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {cert}\n"
    env = {"PYTUNNEL_STATUS": "127.0.0.1:0"} if status else None
    return tunnels.start(tunnels.conf(conf), impl=impl, extra_env=env)


def client(
    tunnels: TunnelFactory, pki: Pki, upstream: int, extra: str = "", impl: str = "pytunnel"
) -> Tunnel:
    conf = (
        f"[c]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{upstream}\n"
        f"verifyChain = yes\nCAfile = {pki.dir / 'root.pem'}\ncheckHost = localhost\n{extra}"
    )
    return tunnels.start(tunnels.conf(conf), impl=impl)


def refused(port: int) -> bool:
    """True when the tunnel closes the connection without relaying anything."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
            s.sendall(b"hello")
            s.shutdown(socket.SHUT_WR)
            return s.recv(100) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def s_client_status(port: int) -> str:
    """``openssl s_client -status``: what it says about the stapled response."""
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-status", "-servername", "localhost"],
        input=b"", capture_output=True, timeout=30,
    )  # fmt: skip
    return out.stdout.decode(errors="replace")


def staple_of(port: int, pki: Pki) -> bytes:
    """One handshake from Python asking for a staple (tunnel/osslconn.py): what came."""
    ctx = ssl.create_default_context(cafile=str(pki.dir / "root.pem"))
    raw = socket.create_connection(("127.0.0.1", port), timeout=15)
    with ctx.wrap_socket(raw, server_hostname="localhost", do_handshake_on_connect=False) as s:
        osslconn.request_status(s)
        s.do_handshake()
        return osslconn.stapled(s)


# ------------------------------------------------------------------ the server's side


def test_server_staples_a_good_response(pki: Pki, tunnels: TunnelFactory, echo: EchoServer) -> None:
    t = stapling_server(tunnels, echo, full_chain(pki, "good", pki.leaf_good, pki.leaf_good_key))
    t.wait_for(STAPLED.format("good"), timeout=30)
    text = s_client_status(t.port("s"))
    assert "OCSP Response Status: successful" in text, text
    assert "Cert Status: good" in text, text
    # many handshakes: each gets its own OPENSSL_malloc'd copy, which OpenSSL frees
    staples = {staple_of(t.port("s"), pki) for _ in range(40)}
    assert len(staples) == 1
    answer = ocsp.load_der_ocsp_response(staples.pop())
    assert answer.certificate_status is ocsp.OCSPCertStatus.GOOD
    assert answer.serial_number == pki.leaf_good.serial_number
    c = client(tunnels, pki, t.port("s"))
    assert roundtrip(c.port("c"), b"x" * 5000) == b"x" * 5000
    assert t.proc.poll() is None and "Traceback" not in t.log


def test_no_staple_without_an_aia_url(pki: Pki, tunnels: TunnelFactory, echo: EchoServer) -> None:
    no_aia_key = _key()
    leaf = _issue("no-aia-leaf", no_aia_key, pki.root, pki.root_key, san="localhost")
    t = stapling_server(tunnels, echo, full_chain(pki, "noaia", leaf, no_aia_key))
    assert "OCSP response: no response sent" in s_client_status(t.port("s"))
    assert "OCSP stapling" not in t.log


# ------------------------------------------------------------------ the client's side


def test_client_accepts_a_good_staple(pki: Pki, tunnels: TunnelFactory, echo: EchoServer) -> None:
    """No OCSP/OCSPaia on the client: only the staple can answer for the leaf."""
    server = stapling_server(tunnels, echo, full_chain(pki, "good", pki.leaf_good, pki.leaf_good_key))
    server.wait_for(STAPLED.format("good"), timeout=30)
    c = client(tunnels, pki, server.port("s"))
    assert roundtrip(c.port("c"), b"stapled" * 100) == b"stapled" * 100
    c.wait_for(r"LOG6\[\d+\]: OCSP: OCSP stapling response received")
    c.wait_for(r"LOG5\[\d+\]: OCSP: Accepted \(good\)")
    assert "Connecting the" not in c.log  # no responder was asked


@pytest.mark.parametrize("impl", ["pytunnel", "stunnel4"])
def test_revoked_staple_fails_the_handshake(
    pki: Pki, tunnels: TunnelFactory, echo: EchoServer, impl: str
) -> None:
    """The same client configuration under both: stunnel 5.68 asks for no staple and finds
    the revocation with OCSPaia; pytunnel finds it in the staple (and asks no responder)."""
    if impl == "stunnel4":
        need_stunnel()
    server = stapling_server(
        tunnels, echo, full_chain(pki, "revoked", pki.leaf_revoked, pki.leaf_revoked_key)
    )
    server.wait_for(STAPLED.format("revoked"), timeout=30)
    assert "Cert Status: revoked" in s_client_status(server.port("s"))
    c = client(tunnels, pki, server.port("s"), "OCSPaia = yes\n", impl=impl)
    assert refused(c.port("c"))
    c.wait_for(r"OCSP: Certificate revoked")
    if impl == "pytunnel":
        c.wait_for(r"LOG6\[\d+\]: OCSP: OCSP stapling response received")
        c.wait_for(r"LOG3\[\d+\]: OCSP: Rejected \(revoked\)")
        c.wait_for(r"LOG3\[\d+\]: OCSP: certificate revoked.*keyCompromise")
        assert "Connecting the AIA responder" not in c.log
        assert "Traceback" not in c.log


@pytest.mark.parametrize("leaf", ["good", "revoked"])
def test_no_staple_falls_back_to_ocspaia(
    pki: Pki, tunnels: TunnelFactory, echo: EchoServer, leaf: str
) -> None:
    """stunnel4 5.68 as the server: it staples nothing, so the client asks the AIA responder."""
    cert = full_chain(pki, leaf, getattr(pki, f"leaf_{leaf}"), getattr(pki, f"leaf_{leaf}_key"))
    server = stapling_server(tunnels, echo, cert, impl="stunnel4")
    c = client(tunnels, pki, server.port("s"), "OCSPaia = yes\n")
    if leaf == "good":
        assert roundtrip(c.port("c"), b"aia") == b"aia"
        c.wait_for(r"OCSP: Accepted \(good\)")
    else:
        assert refused(c.port("c"))
        c.wait_for(r"OCSP: Rejected \(revoked\)")
    c.wait_for(r"LOG3\[\d+\]: OCSP: No OCSP stapling response received")
    c.wait_for(r'OCSP: Connecting the AIA responder "http://127\.0\.0\.1:\d+/"')


def test_responder_down_at_start(pki: Pki, tunnels: TunnelFactory, echo: EchoServer) -> None:
    """The server serves without a staple while its responder is down -- no handshake waits
    for it -- and staples once the responder is up."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    key = _key()
    leaf = _issue(
        "late.example", key, pki.root, pki.root_key, aia=f"http://127.0.0.1:{port}/", san="localhost"
    )
    (pki.dir / "index-late.txt").write_text(_index_line(leaf.serial_number, "late.example"))
    server = stapling_server(tunnels, echo, full_chain(pki, "late", leaf, key), status=True)
    server.wait_for(r"OCSP stapling: Service \[s\]: no new response .*nothing to staple; next attempt in", 30)
    c = client(tunnels, pki, server.port("s"), "sessionResume = no\n")  # each handshake checks
    started = time.monotonic()
    assert roundtrip(c.port("c"), b"no staple yet") == b"no staple yet"
    assert time.monotonic() - started < 5  # TIMEOUTocsp (5 s) never delays a handshake
    c.wait_for(r"LOG3\[\d+\]: OCSP: No OCSP stapling response received")
    responder = Responder(
        pki.dir, "late", pki.dir / "root.pem", pki.dir / "root.pem", pki.dir / "root.key",
        pki.dir / "index-late.txt", "-port", str(port), "-nmin", "60",
    )  # fmt: skip
    try:
        server.wait_for(STAPLED.format("good"), timeout=60)
        fetches = "pytunnel_ocsp_staple_fetches_total"
        assert wait_metric(server, fetches, 1, service="s", result="failure") >= 1
        assert wait_metric(server, fetches, 1, service="s", result="good") == 1
        assert roundtrip(c.port("c"), b"stapled now") == b"stapled now"
        c.wait_for(r"OCSP: Accepted \(good\)")
    finally:
        responder.close()


def test_stapling_inside_the_sandbox(pki: Pki, tunnels: TunnelFactory, echo: EchoServer) -> None:
    """``pytunnel run`` enters the Landlock sandbox (a pytunnel extension): its TCP rules
    (ABI >= 4) let the process reach the responder its certificate names."""
    cert = full_chain(pki, "good", pki.leaf_good, pki.leaf_good_key)
    conf = f"[s]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {cert}\n"
    t = tunnels.start(tunnels.conf(conf), mode="run")
    t.wait_for(r"Sandbox: ")
    t.wait_for(STAPLED.format("good"), timeout=30)
    assert "Cert Status: good" in s_client_status(t.port("s"))


def test_sni_secondary_staples_for_its_own_certificate(
    pki: Pki, tunnels: TunnelFactory, echo: EchoServer
) -> None:
    key = _key()
    plain = _issue("primary.example", key, pki.root, pki.root_key, san="localhost")  # no AIA
    conf = (
        f"[s]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {full_chain(pki, 'primary', plain, key)}\n"
        f"[virt]\nsni = s:good.example\nconnect = 127.0.0.1:{echo.port}\n"
        f"cert = {full_chain(pki, 'good', pki.leaf_good, pki.leaf_good_key)}\n"
    )
    t = tunnels.start(tunnels.conf(conf))
    t.wait_for(r"OCSP stapling: Service \[virt\]: good response", timeout=30)

    def status(name: str) -> str:
        out = subprocess.run(
            ["openssl", "s_client", "-connect", f"127.0.0.1:{t.port('s')}", "-status", "-servername", name],
            input=b"", capture_output=True, timeout=30,
        )  # fmt: skip
        return out.stdout.decode(errors="replace")

    assert "Cert Status: good" in status("good.example")
    assert "OCSP response: no response sent" in status("other.example")


def test_certificate_reload_staples_the_new_certificate(
    pki: Pki, tunnels: TunnelFactory, echo: EchoServer, tmp_path: Path
) -> None:
    """Certificate hot reload (a pytunnel extension): the new certificate's own answer is
    fetched and stapled."""
    cert = tmp_path / "tls.pem"
    cert.write_bytes(full_chain(pki, "good", pki.leaf_good, pki.leaf_good_key).read_bytes())
    cert.chmod(0o600)
    conf = f"[s]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {cert}\n"
    t = tunnels.start(tunnels.conf(conf), extra_env={"PYTUNNEL_CERT_RELOAD_INTERVAL": "1"})
    t.wait_for(STAPLED.format("good"), timeout=30)
    new = tmp_path / "tls.pem.new"
    new.write_bytes(full_chain(pki, "revoked", pki.leaf_revoked, pki.leaf_revoked_key).read_bytes())
    new.chmod(0o600)
    new.replace(cert)
    t.wait_for(r"Service \[s\]: certificates reloaded", timeout=30)
    t.wait_for(STAPLED.format("revoked"), timeout=30)
    assert "Cert Status: revoked" in s_client_status(t.port("s"))


def test_sighup_reload_keeps_stapling_without_a_gap(
    pki: Pki, tunnels: TunnelFactory, echo: EchoServer
) -> None:
    """stunnel's SIGHUP builds the services again; the new one staples the answer already
    fetched (still valid) at once, without asking the responder again."""
    t = stapling_server(tunnels, echo, full_chain(pki, "good", pki.leaf_good, pki.leaf_good_key))
    t.wait_for(STAPLED.format("good"), timeout=30)
    t.signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while t.log.count("Configuration successful") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert t.log.count("Configuration successful") == 2, t.log
    assert "Cert Status: good" in s_client_status(t.port("s"))
    assert len(re.findall(STAPLED.format("good"), t.log)) == 1
