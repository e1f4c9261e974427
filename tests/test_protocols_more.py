"""``protocol =`` beyond smtp: pop3, imap, nntp, ldap, pgsql, cifs, connect, socks, proxy.

Every scenario runs the same configuration under pytunnel and Debian's stunnel4 (``impl``)
against faithful fake servers (tests/protocol_servers.py) or real ones (PostgreSQL when
installed), moves real bytes through the negotiated TLS, and then lets the peer answer
wrongly (refusal, a bad greeting, garbage, a line over 8 KiB, EOF mid-negotiation): that
one connection ends with one log line naming the reason, and the next good one works.
"""

from __future__ import annotations

import base64
import imaplib
import os
import poplib
import pwd
import re
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import protocol_servers as fake
import pytest
from conftest import Certs, EchoServer, Tunnel, TunnelFactory, cannot_run_here, stunnel4_lacks
from loopback_support import free_port

USER, PASSWORD = "moo", "secret"
# stunnel's limit is 64 KiB, pytunnel's 8 KiB: the fakes send 100 KB
LONG_LINE = r"fd_getline: Line too long"
EOF = r"s_read: Unexpected socket close"
# inside TLS; stunnel names OpenSSL's error when the peer sent no close_notify
EOF_TLS = r"s_ssl_read: Unexpected socket close|s_ssl_read_eof: SSL_read: .*unexpected eof while reading"

# ------------------------------------------------------------------ helpers


def server_ctx(certs: Certs) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(certs.server_pem))
    return ctx


def client_ctx(certs: Certs) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs.ca_pem))


def client_section(name: str, protocol: str, port: int, certs: Certs, extra: str = "") -> str:
    return (
        f"[{name}]\nclient = yes\nprotocol = {protocol}\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{port}\n"
        f"verifyChain = yes\nCAfile = {certs.ca_pem}\ncheckHost = localhost\n{extra}"
    )


def server_section(name: str, protocol: str, port: int, certs: Certs, extra: str = "") -> str:
    return (
        f"[{name}]\nprotocol = {protocol}\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{port}\n"
        f"cert = {certs.server_pem}\n{extra}"
    )


@pytest.fixture
def servers() -> Iterator[list[fake.FakeServer]]:
    started: list[fake.FakeServer] = []
    yield started
    for srv in started:
        srv.close()


def expect(t: Tunnel, pattern: str, count: int = 1, timeout: float = 10.0) -> None:
    """Wait until ``pattern`` has been logged ``count`` times."""
    rx = re.compile(pattern, re.M)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(rx.findall(t.log)) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"/{pattern}/ not logged {count} time(s):\n{t.log}")


def exchange(port: int, send: bytes = b"", wait: float = 10.0, host: str = "127.0.0.1") -> bytes:
    """Connect, send, read until the tunnel ends the connection (EOF or reset)."""
    got = b""
    try:  # a fast tunnel may reset before connect() even returns
        with socket.create_connection((host, port), timeout=wait) as s:
            if send:
                s.sendall(send)
            while chunk := s.recv(65536):
                got += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    return got


def drain(s: socket.socket | ssl.SSLSocket) -> bytes:
    """Everything until EOF or a reset."""
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except (ConnectionResetError, ssl.SSLError):
        pass
    return got


def closed_without_reset(s: socket.socket) -> bytes:
    """Everything until a clean EOF; a reset fails the test."""
    got = b""
    while chunk := s.recv(65536):
        got += chunk
    return got


def hostile(
    t: Tunnel, srv: fake.FakeServer, port: int, mode: str, pattern: str, seen: dict[str, int]
) -> bytes:
    """One connection against a misbehaving peer: it ends with the log line ``pattern``."""
    srv.mode = mode
    got = exchange(port)
    seen[pattern] = seen.get(pattern, 0) + 1
    expect(t, pattern, seen[pattern])
    srv.mode = "good"
    return got


def recv_until(s: socket.socket | ssl.SSLSocket, end: bytes, limit: int = 1 << 20) -> bytes:
    got = b""
    while not got.endswith(end):
        chunk = s.recv(65536)
        if not chunk:
            raise AssertionError(f"EOF before {end!r}: {got[-200:]!r}")
        got += chunk
        assert len(got) < limit
    return got


def echo_through(s: socket.socket | ssl.SSLSocket, size: int = 100_000) -> None:
    """Real bytes both ways: ``size`` bytes out, the same bytes back."""
    data = os.urandom(size)
    got = b""
    if isinstance(s, ssl.SSLSocket):  # one SSL object must not read and write at once
        for at in range(0, size, 16384):
            s.sendall(data[at : at + 16384])
            while len(got) < min(size, at + 16384):
                chunk = s.recv(65536)
                assert chunk, f"EOF after {len(got)} of {size} echoed bytes"
                got += chunk
        assert got == data
        return
    sender = threading.Thread(target=s.sendall, args=(data,), daemon=True)
    sender.start()
    while len(got) < size:
        chunk = s.recv(65536)
        assert chunk, f"EOF after {len(got)} of {size} echoed bytes"
        got += chunk
    sender.join(10)
    assert got == data


