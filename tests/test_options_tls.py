"""TLS options that used to be only parsed, run for real: a tunnel started with the option,
a client connecting through it, the effect observed on the wire.  Both implementations run
the same config file where stunnel 5.68 has the option.

CApath, securityLevel, sslVersionMin/sslVersionMax, renegotiation, legacy ``verify = 1..4``,
``sessionCacheSize`` eviction and ``cert`` as a PKCS#12 file.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest
from conftest import Certs, EchoServer, Tunnel, TunnelFactory, need_tool, roundtrip
from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    load_pem_private_key,
    pkcs12,
)
from loopback_support import refused


def server(tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, extra: str = "") -> Tunnel:
    return tunnels.start(
        tunnels.conf(
            f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n{extra}"
        ),
        impl=impl,
    )


def client_ctx(certs: Certs, chain: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    if chain is not None:
        ctx.load_cert_chain(str(chain))
    return ctx


def talks(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None = None) -> ssl.SSLSocket | None:
    """A TLS connection that carries data both ways, or None when the tunnel refused it
    (in the handshake or, TLS 1.3, right after it)."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=15)
    try:
        s = ctx.wrap_socket(raw, server_hostname="localhost", session=session)
        s.sendall(b"ping")
        if s.recv(4) != b"ping":
            s.close()
            return None
        return s
    except (ssl.SSLError, ConnectionError, TimeoutError):
        raw.close()
        return None


def works(port: int, ctx: ssl.SSLContext) -> bool:
    s = talks(port, ctx)
    if s is None:
        return False
    s.close()
    return True


def s_client(port: int, *args: str, stdin: bytes = b"") -> str:
    out = subprocess.run(
        [
            need_tool("openssl"),
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-servername",
            "localhost",
            *args,
        ],
        input=stdin,
        capture_output=True,
        timeout=30,
    )
    return (out.stdout + out.stderr).decode(errors="replace")


# ------------------------------------------------------------------ CApath


def hashed_dir(path: Path, *pems: Path) -> Path:
    """A CApath: the certificates, and the hash links `openssl rehash` makes."""
    path.mkdir()
    for i, pem in enumerate(pems):
        shutil.copy(pem, path / f"cert{i}.pem")
    subprocess.run([need_tool("openssl"), "rehash", str(path)], check=True, capture_output=True)
    assert any(n.endswith(".0") for n in os.listdir(path)), os.listdir(path)
    return path


def ca_only(certs: Certs, name: str) -> Path:
    """The CA certificate alone (certs.ca_pem), under another name."""
    out = certs.dir / name
    out.write_bytes(certs.ca_pem.read_bytes())
    return out


def test_capath_verifies_client_certificates(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, tmp_path: Path
) -> None:
    """Server mode: CApath holds the trusted CA; its clients are served, others refused."""
    capath = hashed_dir(tmp_path / "capath", certs.ca_pem)
    t = server(tunnels, certs, echo, impl, f"CApath = {capath}\nverifyChain = yes\n")
    assert works(t.port("srv"), client_ctx(certs, certs.client_pem))
    assert not works(t.port("srv"), client_ctx(certs, certs.other_server_pem))
    assert not works(t.port("srv"), client_ctx(certs))  # verifyChain requires a certificate


def test_capath_verifies_the_upstream(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, tmp_path: Path
) -> None:
    """Client mode: an upstream whose CA is in CApath is reached; one from another CA is not."""
    capath = hashed_dir(tmp_path / "capath", certs.ca_pem)
    good = server(tunnels, certs, echo, "pytunnel")
    bad = tunnels.start(
        tunnels.conf(
            f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.other_server_pem}\n"
        )
    )
    conf = tunnels.conf(
        f"[good]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{good.port('srv')}\n"
        f"CApath = {capath}\nverifyChain = yes\ncheckHost = localhost\n"
        f"[bad]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{bad.port('srv')}\n"
        f"CApath = {capath}\nverifyChain = yes\ncheckHost = localhost\n"
    )
    t = tunnels.start(conf, impl=impl)
    assert roundtrip(t.port("good"), b"capath" * 100) == b"capath" * 100
    assert refused(t.port("bad"), half_close=True)


