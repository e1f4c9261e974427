"""``redirect`` and the session options (``sessionCacheSize``, ``sessionCacheTimeout``,
``sessionResume = no`` in server mode, ``ticketKeySecret``/``ticketMacSecret``), plus
``ciphersuites`` and ``curves`` lists: what pytunnel sets on the SSL_CTX through
tunnel/ossl.py.  Every scenario runs with stunnel4 in pytunnel's place, same config file."""

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
from conftest import Certs, EchoServer, Tunnel, TunnelFactory, pytunnel_cmd, roundtrip, wait_until
from loopback_support import TagServer, free_port, wait_port

TICKET_KEY = "00112233445566778899aabbccddeeff"
TICKET_MAC = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100"


@pytest.fixture
def backends() -> Iterator[tuple[TagServer, TagServer]]:
    good, other = TagServer(b"GOOD:"), TagServer(b"REDIRECTED:")
    yield good, other
    good.close()
    other.close()


_CONTEXTS: dict[tuple[str, str, ssl.TLSVersion | None], ssl.SSLContext] = {}


def tls_client(
    certs: Certs,
    port: int,
    cert: Path | None = None,
    session: ssl.SSLSession | None = None,
    max_version: ssl.TLSVersion | None = None,
    data: bytes = b"hi",
) -> tuple[bytes, ssl.SSLSession | None, bool, str | None]:
    """One TLS connection: (reply up to EOF, session, session_reused, cipher name).
    One context per (CA, certificate, version): a session resumes only on its context."""
    key = (str(certs.ca_pem), str(cert), max_version)
    ctx = _CONTEXTS.get(key)
    if ctx is None:
        ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
        if cert is not None:
            ctx.load_cert_chain(str(cert))
        if max_version is not None:
            ctx.maximum_version = max_version
        _CONTEXTS[key] = ctx
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    with ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(1000)
            except (ConnectionResetError, ssl.SSLError):
                break
            if not chunk:
                break
            out += chunk
        cipher = s.cipher()
        return out, s.session, s.session_reused, cipher[0] if cipher else None


# ------------------------------------------------------------------ redirect


def redirect_conf(
    tunnels: TunnelFactory, certs: Certs, good: TagServer, other: TagServer, extra: str = ""
) -> Path:
    return tunnels.conf(
        f"[r]\naccept = 127.0.0.1:{free_port()}\nconnect = 127.0.0.1:{good.port}\n"
        f"redirect = 127.0.0.1:{other.port}\ncert = {certs.server_pem}\nCAfile = {certs.ca_pem}\n"
        f"verifyChain = yes\n{extra}"
    )


def test_redirect_sends_failed_clients_elsewhere(
    tunnels: TunnelFactory, certs: Certs, backends: tuple[TagServer, TagServer], impl: str
) -> None:
    good, other = backends
    t = tunnels.start(redirect_conf(tunnels, certs, good, other), impl=impl)
    port = t.port("r")
    assert tls_client(certs, port, cert=certs.client_pem)[0] == b"GOOD:hi"
    # a certificate from another CA, and no certificate at all: both complete the handshake
    # and reach the redirect address, as with stunnel
    assert tls_client(certs, port, cert=certs.other_server_pem)[0] == b"REDIRECTED:hi"
    assert tls_client(certs, port)[0] == b"REDIRECTED:hi"
    assert tls_client(certs, port, cert=certs.client_pem)[0] == b"GOOD:hi"
    assert (good.count, other.count) == (2, 2)
    assert t.log.count("Redirecting connection") == 2
    assert "CERT: Pre-verification error: unable to get local issuer certificate" in t.log
    assert re.search(r"Rejected by CERT at depth=0: .*Testing cert", t.log)


def test_redirect_on_failed_name_and_pin_checks(
    tunnels: TunnelFactory, certs: Certs, backends: tuple[TagServer, TagServer], impl: str
) -> None:
    """checkHost (a failure found after OpenSSL's chain check) redirects too."""
    good, other = backends
    conf = redirect_conf(tunnels, certs, good, other, extra="checkHost = client.example\n")
    t = tunnels.start(conf, impl=impl)
    port = t.port("r")
    assert tls_client(certs, port, cert=certs.client_pem)[0] == b"GOOD:hi"
    assert tls_client(certs, port, cert=certs.wrong_name_pem)[0] == b"REDIRECTED:hi"
    assert "Redirecting connection" in t.log


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_a_redirected_client_cannot_resume_into_the_real_service(
    tunnels: TunnelFactory,
    certs: Certs,
    backends: tuple[TagServer, TagServer],
    impl: str,
    version: ssl.TLSVersion,
) -> None:
    """Resuming skips certificate verification: a redirected client offering its session
    again must be verified (and redirected) again, never let through."""
    good, other = backends
    t = tunnels.start(redirect_conf(tunnels, certs, good, other), impl=impl)
    port = t.port("r")
    reply, session, _, _ = tls_client(certs, port, cert=certs.other_server_pem, max_version=version)
    assert reply == b"REDIRECTED:hi"
    for _ in range(3):
        reply, session, _, _ = tls_client(
            certs, port, cert=certs.other_server_pem, session=session, max_version=version
        )
        assert reply == b"REDIRECTED:hi"
    assert good.count == 0
    assert tls_client(certs, port, cert=certs.client_pem, max_version=version)[0] == b"GOOD:hi"