def local_address() -> str | None:
    """A non-loopback IPv4 address of this host (SOCKS refuses loopback destinations)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # no packet is sent
            addr = str(probe.getsockname()[0])
    except OSError:
        return None
    if addr.startswith("127.") or addr == "0.0.0.0":
        return None
    try:
        with socket.socket() as s:
            s.bind((addr, 0))
    except OSError:
        return None
    return addr


MESSAGE_LINES = fake.MESSAGE


# ------------------------------------------------------------------ pop3


def test_pop3_client_stls(
    tunnels: TunnelFactory, certs: Certs, servers: list[fake.FakeServer], impl: str
) -> None:
    """poplib speaks plaintext to the tunnel; the maildrop gets STLS, then the same session."""
    srv = fake.FakeServer(fake.pop3(starttls=True), server_ctx(certs))
    servers.append(srv)
    t = tunnels.start(tunnels.conf(client_section("pop3", "pop3", srv.port, certs)), impl=impl)
    port = t.port("pop3")

    def session() -> None:
        pop = poplib.POP3("127.0.0.1", port, timeout=20)
        assert pop.getwelcome().startswith(b"+OK POP3 fake ready")  # the upstream's greeting
        pop.user(USER)
        pop.pass_(PASSWORD)  # the maildrop refuses PASS outside TLS
        _resp, lines, _octets = pop.retr(1)
        assert lines == MESSAGE_LINES
        pop.quit()

    session()
    assert "RETR tls=True" in srv.events and "STLS tls=False" in srv.events
    seen: dict[str, int] = {}
    assert hostile(t, srv, port, "refuse", "Server does not support TLS", seen).startswith(b"+OK POP3")
    assert hostile(t, srv, port, "bad-greeting", "Unknown server welcome", seen) == b""
    hostile(t, srv, port, "garbage", "Unknown server welcome", seen)
    hostile(t, srv, port, "long-line", LONG_LINE, seen)
    hostile(t, srv, port, "eof", EOF, seen)
    session()
    assert t.stop() == 0


def test_failed_negotiation_counts_no_bytes(
    tunnels: TunnelFactory, certs: Certs, servers: list[fake.FakeServer], impl: str
) -> None:
    """The app's early bytes and the greeting the protocol passes on were never relayed
    through TLS: the close line counts 0 and 0, as stunnel's does."""
    srv = fake.FakeServer(fake.pop3(starttls=True), server_ctx(certs))
    servers.append(srv)
    t = tunnels.start(tunnels.conf(client_section("pop3", "pop3", srv.port, certs)), impl=impl)
    srv.mode = "refuse"
    assert exchange(t.port("pop3"), send=b"USER early\r\n").startswith(b"+OK POP3")
    expect(t, r"Server does not support TLS")
    expect(
        t, r"Connection (reset|closed)(/reset|/closed)?: 0 byte\(s\) sent to TLS, 0 byte\(s\) sent to socket"
    )
    assert t.stop() == 0


def test_pop3_server_stls(
    tunnels: TunnelFactory, certs: Certs, servers: list[fake.FakeServer], impl: str
) -> None:
    """poplib does CAPA + STLS against the tunnel, which relays to a plaintext maildrop."""
    srv = fake.FakeServer(fake.pop3(starttls=False))
    servers.append(srv)
    t = tunnels.start(tunnels.conf(server_section("pop3s", "pop3", srv.port, certs)), impl=impl)
    port = t.port("pop3s")

    def session() -> None:
        pop = poplib.POP3("localhost", port, timeout=20)
        assert pop.getwelcome().endswith(b" + stunnel")
        pop.stls(client_ctx(certs))  # poplib sends CAPA first and wants STLS in the tunnel's answer
        pop.user(USER)
        pop.pass_(PASSWORD)
        assert pop.retr(1)[1] == MESSAGE_LINES
        pop.quit()

    session()
    assert "RETR tls=False" in srv.events  # behind the tunnel it is plaintext
    # the client goes on in plaintext instead of STLS
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        assert recv_until(s, b"\r\n").startswith(b"+OK POP3 fake ready")
        s.sendall(b"USER moo\r\n")
        with pytest.raises(ConnectionResetError):
            while s.recv(100):
                pass
    expect(t, "Client does not want TLS")
    # the client disappears after the greeting
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        recv_until(s, b"\r\n")
    if impl == "pytunnel":
        expect(t, EOF)
        # the maildrop refuses: its answer reaches the client unchanged (stunnel decorates it)
        srv.mode = "bad-greeting"
        assert exchange(port).startswith(b"-ERR [SYS/TEMP] too busy")
        expect(t, "Unknown server welcome")
        srv.mode = "good"
    session()
    assert t.stop() == 0


# ------------------------------------------------------------------ imap

MESSAGE_BYTES = b"".join(line + b"\r\n" for line in MESSAGE_LINES)


def imap_session(m: imaplib.IMAP4) -> None:
    m.login(USER, PASSWORD)
    assert m.select("INBOX")[0] == "OK"
    typ, data = m.fetch("1", "(RFC822)")
    assert typ == "OK" and isinstance(data[0], tuple) and data[0][1] == MESSAGE_BYTES
    m.logout()


def test_imap_client_starttls(
    tunnels: TunnelFactory, certs: Certs, servers: list[fake.FakeServer], impl: str
) -> None:
    """imaplib talks plaintext to the tunnel, which did STARTTLS with the server first."""
    srv = fake.FakeServer(fake.imap(starttls=True), server_ctx(certs))
    servers.append(srv)
    t = tunnels.start(tunnels.conf(client_section("imap", "imap", srv.port, certs)), impl=impl)
    port = t.port("imap")

    def session() -> None:
        m = imaplib.IMAP4("127.0.0.1", port, timeout=20)
        assert m.welcome == b"* OK Connected."  # the tunnel's greeting replaces the server's
        imap_session(m)

    session()
    assert "STARTTLS tls=False" in srv.events and "FETCH tls=True" in srv.events
    # the server refuses STARTTLS: the app is told so and the tunnel closes without a reset
    srv.mode = "refuse"
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        got = closed_without_reset(s)
    assert got == b"* OK Connected.\r\n* BYE stunnel: Server does not support TLS\r\n"
    expect(t, "Server does not support TLS")
    seen: dict[str, int] = {}
    hostile(t, srv, port, "bad-greeting", "Unknown server welcome", seen)
    hostile(t, srv, port, "long-line", LONG_LINE, seen)
    hostile(t, srv, port, "eof", EOF, seen)
    session()
    assert t.stop() == 0