# ------------------------------------------------------------------ securityLevel


def test_security_level_refuses_weak_keys(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    """Client mode: securityLevel = 4 needs 192-bit security, so the upstream's P-256 key
    (128 bits) fails the handshake; the default level 2 takes it."""
    upstream = server(tunnels, certs, echo, "pytunnel")
    common = (
        f"client = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{upstream.port('srv')}\n"
        f"CAfile = {certs.ca_pem}\nverifyChain = yes\ncheckHost = localhost\n"
    )
    t = tunnels.start(tunnels.conf(f"[weak]\n{common}securityLevel = 4\n[default]\n{common}"), impl=impl)
    assert roundtrip(t.port("default"), b"level" * 100) == b"level" * 100
    assert refused(t.port("weak"), half_close=True)


def test_security_level_zero_lets_tls1_in(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    """Server mode: TLS 1.0 needs SHA-1 signatures, which every level above 0 refuses."""
    t = server(tunnels, certs, echo, impl, "sslVersionMin = TLSv1\nsecurityLevel = 0\n")
    out = s_client(t.port("srv"), "-tls1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert "Protocol  : TLSv1\n" in out or "New, TLSv1, Cipher is" in out, out
    t1 = server(tunnels, certs, echo, impl, "sslVersionMin = TLSv1\nsecurityLevel = 1\n")
    out = s_client(t1.port("srv"), "-tls1", "-cipher", "DEFAULT@SECLEVEL=0")
    assert "Cipher is (NONE)" in out, out


# ------------------------------------------------------------------ sslVersionMin / Max


@pytest.mark.parametrize(
    ("line", "offered", "expected"),
    [
        ("sslVersionMax = TLSv1.2", None, "TLSv1.2"),
        ("sslVersionMin = TLSv1.3", None, "TLSv1.3"),
        ("sslVersionMin = TLSv1.3", ssl.TLSVersion.TLSv1_2, None),
        ("sslVersionMax = TLSv1.2", ssl.TLSVersion.TLSv1_3, None),
        ("sslVersionMin = TLSv1.1\nsslVersionMax = TLSv1.1", None, None),  # the client's floor is 1.2
    ],
)
def test_ssl_version_min_and_max(
    tunnels: TunnelFactory,
    certs: Certs,
    echo: EchoServer,
    impl: str,
    line: str,
    offered: ssl.TLSVersion | None,
    expected: str | None,
) -> None:
    """The negotiated version stays in [sslVersionMin, sslVersionMax]; a client that can
    only speak a version outside it gets no connection."""
    t = server(tunnels, certs, echo, impl, line + "\n")
    ctx = client_ctx(certs)
    if offered is not None:
        ctx.minimum_version = ctx.maximum_version = offered
    s = talks(t.port("srv"), ctx)
    if expected is None:
        assert s is None
        return
    assert s is not None
    with s:
        assert s.version() == expected


# ------------------------------------------------------------------ renegotiation


class SServer:
    """`openssl s_server -msg` as a TLS 1.2 upstream; commands go to its stdin ("r":
    renegotiate), everything it prints is collected."""

    def __init__(self, cert: Path, log: Path) -> None:
        self.log_path = log
        self.fh = open(log, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [need_tool("openssl"), "s_server", "-accept", "127.0.0.1:0", "-cert", str(cert),
             "-tls1_2", "-msg", "-ign_eof"],
            stdin=subprocess.PIPE, stdout=self.fh, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.port = int(self.wait_for(r"ACCEPT 127\.0\.0\.1:(\d+)").group(1))

    @property
    def out(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.out)
            if m:
                return m
            time.sleep(0.02)
        raise AssertionError(f"s_server never printed /{pattern}/:\n{self.out}")

    def command(self, line: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line)
        self.proc.stdin.flush()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self.fh.close()


@pytest.mark.parametrize("allowed", [True, False])
def test_renegotiation_asked_by_the_upstream(
    tunnels: TunnelFactory, certs: Certs, impl: str, allowed: bool, tmp_path: Path
) -> None:
    """Client mode: the upstream asks to renegotiate (HelloRequest).  renegotiation = yes
    (the default) answers with a new ClientHello and the stream goes on; renegotiation = no
    answers with a no_renegotiation alert and never renegotiates."""
    if impl == "stunnel4" and not allowed:
        pytest.xfail("stunnel 5.68 renegotiates in client mode even with renegotiation = no")
    upstream = SServer(certs.server_pem, tmp_path / "s_server.log")
    try:
        t = tunnels.start(
            tunnels.conf(
                f"[c]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{upstream.port}\n"
                f"renegotiation = {'yes' if allowed else 'no'}\n"
            ),
            impl=impl,
        )
        with socket.create_connection(("127.0.0.1", t.port("c")), timeout=20) as app:
            app.sendall(b"before\n")
            upstream.wait_for(r"\nbefore\n")
            assert upstream.out.count("ClientHello") == 1
            upstream.command(b"r\n")
            if allowed:
                upstream.wait_for(r"ClientHello[\s\S]*ClientHello")
                app.sendall(b"after\n")
                upstream.wait_for(r"\nafter\n")
                upstream.command(b"back\n")
                assert app.recv(100) == b"back\n"
            else:
                upstream.wait_for(r"Alert \[length 0002\], warning no_renegotiation")
                assert upstream.out.count("ClientHello") == 1
    finally:
        upstream.close()


def test_renegotiation_asked_by_a_client_is_refused(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    """Server mode: with OpenSSL 3 a client's own renegotiation is refused whatever the
    option says (OpenSSL 3 turned client-initiated renegotiation off; stunnel 5.68 does
    not turn it back on either), so both values behave alike here."""
    for line in ("renegotiation = yes\n", "renegotiation = no\n"):
        t = server(tunnels, certs, echo, impl, line)
        out = s_client(t.port("srv"), "-tls1_2", "-no_ign_eof", stdin=b"R\nafter\n")
        assert "RENEGOTIATING" in out, out
        assert "no renegotiation" in out, out
        assert "\nafter\n" not in out, out


# ------------------------------------------------------------------ legacy verify levels


def issue(certs: Certs, name: str) -> Path:
    """Another client certificate from the good CA (key and chain in one file)."""
    path = certs.dir / f"{name}.pem"
    if not path.exists():
        certs.ca.issue_cert(name).private_key_and_cert_chain_pem.write_to_path(str(path))
    return path


def leaf_pem(pair: Path) -> bytes:
    data = pair.read_bytes()
    start = data.index(b"-----BEGIN CERTIFICATE-----")
    end = data.index(b"-----END CERTIFICATE-----") + len(b"-----END CERTIFICATE-----\n")
    return data[start:end]


# the client each level lets in: none, good (CA's, in CAfile), stranger (CA's, not in
# CAfile), other (another CA's, its leaf in CAfile)
LEVELS = {
    1: {"none": True, "good": True, "stranger": True, "other": False},
    2: {"none": False, "good": True, "stranger": True, "other": False},
    3: {"none": False, "good": True, "stranger": False, "other": False},
    4: {"none": False, "good": True, "stranger": False, "other": True},
}


@pytest.mark.parametrize("level", sorted(LEVELS))
def test_legacy_verify_levels(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, level: int, tmp_path: Path
) -> None:
    """verify = 1 (chain if a certificate is given), 2 (chain, certificate required),
    3 (chain and the leaf in CAfile), 4 (only the leaf in CAfile, any chain)."""
    good, stranger = issue(certs, "good-client.example"), issue(certs, "stranger.example")
    cafile = tmp_path / "cafile.pem"
    cafile.write_bytes(certs.ca_pem.read_bytes() + leaf_pem(good) + leaf_pem(certs.other_server_pem))
    t = server(tunnels, certs, echo, impl, f"verify = {level}\nCAfile = {cafile}\n")
    clients = {"none": None, "good": good, "stranger": stranger, "other": certs.other_server_pem}
    seen = {who: works(t.port("srv"), client_ctx(certs, chain)) for who, chain in clients.items()}
    assert seen == LEVELS[level]


# ------------------------------------------------------------------ sessionCacheSize


@pytest.mark.parametrize(("size", "resumed"), [(1, False), (10, True), (0, True)])
def test_session_cache_size_evicts(
    tunnels: TunnelFactory,
    certs: Certs,
    echo: EchoServer,
    impl: str,
    size: int,
    resumed: bool,
    tmp_path: Path,
) -> None:
    """Session IDs (TLS 1.2 without tickets): with room for one session, a second client's
    session evicts the first, which then cannot resume; 10 or unlimited (0) keep it."""
    t = server(tunnels, certs, echo, impl, f"sessionCacheSize = {size}\n")
    first, second = tmp_path / "first.sess", tmp_path / "second.sess"
    args = ("-tls1_2", "-no_ticket")
    assert "\nNew, TLSv1.2" in s_client(t.port("srv"), *args, "-sess_out", str(first))
    assert "\nNew, TLSv1.2" in s_client(t.port("srv"), *args, "-sess_out", str(second))
    again = s_client(t.port("srv"), *args, "-sess_in", str(first))
    assert ("\nReused, TLSv1.2" in again) is resumed, again
    assert ("\nNew, TLSv1.2" in again) is not resumed, again


# ------------------------------------------------------------------ PKCS#12


def pkcs12_of(pair: Path, out: Path) -> Path:
    data = pair.read_bytes()
    key = load_pem_private_key(data, None)
    chain = x509.load_pem_x509_certificates(data)
    blob = pkcs12.serialize_key_and_certificates(
        b"server",
        key,
        chain[0],
        chain[1:] or None,
        NoEncryption(),  # type: ignore[arg-type]
    )
    out.write_bytes(blob)
    out.chmod(0o600)
    return out


def test_pkcs12_cert_in_a_running_tunnel(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, tmp_path: Path
) -> None:
    """cert = a PKCS#12 file (key and chain, no password): the tunnel serves that
    certificate, and a client verifying against the CA gets through."""
    p12 = pkcs12_of(certs.server_pem, tmp_path / "server.p12")
    t = tunnels.start(
        tunnels.conf(f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {p12}\n"),
        impl=impl,
    )
    s = talks(t.port("srv"), client_ctx(certs))
    assert s is not None
    with s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    served = x509.load_der_x509_certificate(der)
    assert served == x509.load_pem_x509_certificates(certs.server_pem.read_bytes())[0]
    assert served.public_bytes(Encoding.PEM) in certs.server_pem.read_bytes()


@pytest.mark.parametrize("route", ["openssl", "memfd"])
def test_pkcs12_key_never_touches_a_file_system(
    certs: Certs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    """The PKCS#12 key goes to OpenSSL from memory (tunnel.ossl), or, where that bridge is
    unavailable, through an anonymous memfd; no temporary file is ever made.  The context
    built either way serves a real handshake."""
    import tempfile

    from tunnel import conf, ossl, tls

    def no_files(*_args: object, **_kw: object) -> None:
        raise AssertionError("a temporary file was made for the key")

    for name in ("mkstemp", "NamedTemporaryFile", "TemporaryFile", "mkdtemp"):
        monkeypatch.setattr(tempfile, name, no_files)
    if route == "openssl":
        monkeypatch.setattr(os, "memfd_create", no_files)
    else:

        def unavailable(*_args: object) -> None:
            raise ossl.Unavailable("test: the bridge is away")

        monkeypatch.setattr(ossl, "use_key_and_chain", unavailable)
    p12 = pkcs12_of(certs.server_pem, tmp_path / "server.p12")
    settings = conf.load_bytes(
        f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:1\ncert = {p12}\n".encode(), "t"
    )
    ctx = tls.build(settings.services[0], secure=False).context
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        client = socket.create_connection(lsock.getsockname(), timeout=15)
        conn, _ = lsock.accept()
        conn.settimeout(15)
        import threading

        done: list[bytes] = []
        server_thread = threading.Thread(
            target=lambda: done.append(ctx.wrap_socket(conn, server_side=True).recv(4)), daemon=True
        )
        server_thread.start()
        with client_ctx(certs).wrap_socket(client, server_hostname="localhost") as tls_client:
            tls_client.sendall(b"p12!")
            server_thread.join(15)
        conn.close()
    assert done == [b"p12!"]