def test_redirect_in_client_mode_is_stunnels_error(tunnels: TunnelFactory, impl: str) -> None:
    conf = tunnels.conf(
        "[c]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\nredirect = 127.0.0.1:10\n"
    )
    t = tunnels.start(conf, impl=impl, wait=False)
    assert t.proc.wait(30) != 0
    assert '"redirect" is unsupported in client sections' in t.log


# ------------------------------------------------------------------ sessions


def server_conf(
    tunnels: TunnelFactory, certs: Certs, backends: tuple[TagServer, TagServer], port: int, extra: str = ""
) -> Path:
    return tunnels.conf(
        f"[s]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{backends[0].port}\ncert = {certs.server_pem}\n{extra}"
    )


def resumes(certs: Certs, port: int, version: ssl.TLSVersion, session: ssl.SSLSession | None = None) -> bool:
    if session is None:
        _, session, _, _ = tls_client(certs, port, max_version=version)
    _, _, reused, _ = tls_client(certs, port, session=session, max_version=version)
    return reused


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_session_resume_no_in_server_mode(
    tunnels: TunnelFactory,
    certs: Certs,
    backends: tuple[TagServer, TagServer],
    impl: str,
    version: ssl.TLSVersion,
) -> None:
    on = tunnels.start(server_conf(tunnels, certs, backends, free_port()), impl=impl)
    assert resumes(certs, on.port("s"), version) is True
    off = tunnels.start(server_conf(tunnels, certs, backends, free_port(), "sessionResume = no\n"), impl=impl)
    assert resumes(certs, off.port("s"), version) is False


def test_session_cache_timeout_expires_sessions(
    tunnels: TunnelFactory, certs: Certs, backends: tuple[TagServer, TagServer], impl: str
) -> None:
    conf = server_conf(
        tunnels, certs, backends, free_port(), "sessionCacheTimeout = 1\nsessionCacheSize = 10\n"
    )
    t = tunnels.start(conf, impl=impl)
    v12 = ssl.TLSVersion.TLSv1_2
    _, session, _, _ = tls_client(certs, t.port("s"), max_version=v12)
    assert resumes(certs, t.port("s"), v12, session) is True
    # the session ages out of the cache after a second: no longer offered for resumption
    wait_until(
        lambda: not resumes(certs, t.port("s"), v12, session),
        timeout=20,
        what="the session expires (sessionCacheTimeout = 1)",
        interval=0.3,
    )


def hup(t: Tunnel) -> None:
    done = len(re.findall(r"Configuration successful", t.log))
    t.signal(signal.SIGHUP)
    deadline = time.monotonic() + 15
    while len(re.findall(r"Configuration successful", t.log)) <= done:
        assert time.monotonic() < deadline, t.log
        time.sleep(0.02)
    for port in t.ports["s"]:  # stunnel4 binds its listener again after the line
        wait_port(port, t.proc, "the reloaded tunnel", timeout=15)


@pytest.mark.parametrize("keys", [True, False])
def test_ticket_keys_keep_resumption_across_a_reload(
    tunnels: TunnelFactory, certs: Certs, backends: tuple[TagServer, TagServer], impl: str, keys: bool
) -> None:
    """With ticketKeySecret/ticketMacSecret a ticket issued before SIGHUP still resumes
    after it (the new SSL_CTX has the same keys); without them it does not (random keys
    per context), with stunnel as with pytunnel."""
    extra = f"ticketKeySecret = {TICKET_KEY}\nticketMacSecret = {TICKET_MAC}\n" if keys else ""
    t = tunnels.start(server_conf(tunnels, certs, backends, free_port(), extra), impl=impl)
    port = t.port("s")
    v13 = ssl.TLSVersion.TLSv1_3
    _, session, _, _ = tls_client(certs, port, max_version=v13)
    assert resumes(certs, port, v13, session) is True
    hup(t)
    assert resumes(certs, port, v13, session) is keys


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("ticketKeySecret = 0011", "ticketKeySecret"),
        (f"ticketKeySecret = {TICKET_KEY}", '"ticketKeySecret" and "ticketMacSecret" must be set together'),
    ],
)
def test_bad_ticket_secrets_are_rejected(
    tunnels: TunnelFactory, certs: Certs, line: str, message: str, impl: str
) -> None:
    conf = tunnels.conf(
        f"[s]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\ncert = {certs.server_pem}\n{line}\n"
    )
    t = tunnels.start(conf, impl=impl, wait=False)
    assert t.proc.wait(30) != 0
    assert message in t.log
    if impl == "pytunnel" and line.endswith("= 0011"):
        assert "2 bytes instead of required 16 or 32 bytes" in t.log