def test_imap_server_starttls(
    tunnels: TunnelFactory, certs: Certs, servers: list[fake.FakeServer], impl: str
) -> None:
    """imaplib does CAPABILITY + STARTTLS with the tunnel; implicit TLS works on the same port."""
    srv = fake.FakeServer(fake.imap(starttls=False))
    servers.append(srv)
    t = tunnels.start(tunnels.conf(server_section("imaps", "imap", srv.port, certs)), impl=impl)
    port = t.port("imaps")

    def session() -> None:
        m = imaplib.IMAP4("localhost", port, timeout=20)
        # the server's greeting, its CAPABILITY code disabled, marked by the tunnel
        assert (
            m.welcome == b"* OK [KAPABILITY IMAP4rev1 SASL-IR LITERAL+ AUTH=PLAIN] fake IMAP ready. (stunnel)"
        )
        m.starttls(client_ctx(certs))  # asks CAPABILITY first: the server's list + STARTTLS
        imap_session(m)

    session()
    assert "CAPABILITY tls=False" in srv.events
    # RFC 2595 not detected: a client that starts with TLS gets TLS at once
    m = imaplib.IMAP4_SSL("localhost", port, ssl_context=client_ctx(certs), timeout=20)
    assert m.welcome.startswith(b"* OK [CAPABILITY IMAP4rev1")
    imap_session(m)
    # a command other than CAPABILITY/STARTTLS/LOGOUT before TLS
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        recv_until(s, b"(stunnel)\r\n")
        s.sendall(b"a1 LOGIN moo secret\r\n")
        got = closed_without_reset(s)
    assert got == b"* BYE stunnel: unexpected command\r\na1 BAD LOGIN moo secret unexpected\r\n"
    expect(t, "Unexpected client command LOGIN moo secret")
    deadline = time.monotonic() + 5
    while "LOGOUT stunnel" not in srv.events and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "LOGOUT stunnel" in srv.events  # the tunnel logged out of the server cleanly
    # LOGOUT before STARTTLS: answered by the tunnel
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        recv_until(s, b"(stunnel)\r\n")
        s.sendall(b"a2 LOGOUT\r\n")
        assert closed_without_reset(s) == b"* BYE server terminating\r\na2 OK LOGOUT completed\r\n"
    seen: dict[str, int] = {}
    hostile(t, srv, port, "bad-greeting", "Unknown server welcome", seen)
    session()
    assert t.stop() == 0


# ------------------------------------------------------------------ nntp


def test_nntp_client_starttls(
    tunnels: TunnelFactory, certs: Certs, servers: list[fake.FakeServer], impl: str
) -> None:
    srv = fake.FakeServer(fake.nntp, server_ctx(certs))
    servers.append(srv)
    t = tunnels.start(tunnels.conf(client_section("nntp", "nntp", srv.port, certs)), impl=impl)
    port = t.port("nntp")

    def session() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            assert recv_until(s, b"\r\n").startswith(b"200 news.test InterNetNews")
            s.sendall(b"CAPABILITIES\r\n")
            caps = recv_until(s, b"\r\n.\r\n")
            assert b"READER" in caps and b"STARTTLS" not in caps  # asked inside TLS
            s.sendall(b"BODY <1@news.test>\r\n")
            assert (
                recv_until(s, b"\r\n.\r\n")
                == b"222 0 <1@news.test> body\r\nbody line 1\r\nbody line 2\r\n.\r\n"
            )
            s.sendall(b"QUIT\r\n")
            assert recv_until(s, b"\r\n") == b"205 Bye!\r\n"

    session()
    assert "BODY tls=True" in srv.events
    seen: dict[str, int] = {}
    assert hostile(t, srv, port, "refuse", "Server does not support TLS", seen).startswith(b"200 ")
    hostile(t, srv, port, "bad-greeting", "Unknown server welcome", seen)
    hostile(t, srv, port, "long-line", LONG_LINE, seen)
    hostile(t, srv, port, "eof", EOF, seen)
    session()
    assert t.stop() == 0


# ------------------------------------------------------------------ ldap


def recv_ber(s: socket.socket) -> bytes:
    head = recv_exact(s, 2)
    size, extra = head[1], b""
    if size & 0x80:
        extra = recv_exact(s, size & 0x7F)
        size = int.from_bytes(extra, "big")
    return head + extra + recv_exact(s, size)


def recv_exact(s: socket.socket | ssl.SSLSocket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        assert chunk, f"EOF after {len(got)} of {n} bytes"
        got += chunk
    return got


def test_ldap_client_starttls(
    tunnels: TunnelFactory, certs: Certs, servers: list[fake.FakeServer], impl: str
) -> None:
    """The app binds in plaintext (sent before the tunnel finished StartTLS); the directory
    sees the bind inside TLS.  slapd's and Active Directory's (four-byte lengths) answers."""
    srv = fake.FakeServer(fake.ldap, server_ctx(certs))
    servers.append(srv)
    t = tunnels.start(tunnels.conf(client_section("ldap", "ldap", srv.port, certs)), impl=impl)
    port = t.port("ldap")

    def session(mode: str = "good") -> None:
        srv.mode = mode
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            s.sendall(fake.ldap_bind_request(1, b"cn=moo,dc=test", b"secret"))
            assert recv_ber(s) == fake.ldap_result(1, 0x61, 0)  # success (13 outside TLS)
            s.sendall(fake.ber(0x30, fake.ber(0x02, b"\x02") + b"\x42\x00"))  # unbind
        srv.mode = "good"

    session()
    session("winldap")
    assert srv.events.count("bind cn=moo,dc=test secret tls=True") == 2
    assert srv.events.count("extended 1.3.6.1.4.1.1466.20037 tls=False") == 2
    # byte for byte what stunnel sends: messageID 1, [APPLICATION 23] { [0] the OID }
    assert f"raw 301d020101771880{len(fake.STARTTLS_OID):02x}{fake.STARTTLS_OID.hex()}" in srv.events
    seen: dict[str, int] = {}
    hostile(t, srv, port, "refuse", r"LDAP response has indicated an error \(52\)", seen)
    hostile(t, srv, port, "garbage", "LDAP response is not UNIVERSAL SEQUENCE", seen)
    hostile(t, srv, port, "long-line", r"LDAP response too long \(1000 byte\(s\)\)", seen)
    hostile(t, srv, port, "eof", EOF, seen)
    session()
    assert t.stop() == 0


# ------------------------------------------------------------------ pgsql

SSL_REQUEST = struct.pack("!II", 8, 80877103)
GSSENC_REQUEST = struct.pack("!II", 8, 80877104)
STARTUP = struct.pack("!II", 8 + 5 + 4 + 9, 196608) + b"user\0moo\0database\0moo\0\0"


def test_pgsql_client_sslrequest(
    tunnels: TunnelFactory, certs: Certs, servers: list[fake.FakeServer], impl: str
) -> None:
    srv = fake.FakeServer(fake.pgsql, server_ctx(certs))
    servers.append(srv)
    t = tunnels.start(tunnels.conf(client_section("pg", "pgsql", srv.port, certs)), impl=impl)
    port = t.port("pg")

    def session() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            echo_through(s)

    session()
    assert f"request {SSL_REQUEST.hex()}" in srv.events and any(
        e.startswith("echo tls=True") for e in srv.events
    )
    seen: dict[str, int] = {}
    hostile(t, srv, port, "refuse", "PostgreSQL server rejected TLS", seen)
    hostile(t, srv, port, "garbage", "PostgreSQL server rejected TLS", seen)
    hostile(t, srv, port, "eof", EOF, seen)
    session()
    assert t.stop() == 0


def test_pgsql_server_sslrequest(tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str) -> None:
    t = tunnels.start(tunnels.conf(server_section("pg", "pgsql", echo.port, certs)), impl=impl)
    port = t.port("pg")

    def session() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
            raw.sendall(SSL_REQUEST)
            assert recv_exact(raw, 1) == b"S"
            with client_ctx(certs).wrap_socket(raw, server_hostname="localhost") as s:
                echo_through(s)

    session()
    # GSSAPI encryption first (libpq's gssencmode=prefer): refused with an ErrorResponse,
    # closed without a reset so that libpq reads it and retries with SSLRequest
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(GSSENC_REQUEST)
        got = closed_without_reset(s)
    fields = b"SERROR\0CXX000\0MSSL expected but not requested by client\0\0"
    assert got == b"E" + struct.pack("!I", 4 + len(fields)) + fields
    expect(t, "GSSAPI encryption requested, rejecting gracefully")
    assert exchange(port, STARTUP) == b""  # a plaintext client: dropped
    expect(t, "PostgreSQL client did not request TLS, rejecting")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(SSL_REQUEST[:4])  # then EOF in the middle of the request
    expect(t, EOF)
    session()
    assert t.stop() == 0


# ------------------------------------------------------------------ cifs


def test_cifs_client_and_server(
    tunnels: TunnelFactory, certs: Certs, servers: list[fake.FakeServer], echo: EchoServer, impl: str
) -> None:
    """NetBIOS: the client asks with an empty session request and wants "use TLS" (0x8e);
    the server answers a session request with it."""
    srv = fake.FakeServer(fake.cifs, server_ctx(certs))
    servers.append(srv)
    body = client_section("cifs-c", "cifs", srv.port, certs) + server_section(
        "cifs-s", "cifs", echo.port, certs
    )
    t = tunnels.start(tunnels.conf(body), impl=impl)
    client_port, server_port = t.port("cifs-c"), t.port("cifs-s")

    def client_session() -> None:
        with socket.create_connection(("127.0.0.1", client_port), timeout=20) as s:
            echo_through(s)

    def server_session() -> None:
        with socket.create_connection(("127.0.0.1", server_port), timeout=20) as raw:
            # NB_SSN_REQUEST: called and calling names, each 0x20 + 32 encoded bytes + 0
            raw.sendall(b"\x81\x00\x00\x44" + (b"\x20" + b"CKFDENECFDEFFCFGEFFCCACACACACACA\0") * 2)
            assert recv_exact(raw, 5) == b"\x83\x00\x00\x01\x8e"
            with client_ctx(certs).wrap_socket(raw, server_hostname="localhost") as s:
                echo_through(s)

    client_session()
    server_session()
    assert "request 81000000" in srv.events
    seen: dict[str, int] = {}
    hostile(t, srv, client_port, "refuse", "Remote server does not require TLS", seen)
    hostile(t, srv, client_port, "garbage", "Negative response expected", seen)
    hostile(t, srv, client_port, "long-line", "Unexpected NetBIOS response size", seen)
    hostile(t, srv, client_port, "eof", EOF, seen)
    # a session keepalive instead of a request: access denied (0x81)
    assert exchange(server_port, b"\x85\x00\x00\x00") == b"\x83\x00\x00\x01\x81"
    expect(t, "Client did not send session setup")
    assert exchange(server_port, b"\x81\x00\x01\x00") == b""
    expect(t, "Received block too long")
    client_session()
    server_session()
    assert t.stop() == 0


# ------------------------------------------------------------------ connect


def test_connect_client_through_proxy(
    tunnels: TunnelFactory, certs: Certs, servers: list[fake.FakeServer], impl: str
) -> None:
    """CONNECT through an HTTP proxy with basic authentication and extra headers; TLS then
    runs with the target behind the proxy."""
    target = fake.FakeServer(fake.echo, server_ctx(certs), tls_from_start=True)
    proxy = fake.FakeServer(fake.connect_proxy)
    servers.extend([target, proxy])
    extra = (
        f"protocolHost = localhost:{target.port}\nprotocolUsername = {USER}\nprotocolPassword = {PASSWORD}\n"
        "protocolHeader = X-Forwarded-For: 192.0.2.7\nprotocolHeader = User-Agent: pytunnel-test\n"
    )
    t = tunnels.start(tunnels.conf(client_section("https", "connect", proxy.port, certs, extra)), impl=impl)
    port = t.port("https")

    def session() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            echo_through(s)

    session()
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    assert proxy.events[:5] == [
        f"CONNECT localhost:{target.port} HTTP/1.1",
        f"Host: localhost:{target.port}",
        f"Proxy-Authorization: basic {token}",
        "X-Forwarded-For: 192.0.2.7",
        "User-Agent: pytunnel-test",
    ]
    assert any(e.startswith("echo tls=True") for e in target.events)
    seen: dict[str, int] = {}
    hostile(t, proxy, port, "refuse", "CONNECT request rejected", seen)  # 407
    hostile(t, proxy, port, "garbage", "CONNECT request rejected", seen)
    hostile(t, proxy, port, "long-line", LONG_LINE, seen)
    hostile(t, proxy, port, "eof", EOF, seen)
    session()
    assert t.stop() == 0
    assert PASSWORD not in t.log and token not in t.log


def test_connect_client_sends_protocol_host_as_sni(
    tunnels: TunnelFactory, certs: Certs, servers: list[fake.FakeServer], impl: str
) -> None:
    """TLS runs with protocolHost, not with the proxy: stunnel's SNI default is protocolHost's
    host name (options.c sni_init) -- the proxy's name would pick the wrong virtual host."""
    names: list[str | None] = []
    ctx = server_ctx(certs)

    def remember(_sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _ctx: ssl.SSLContext) -> None:
        names.append(name)

    ctx.sni_callback = remember
    target = fake.FakeServer(fake.echo, ctx, tls_from_start=True)
    proxy = fake.FakeServer(fake.connect_proxy)
    servers.extend([target, proxy])
    extra = f"protocolHost = localhost:{target.port}\n"
    t = tunnels.start(tunnels.conf(client_section("https", "connect", proxy.port, certs, extra)), impl=impl)
    with socket.create_connection(("127.0.0.1", t.port("https")), timeout=20) as s:
        echo_through(s, 1000)
    assert names == ["localhost"]
    assert t.stop() == 0


def test_connect_server_and_chain(tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str) -> None:
    """Server mode answers a plaintext CONNECT, then TLS, then connects where it was asked
    (not to ``connect``).  A client-mode connect section chains through it."""
    server_port = free_port()
    body = (
        f"[proxy-s]\nprotocol = connect\naccept = 127.0.0.1:{server_port}\nconnect = 127.0.0.1:9\n"
        f"cert = {certs.server_pem}\n"
    ) + client_section("proxy-c", "connect", server_port, certs, f"protocolHost = 127.0.0.1:{echo.port}\n")
    t = tunnels.start(tunnels.conf(body), impl=impl)
    port = t.port("proxy-s")
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        raw.sendall(f"CONNECT 127.0.0.1:{echo.port} HTTP/1.1\r\nHost: 127.0.0.1:{echo.port}\r\n\r\n".encode())
        answer = recv_until(raw, b"\r\n\r\n")
        assert re.fullmatch(rb"HTTP/1\.0 200 OK\r\nServer: stunnel/5\.\d+\r\n\r\n", answer), answer
        with client_ctx(certs).wrap_socket(raw, server_hostname="localhost") as s:
            echo_through(s)
    with socket.create_connection(("127.0.0.1", t.port("proxy-c")), timeout=20) as s:
        echo_through(s)  # app -> client tunnel -CONNECT+TLS-> server tunnel -> echo
    refusals = [
        (b"GET / HTTP/1.1\r\n\r\n", b"HTTP/1.0 400 Bad Request Method\r\n", "400 Bad Request Method"),
        (
            b"CONNECT 127.0.0.1:80\r\n\r\n",
            b"HTTP/1.0 400 Bad Request Protocol\r\n",
            "400 Bad Request Protocol",
        ),
        (
            b"CONNECT no-such-host.invalid:443 HTTP/1.1\r\n\r\n",
            b"HTTP/1.0 404 Not Found\r\n",
            "404 Not Found",
        ),
    ]
    for request, status, reason in refusals:
        got = exchange(port, request)
        assert got == b"" or got.startswith(status), got  # written just before the reset
        if impl == "pytunnel":  # stunnel logs no reason here, only "Connection reset"
            expect(t, reason)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"CONNECT 127.0.0.1:1 HTTP/1.1\r\n")  # EOF before the empty line
    expect(t, EOF)
    with socket.create_connection(("127.0.0.1", t.port("proxy-c")), timeout=20) as s:
        echo_through(s)
    assert t.stop() == 0