# ------------------------------------------------------------------ ciphersuites and curves


def test_ciphersuites_and_curves_lists(
    tunnels: TunnelFactory, certs: Certs, backends: tuple[TagServer, TagServer], impl: str
) -> None:
    conf = server_conf(
        tunnels,
        certs,
        backends,
        free_port(),
        "ciphersuites = TLS_CHACHA20_POLY1305_SHA256\ncurves = P-384:X25519\n",
    )
    t = tunnels.start(conf, impl=impl)
    reply, _, _, cipher = tls_client(certs, t.port("s"), max_version=ssl.TLSVersion.TLSv1_3)
    assert reply == b"GOOD:hi"
    assert cipher == "TLS_CHACHA20_POLY1305_SHA256"


@pytest.mark.parametrize(
    ("line", "option"), [("ciphersuites = NOPE", "ciphersuites"), ("curves = P-384:nope", "curves")]
)
def test_bad_ciphersuites_or_curves_name_the_option(
    tmp_path: Path, certs: Certs, line: str, option: str
) -> None:
    conf = tmp_path / "bad.conf"
    conf.write_text(f"[s]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\ncert = {certs.server_pem}\n{line}\n")
    out = subprocess.run(pytunnel_cmd("check", str(conf)), capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert f"{option}:" in out.stderr or f'"{line}"' in out.stderr


def test_relay_still_works_through_a_redirect_service(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer
) -> None:
    """A big transfer through a redirect service's good path: the ctypes verify callback
    costs nothing on the data path."""
    server = tunnels.start(
        tunnels.conf(
            f"[r]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\nredirect = 127.0.0.1:9\n"
            f"cert = {certs.server_pem}\nCAfile = {certs.ca_pem}\nverifyChain = yes\n"
        )
    )
    client_conf = tunnels.conf(
        f"[c]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{server.port('r')}\ncert = {certs.client_pem}\n"
    )
    client = tunnels.start(client_conf)
    payload = bytes(range(256)) * 8192
    assert roundtrip(client.port("c"), payload) == payload
    assert "Redirecting" not in server.log


# ------------------------------------------------------------------ config = COMMAND:VALUE


def test_openssl_config_commands(
    tunnels: TunnelFactory, certs: Certs, backends: tuple[TagServer, TagServer], impl: str
) -> None:
    """config = MinProtocol:TLSv1.3 refuses a TLS 1.2 client; Options:-SessionTicket and
    the TLS 1.3 client still work (SSL_CONF commands in the order given)."""
    conf = server_conf(
        tunnels,
        certs,
        backends,
        free_port(),
        "config = MinProtocol:TLSv1.3\nconfig = Options:-SessionTicket\n",
    )
    t = tunnels.start(conf, impl=impl)
    assert tls_client(certs, t.port("s"), max_version=ssl.TLSVersion.TLSv1_3)[0] == b"GOOD:hi"
    with pytest.raises(ssl.SSLError):
        tls_client(certs, t.port("s"), max_version=ssl.TLSVersion.TLSv1_2)


def test_unknown_openssl_config_command_is_stunnels_error(
    tunnels: TunnelFactory, certs: Certs, impl: str
) -> None:
    conf = tunnels.conf(
        f"[s]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\ncert = {certs.server_pem}\nconfig = Bogus:1\n"
    )
    t = tunnels.start(conf, impl=impl, wait=False)
    assert t.proc.wait(30) != 0
    assert 'OpenSSL config command "Bogus" was not recognised' in t.log


@pytest.mark.parametrize("store", ["ca", "other"])
def test_castore_uri_is_the_trust_store(
    tunnels: TunnelFactory, certs: Certs, backends: tuple[TagServer, TagServer], store: str
) -> None:
    """CAstore = file:PATH (OSSL_STORE, stunnel 5.75+; Debian's 5.68 lacks it): the
    upstream certificate verifies against that store only."""
    server = tunnels.start(server_conf(tunnels, certs, backends, free_port()))
    pem = certs.ca_pem if store == "ca" else certs.other_ca_pem
    client = tunnels.start(
        tunnels.conf(
            f"[c]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{server.port('s')}\n"
            f"verifyChain = yes\nCAstore = file:{pem}\ncheckHost = localhost\n"
        )
    )
    if store == "ca":
        assert roundtrip(client.port("c"), b"hi") == b"GOOD:hi"
    else:
        with socket.create_connection(("127.0.0.1", client.port("c")), timeout=10) as s:
            s.sendall(b"hi")
            try:
                got = s.recv(100)
            except ConnectionResetError:
                got = b""
        assert got == b""
        client.wait_for(r"certificate verify failed")