# ------------------------------------------------------------------ socks


def socks_section(name: str, port: int | str, certs: Certs, impl: str) -> str:
    # stunnel counts "protocol = socks" as the second endpoint and refuses a connect line
    del impl
    return f"[{name}]\nprotocol = socks\naccept = 127.0.0.1:{port}\ncert = {certs.server_pem}\n"


def socks5_hello(s: ssl.SSLSocket, methods: bytes = b"\x00") -> bytes:
    s.sendall(bytes([5, len(methods)]) + methods)
    return recv_exact(s, 2)


def test_socks_server_and_client(tunnels: TunnelFactory, certs: Certs, impl: str) -> None:
    """SOCKS 4, 4a and 5 inside TLS; the destination comes from the request.  A client-mode
    socks section (SOCKS5 to protocolHost after TLS) chains through the same server."""
    addr = local_address()
    if addr is None:
        cannot_run_here("SOCKS refuses loopback destinations and this host has no other IPv4 address")
    echo = EchoServer(addr)
    try:
        server_port = free_port()
        body = socks_section("socks-s", server_port, certs, impl) + client_section(
            "socks-c", "socks", server_port, certs, f"protocolHost = {addr}:{echo.port}\n"
        )
        t = tunnels.start(tunnels.conf(body), impl=impl)
        port = t.port("socks-s")
        ip, eport = socket.inet_aton(addr), struct.pack("!H", echo.port)
        ctx = client_ctx(certs)

        def tls() -> ssl.SSLSocket:
            return ctx.wrap_socket(
                socket.create_connection(("127.0.0.1", port), timeout=20), server_hostname="localhost"
            )

        with tls() as s:  # SOCKS5, IPv4 address: the answer echoes it
            assert socks5_hello(s) == b"\x05\x00"
            s.sendall(b"\x05\x01\x00\x01" + ip + eport)
            assert recv_exact(s, 10) == b"\x05\x00\x00\x01" + ip + eport
            echo_through(s)
        with tls() as s:  # SOCKS5, a host name (this address written out)
            assert socks5_hello(s) == b"\x05\x00"
            s.sendall(b"\x05\x01\x00\x03" + bytes([len(addr)]) + addr.encode() + eport)
            assert recv_exact(s, 10) == b"\x05\x00\x00\x01" + bytes(6)
            echo_through(s)
        with tls() as s:  # SOCKS4
            s.sendall(b"\x04\x01" + eport + ip + b"moo\0")
            assert recv_exact(s, 8) == b"\x00\x5a" + eport + ip
            echo_through(s)
        with tls() as s:  # SOCKS4a: address 0.0.0.1, the name after the user id
            s.sendall(b"\x04\x01" + eport + b"\0\0\0\x01" + b"moo\0" + addr.encode() + b"\0")
            assert recv_exact(s, 8) == b"\x00\x5a" + eport + b"\0\0\0\x01"
            echo_through(s)
        if impl == "pytunnel":  # stunnel 5.68's socks client ignores protocolHost
            with socket.create_connection(("127.0.0.1", t.port("socks-c")), timeout=20) as app:
                echo_through(app)  # app -> client tunnel -TLS+SOCKS5-> server tunnel -> echo
        # refusals: answered, then closed without a reset (stunnel's "don't reset")
        with tls() as s:
            assert socks5_hello(s) == b"\x05\x00"
            s.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1") + eport)
            assert closed_without_reset(s) == b"\x05\x02\x00\x01\x7f\x00\x00\x01" + eport
        expect(t, "SOCKS connection to the IPv4 loopback rejected")
        with tls() as s:
            s.sendall(b"\x04\x01" + eport + socket.inet_aton("127.0.0.2") + b"\0")
            assert closed_without_reset(s) == b"\x00\x5b" + eport + socket.inet_aton("127.0.0.2")
        expect(t, "SOCKS connection to the IPv4 loopback rejected", 2)
        with tls() as s:
            assert socks5_hello(s, b"\x02") == b"\x05\xff"  # username/password only
            assert closed_without_reset(s) == b""
        expect(t, "No supported SOCKS5 authentication method received")
        with tls() as s:
            assert socks5_hello(s) == b"\x05\x00"
            s.sendall(b"\x05\x02\x00\x01" + ip + eport)  # BIND
            assert closed_without_reset(s) == b"\x05\x07\x00\x01" + bytes(6)  # address not read
        expect(t, "Unsupported SOCKS5 command 0x02")
        with tls() as s:
            s.sendall(b"\x06\x01")
            assert drain(s) == b""  # reset (stunnel) or closed
        expect(t, "Unsupported SOCKS version 0x06")
        with tls() as s:
            s.sendall(b"\x05")  # and then nothing: EOF in the middle of the request
            s.shutdown(socket.SHUT_WR)  # (a close with unread session tickets would reset)
            drain(s)
        expect(t, EOF_TLS)
        with tls() as s:  # the Tor RESOLVE extension: an answer, then the end
            assert socks5_hello(s) == b"\x05\x00"
            s.sendall(b"\x05\xf0\x00\x03" + bytes([len(addr)]) + addr.encode() + b"\0\0")
            assert closed_without_reset(s) == b"\x05\x00\x00\x01" + ip + b"\0\0"
        with tls() as s:
            assert socks5_hello(s) == b"\x05\x00"
            s.sendall(b"\x05\x01\x00\x01" + ip + eport)
            assert recv_exact(s, 10)[:2] == b"\x05\x00"
            echo_through(s)
        assert t.stop() == 0
    finally:
        echo.close()


def test_socks_client_against_socks_server(
    tunnels: TunnelFactory, certs: Certs, servers: list[fake.FakeServer], echo: EchoServer, impl: str
) -> None:
    """Client mode against a SOCKS5-over-TLS server: method negotiation, CONNECT with the
    protocolHost name, then the app's bytes; the server's refusals in SOCKS5's words."""
    if impl == "stunnel4":
        stunnel4_lacks(
            "its socks client ignores protocolHost (the DOMAINNAME request came in a later "
            "stunnel): it always asks SO_ORIGINAL_DST (see test_socks_client_transparent)"
        )
    srv = fake.FakeServer(fake.socks5_tls, server_ctx(certs), tls_from_start=True)
    servers.append(srv)
    extra = f"protocolHost = 127.0.0.1:{echo.port}\n"
    t = tunnels.start(tunnels.conf(client_section("socks", "socks", srv.port, certs, extra)), impl=impl)
    port = t.port("socks")

    def session() -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
            echo_through(s)

    session()
    assert f"connect atyp=3 127.0.0.1:{echo.port}" in srv.events  # sent as a DOMAINNAME
    seen: dict[str, int] = {}
    hostile(t, srv, port, "refuse", "No supported SOCKS5 authentication method received", seen)
    hostile(t, srv, port, "garbage", "Invalid SOCKS5 message version 0x04", seen)
    hostile(t, srv, port, "long-line", "SOCKS5 request failed: Connection refused", seen)
    hostile(t, srv, port, "eof", EOF_TLS, seen)
    session()
    assert t.stop() == 0


def test_socks_client_transparent(
    tunnels: TunnelFactory, certs: Certs, servers: list[fake.FakeServer], impl: str
) -> None:
    """Without protocolHost the destination is the one iptables REDIRECT hid (SO_ORIGINAL_DST);
    a connection that was not redirected ends with stunnel's error, without a reset."""
    srv = fake.FakeServer(fake.socks5_tls, server_ctx(certs), tls_from_start=True)
    servers.append(srv)
    t = tunnels.start(tunnels.conf(client_section("socks", "socks", srv.port, certs)), impl=impl)
    for n in (1, 2):  # and the process keeps serving
        with socket.create_connection(("127.0.0.1", t.port("socks")), timeout=20) as s:
            assert closed_without_reset(s) == b""  # (unread bytes would make any close a reset)
        expect(t, re.escape("getsockopt SO_ORIGINAL_DST: No such file or directory (2)"), n)
    assert not any(e.startswith("connect ") for e in srv.events)  # no request was sent
    assert t.stop() == 0


def test_socks_server_needs_no_connect(tunnels: TunnelFactory, certs: Certs, impl: str) -> None:
    """stunnel: accept + protocol = socks are the two endpoints; a connect line is one too many."""
    conf = tunnels.conf(socks_section("socks", 0, certs, "stunnel4"))
    t = tunnels.start(conf, impl=impl)
    assert t.stop() == 0
    bad = tunnels.conf(socks_section("socks", 0, certs, "stunnel4") + "connect = 127.0.0.1:9\n")
    t = tunnels.start(bad, impl=impl, wait=False)
    assert t.proc.wait(20) == 1
    assert "Each service must define two endpoints" in t.log


# ------------------------------------------------------------------ proxy


def test_proxy_header_v1(
    tunnels: TunnelFactory, certs: Certs, servers: list[fake.FakeServer], impl: str
) -> None:
    """The upstream first reads ``PROXY TCP4 client tunnel cport tport``, then the data."""
    srv = fake.FakeServer(fake.proxy_reader)
    servers.append(srv)
    body = server_section("proxy", "proxy", srv.port, certs) + (
        f"[proxy6]\nprotocol = proxy\naccept = ::1:0\nconnect = 127.0.0.1:{srv.port}\ncert = {certs.server_pem}\n"
        if socket.has_ipv6
        else ""
    )
    t = tunnels.start(tunnels.conf(body), impl=impl)
    port = t.port("proxy")
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        cport = raw.getsockname()[1]
        with client_ctx(certs).wrap_socket(raw, server_hostname="localhost") as s:
            echo_through(s)
    assert srv.events[0] == f"v1 PROXY TCP4 127.0.0.1 127.0.0.1 {cport} {port}\r\n"
    if socket.has_ipv6:
        with socket.create_connection(("::1", t.port("proxy6")), timeout=20) as raw:
            cport = raw.getsockname()[1]
            with client_ctx(certs).wrap_socket(raw, server_hostname="localhost") as s:
                echo_through(s, 1000)
        assert f"v1 PROXY TCP6 ::1 ::1 {cport} {t.port('proxy6')}\r\n" in srv.events
    # nothing for the upstream to answer wrongly; one that hangs up after the header
    # ends that connection only
    srv.mode = "eof"
    with client_ctx(certs).wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=20), server_hostname="localhost"
    ) as s:
        s.sendall(b"x")
        assert s.recv(10) == b""
    srv.mode = "good"
    with client_ctx(certs).wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=20), server_hostname="localhost"
    ) as s:
        echo_through(s)
    assert t.stop() == 0


def test_proxy_header_v2_pytunnel_only(
    tunnels: TunnelFactory, certs: Certs, servers: list[fake.FakeServer]
) -> None:
    """``protocol = proxy-v2`` (stunnel has only v1): the binary header with the TLS facts."""
    srv = fake.FakeServer(fake.proxy_reader)
    servers.append(srv)
    extra = f"verifyChain = yes\nCAfile = {certs.ca_pem}\n"
    t = tunnels.start(tunnels.conf(server_section("p2", "proxy-v2", srv.port, certs, extra)))
    port = t.port("p2")
    ctx = client_ctx(certs)
    ctx.load_cert_chain(str(certs.client_pem))
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw:
        cport = raw.getsockname()[1]
        with ctx.wrap_socket(raw, server_hostname="localhost") as s:
            echo_through(s)
            version, cipher = s.version(), s.cipher()
    header = fake.parse_proxy_v2(bytes.fromhex(srv.events[0][3:]))
    assert (header["version"], header["command"], header["family"]) == (2, 1, 0x11)
    assert header["src"] == ("127.0.0.1", cport) and header["dst"] == ("127.0.0.1", port)
    ssl_tlv = header["tlvs"][0x20]
    assert ssl_tlv[0] == 0x07 and ssl_tlv[1:5] == b"\0\0\0\0"  # TLS, client cert (conn+sess), verified
    sub = fake.parse_tlvs(ssl_tlv[5:])
    assert version is not None and sub[0x21] == version.encode()
    assert cipher is not None and sub[0x23] == cipher[0].encode()
    assert t.stop() == 0


# ------------------------------------------------------------------ a real PostgreSQL


@pytest.fixture(scope="module")
def postgres(certs: Certs) -> Iterator[int]:
    """A throwaway PostgreSQL cluster on 127.0.0.1 with TLS on.  Not installed: see
    cannot_run_here; installed but initdb or the server fails: a failure, with its error."""
    server, client = shutil.which("postgres"), shutil.which("psql")
    if server is None:  # Debian keeps the server binaries off PATH
        found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"))
        server = str(found[-1]) if found else None
    if server is None or client is None:
        cannot_run_here("PostgreSQL is not installed (apt-get install postgresql; .ci/run installs it)")
    initdb = Path(os.path.realpath(server)).parent / "initdb"
    user: str | None = None
    if os.geteuid() == 0:  # postgres refuses to run as root
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            cannot_run_here("running as root and there is no postgres user to run PostgreSQL as")
        user = "postgres"
    # pytest's temporary directories are private to root; the cluster's user must reach this one
    base = Path(tempfile.mkdtemp(prefix="pytunnel-pg-"))
    proc: subprocess.Popen[bytes] | None = None
    try:
        data, pem, log = base / "data", base / "server.pem", base / "postgres.log"
        shutil.copy(certs.server_pem, pem)
        pem.chmod(0o600)
        if user is not None:
            for path in (base, pem):
                shutil.chown(path, user, user)
        run = subprocess.run(
            [str(initdb), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"],
            capture_output=True,
            user=user,
            timeout=60,
        )
        if run.returncode != 0:
            pytest.fail(f"initdb failed ({run.returncode}):\n{run.stderr.decode(errors='replace')[-2000:]}")
        (data / "pg_hba.conf").write_text(
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 trust\n"
        )
        port = free_port()
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [server, "-D", str(data), "-p", str(port), "-k", str(base), "-c", "listen_addresses=127.0.0.1",
                 "-c", "ssl=on", "-c", f"ssl_cert_file={pem}", "-c", f"ssl_key_file={pem}", "-c", "fsync=off"],
                stdout=out, stderr=subprocess.STDOUT, user=user,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while b"ready to accept connections" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"PostgreSQL did not start (exit {proc.poll()}):\n{log.read_text()[-2000:]}")
            time.sleep(0.05)
        yield port
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(20)
        shutil.rmtree(base, ignore_errors=True)


def psql(conninfo: str, query: str) -> str:
    run = subprocess.run(
        ["psql", "-X", "-A", "-t", "-c", query, conninfo],
        capture_output=True,
        timeout=30,
        env={**os.environ, "PGCONNECT_TIMEOUT": "10"},
    )
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    return run.stdout.decode().strip()


def test_pgsql_against_real_postgres(tunnels: TunnelFactory, certs: Certs, postgres: int, impl: str) -> None:
    """psql without TLS -> client tunnel -> PostgreSQL with TLS; psql with verify-full ->
    server tunnel -> PostgreSQL in plaintext."""
    body = client_section("pg-c", "pgsql", postgres, certs) + server_section("pg-s", "pgsql", postgres, certs)
    t = tunnels.start(tunnels.conf(body), impl=impl)
    query = "select ssl, repeat('ab', 100000) from pg_stat_ssl where pid = pg_backend_pid()"
    client = f"host=127.0.0.1 port={t.port('pg-c')} user=postgres dbname=postgres sslmode=disable"
    assert psql(client, query) == "t|" + "ab" * 100000  # PostgreSQL saw TLS: the tunnel's
    server = (
        f"host=localhost port={t.port('pg-s')} user=postgres dbname=postgres sslmode=verify-full "
        f"sslrootcert={certs.ca_pem} gssencmode=disable"
    )
    assert psql(server, query) == "f|" + "ab" * 100000  # psql verified the tunnel; behind it, plaintext
    assert psql(server, "select 42") == "42"
    assert t.stop() == 0


# ------------------------------------------------------------------ configuration


def test_connect_client_without_protocol_host(
    tunnels: TunnelFactory, certs: Certs, servers: list[fake.FakeServer], impl: str
) -> None:
    """stunnel 5.68 accepts the section and fails each connection; later stunnel (and pytunnel)
    refuse the configuration, naming the line."""
    proxy = fake.FakeServer(fake.connect_proxy)
    servers.append(proxy)
    conf = tunnels.conf(client_section("https", "connect", proxy.port, certs))
    if impl == "pytunnel":
        t = tunnels.start(conf, impl=impl, wait=False)
        assert t.proc.wait(20) == 1
        assert '"protocol = connect": Service [https]: protocolHost not specified' in t.log
        return
    t = tunnels.start(conf, impl=impl)
    for n in (1, 2):
        exchange(t.port("https"))
        expect(t, "protocolHost not specified", n)
    assert not any(e.startswith("CONNECT") for e in proxy.events)  # connected, nothing sent
    assert t.stop() == 0


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ("protocol = nntp\n", "protocol is not supported in the server mode"),
        ("protocol = ldap\n", "protocol is not supported in the server mode"),
        ("client = yes\nprotocol = proxy\n", "protocol is not supported in the client mode"),
        ("client = yes\nprotocol = proxy-v2\n", "not supported in the client mode|Protocol not supported"),
        (
            "client = yes\nprotocol = connect\nprotocolHost = www.example:443\nprotocolUsername = u\n"
            "protocolPassword = p\nprotocolAuthentication = ntlm\n",
            "protocolAuthentication = ntlm is not valid with protocol = connect",
        ),
    ],
)
def test_protocol_mode_errors(
    tunnels: TunnelFactory, certs: Certs, body: str, needle: str, impl: str
) -> None:
    conf = tunnels.conf(
        f"[x]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\ncert = {certs.server_pem}\n{body}"
    )
    if impl == "stunnel4" and "ntlm" in body:
        # stunnel 5.68 does NTLM (MD4 + DES through OpenSSL's low-level API): it takes the
        # section; pytunnel refuses it
        t = tunnels.start(conf, impl=impl)
        assert t.stop() == 0
        return
    t = tunnels.start(conf, impl=impl, wait=False)
    assert t.proc.wait(20) == 1
    assert re.search(needle, t.log), t.log
