"""Bad input and faults: one connection fails, the process keeps serving, the log says why.

Every scenario ends with a good roundtrip through the same process, so a fault that
kills (or wedges) the tunnel is caught, and each asserts the one log line that names
the reason.  The same configs run under pytunnel and stunnel4 unless noted.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Certs, EchoServer, Tunnel, TunnelFactory, roundtrip, wait_until
from loopback_support import Listener, free_port

# ------------------------------------------------------------------ helpers


class TlsEchoServer(Listener):
    """A threaded TLS echo server (the upstream of a client-mode tunnel).

    Echoes until the peer's close_notify/EOF, then sends its own close_notify.
    ``handshakes`` counts completed handshakes, ``errors`` the failed connections."""

    timeout = 20.0

    def __init__(self, cert: Path) -> None:
        super().__init__(cert, backlog=64)

    def handle(self, s: Any) -> None:
        while data := s.recv(65536):
            s.sendall(data)
        self.end(s)


@pytest.fixture
def tls_echo(certs: Certs) -> Iterator[TlsEchoServer]:
    server = TlsEchoServer(certs.server_pem)
    yield server
    server.close()


def tls_roundtrip(port: int, data: bytes, certs: Certs, timeout: float = 20.0) -> bytes:
    """TLS to a server-mode tunnel in front of an echo: send ``data`` in lock-step chunks
    (one SSLSocket is not safe to read and write from two threads), read each chunk back,
    then exchange close_notify so the tunnel ends the connection cleanly."""
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    out = bytearray()
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        for i in range(0, len(data), 16384):
            s.sendall(data[i : i + 16384])
            want = min(len(data), i + 16384)
            while len(out) < want:
                chunk = s.recv(65536)
                if not chunk:
                    return bytes(out)
                out.extend(chunk)
        s.unwrap()
    return bytes(out)


def good_tls(port: int, certs: Certs) -> None:
    data = os.urandom(100_000)
    assert tls_roundtrip(port, data, certs) == data


def wait_closed(sock: socket.socket, timeout: float) -> str:
    """Read until the peer ends the connection: 'eof' or 'reset'."""
    sock.settimeout(timeout)
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return "reset"
        except TimeoutError:
            raise AssertionError(f"connection still open after {timeout}s") from None
        if not chunk:
            return "eof"


def rst_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def server_conf(tunnels: TunnelFactory, certs: Certs, connects: list[int], extra: str = "") -> Path:
    lines = "".join(f"connect = 127.0.0.1:{p}\n" for p in connects)
    return tunnels.conf(f"[srv]\naccept = 127.0.0.1:0\n{lines}cert = {certs.server_pem}\n{extra}")


# ------------------------------------------------------------------ bad input


def test_garbage_instead_of_client_hello(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    t = tunnels.start(server_conf(tunnels, certs, [echo.port]), impl=impl)
    with socket.create_connection(("127.0.0.1", t.port("srv")), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n" + os.urandom(2000))
        wait_closed(s, 10)
    t.wait_for(r"LOG3\[\d+\]: SSL_accept: .*(http request|wrong version number|record|packet)")
    assert echo.connections == 0
    good_tls(t.port("srv"), certs)
    assert t.stop() == 0


def client_hello() -> bytes:
    """A real TLS ClientHello, made by an SSLObject that nobody answers."""
    ctx = ssl.create_default_context()
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_peer_resets_mid_handshake(tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str) -> None:
    t = tunnels.start(server_conf(tunnels, certs, [echo.port]), impl=impl)
    s = socket.create_connection(("127.0.0.1", t.port("srv")), timeout=10)
    s.sendall(client_hello())
    assert s.recv(5)[:1] == b"\x16"  # the ServerHello record: the tunnel is mid-handshake
    rst_close(s)
    t.wait_for(r"LOG[35]\[\d+\]: .*(Connection reset by peer|reset|Peer suddenly disconnected)")
    assert echo.connections == 0
    good_tls(t.port("srv"), certs)
    assert t.stop() == 0


# ------------------------------------------------------------------ upstream faults


class SilentUpstream:
    """Accepts TCP (the kernel completes the handshake from the backlog) and never reads."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = int(self.sock.getsockname()[1])

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def silent() -> Iterator[SilentUpstream]:
    s = SilentUpstream()
    yield s
    s.close()


def check_mute_upstream(t: Tunnel, timeout_line: str) -> None:
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", t.port("mute")), timeout=10) as app:
        wait_closed(app, 8)
    assert time.monotonic() - start < 8
    t.wait_for(timeout_line)
    data = os.urandom(50_000)
    assert roundtrip(t.port("good"), data) == data
    assert t.stop() == 0


class Blackhole:
    """A listener whose accept queue is full (backlog 0, one connection never accepted):
    the kernel drops further SYNs, so connect() hangs until the caller's timeout."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.port = int(self.sock.getsockname()[1])
        self.filler = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        probe = socket.socket()
        probe.settimeout(0.5)
        try:
            with pytest.raises(TimeoutError):
                probe.connect(("127.0.0.1", self.port))
        finally:
            probe.close()

    def close(self) -> None:
        self.filler.close()
        self.sock.close()


def test_upstream_tcp_connect_timeout(tunnels: TunnelFactory, tls_echo: TlsEchoServer, impl: str) -> None:
    """TIMEOUTconnect bounds the TCP connect to the upstream (stunnel: `s_connect: s_poll_wait
    HOST:PORT: TIMEOUTconnect exceeded`, then `No more addresses to connect`)."""
    hole = Blackhole()
    try:
        t = tunnels.start(
            tunnels.conf(
                f"[mute]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{hole.port}\n"
                "TIMEOUTconnect = 2\n"
                f"[good]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{tls_echo.port}\n"
            ),
            impl=impl,
        )
        check_mute_upstream(
            t, rf"LOG3\[\d+\]: s_connect: s_poll_wait 127\.0\.0\.1:{hole.port}: TIMEOUTconnect exceeded$"
        )
        assert re.search(r"LOG3\[\d+\]: No more addresses to connect", t.log)
    finally:
        hole.close()


def test_server_connect_timeout_then_failover(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    """Server mode: TIMEOUTconnect bounds the connect to the first target (pytunnel lets uvloop
    connect a server's plain upstream), and failover goes on to the next, which serves."""
    hole = Blackhole()
    try:
        conf = server_conf(tunnels, certs, [hole.port, echo.port], "TIMEOUTconnect = 2\n")
        t = tunnels.start(conf, impl=impl)
        start = time.monotonic()
        good_tls(t.port("srv"), certs)
        assert time.monotonic() - start >= 1.5  # the first target's 2 s went by first
        t.wait_for(rf"LOG3\[\d+\]: s_connect: s_poll_wait 127\.0\.0\.1:{hole.port}: TIMEOUTconnect exceeded$")
        t.wait_for(rf"s_connect: connected 127\.0\.0\.1:{echo.port}")
        assert t.stop() == 0
    finally:
        hole.close()


def test_upstream_never_answers_tls_timeoutbusy(
    tunnels: TunnelFactory, tls_echo: TlsEchoServer, silent: SilentUpstream, impl: str
) -> None:
    """The upstream accepts TCP but never answers the ClientHello: stunnel waits for its TLS
    handshake for TIMEOUTbusy (observed on 5.68: `ssl_start: s_poll_wait: TIMEOUTbusy
    exceeded: sending reset`); TIMEOUTconnect bounds only the TCP connect."""
    t = tunnels.start(
        tunnels.conf(
            f"[mute]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{silent.port}\n"
            "TIMEOUTbusy = 2\n"
            f"[good]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{tls_echo.port}\n"
        ),
        impl=impl,
    )
    check_mute_upstream(t, r"LOG6\[\d+\]: ssl_start: s_poll_wait: TIMEOUTbusy exceeded: sending reset")


def test_upstream_speaks_plaintext(
    tunnels: TunnelFactory, echo: EchoServer, tls_echo: TlsEchoServer, impl: str
) -> None:
    """Client mode against a plain echo: the ClientHello comes back as the "server hello".
    The handshake failure is the reason logged (stunnel: `SSL_connect: ...unexpected message`)."""
    t = tunnels.start(
        tunnels.conf(
            f"[plain]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\n"
            f"[good]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{tls_echo.port}\n"
        ),
        impl=impl,
    )
    with socket.create_connection(("127.0.0.1", t.port("plain")), timeout=10) as app:
        app.sendall(b"hello")
        wait_closed(app, 10)
    t.wait_for(r"LOG3\[\d+\]: SSL_connect: .*unexpected message")
    assert "TLS error" not in t.log
    data = os.urandom(50_000)
    assert roundtrip(t.port("good"), data) == data
    assert t.stop() == 0


def test_upstream_refuses(tunnels: TunnelFactory, tls_echo: TlsEchoServer, impl: str) -> None:
    dead = free_port()
    t = tunnels.start(
        tunnels.conf(
            f"[dead]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{dead}\n"
            f"[good]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{tls_echo.port}\n"
        ),
        impl=impl,
    )
    with socket.create_connection(("127.0.0.1", t.port("dead")), timeout=10) as app:
        wait_closed(app, 5)
    t.wait_for(rf"LOG3\[\d+\]: s_connect: connect 127\.0\.0\.1:{dead}: Connection refused \(111\)")
    data = os.urandom(50_000)
    assert roundtrip(t.port("good"), data) == data
    assert t.stop() == 0


def test_failover_prio_skips_a_dead_target(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    dead = free_port()
    t = tunnels.start(server_conf(tunnels, certs, [dead, echo.port], "failover = prio\n"), impl=impl)
    for _ in range(3):
        good_tls(t.port("srv"), certs)
    assert echo.connections == 3
    t.wait_for(rf"s_connect: connect 127\.0\.0\.1:{dead}: Connection refused \(111\)")
    assert t.stop() == 0


def test_failover_rr_alternates(tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str) -> None:
    second = EchoServer()
    try:
        t = tunnels.start(server_conf(tunnels, certs, [echo.port, second.port], "failover = rr\n"), impl=impl)
        seen: list[tuple[int, int]] = []
        for _ in range(4):
            good_tls(t.port("srv"), certs)
            seen.append((echo.connections, second.connections))
        assert echo.connections == 2 and second.connections == 2, seen
        # strictly alternating: after every connection the two counts differ by at most one
        assert all(abs(a - b) <= 1 for a, b in seen), seen
        assert t.stop() == 0
    finally:
        second.close()


# ------------------------------------------------------------------ timeouts and close


def test_idle_timeout_closes_the_connection(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    t = tunnels.start(server_conf(tunnels, certs, [echo.port], "TIMEOUTidle = 2\n"), impl=impl)
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    with socket.create_connection(("127.0.0.1", t.port("srv")), timeout=10) as raw:
        s = ctx.wrap_socket(raw, server_hostname="localhost")
        s.sendall(b"hello")
        assert s.recv(5) == b"hello"
        start = time.monotonic()
        s.settimeout(10)
        try:
            assert s.recv(100) == b""
        except (ConnectionResetError, ssl.SSLError):
            pass
        except TimeoutError:
            raise AssertionError("idle connection still open after 10 s") from None
        assert time.monotonic() - start >= 1.0  # it was the idle timer, not an immediate close
    t.wait_for(r"LOG\d\[\d+\]: transfer: s_poll_wait: TIMEOUTidle exceeded")
    good_tls(t.port("srv"), certs)
    assert t.stop() == 0


class ReplyAfterEof(Listener):
    """A backend that reads until EOF and only then answers (sha256 + length of what it got)."""

    timeout = 20.0

    def handle(self, s: Any) -> None:
        h = hashlib.sha256()
        n = 0
        while chunk := s.recv(65536):
            h.update(chunk)
            n += len(chunk)
        s.sendall(h.digest() + n.to_bytes(8, "big") + b"x" * 200_000)
        s.shutdown(socket.SHUT_WR)


def test_half_close_reply_after_eof(tunnels: TunnelFactory, certs: Certs, impl: str) -> None:
    """The app half-closes; the reply that the backend sends only after EOF still arrives whole
    through a client tunnel and a server tunnel (EOF -> close_notify -> EOF, and back)."""
    backend = ReplyAfterEof()
    try:
        server = tunnels.start(server_conf(tunnels, certs, [backend.port]), impl=impl)
        client = tunnels.start(
            tunnels.conf(
                f"[cli]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{server.port('srv')}\n"
            ),
            impl=impl,
        )
        data = os.urandom(300_000)
        back = roundtrip(client.port("cli"), data)
        assert back == hashlib.sha256(data).digest() + len(data).to_bytes(8, "big") + b"x" * 200_000
        client.wait_for(r"Connection closed: 300000 byte\(s\) sent to TLS, 200040 byte\(s\) sent to socket")
        assert client.stop() == 0
        assert server.stop() == 0
    finally:
        backend.close()


# ------------------------------------------------------------------ reset = yes / no


@pytest.mark.parametrize(("reset", "expect"), [("yes", "reset"), ("no", "eof")])
def test_tls_error_reset_option(
    tunnels: TunnelFactory, certs: Certs, tls_echo: TlsEchoServer, impl: str, reset: str, expect: str
) -> None:
    untrusted = TlsEchoServer(certs.other_server_pem)
    try:
        t: Tunnel = tunnels.start(
            tunnels.conf(
                f"[bad]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{untrusted.port}\n"
                f"verifyChain = yes\nCAfile = {certs.ca_pem}\ncheckHost = localhost\nreset = {reset}\n"
                f"[good]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{tls_echo.port}\n"
                f"verifyChain = yes\nCAfile = {certs.ca_pem}\ncheckHost = localhost\nreset = {reset}\n"
            ),
            impl=impl,
        )
        with socket.create_connection(("127.0.0.1", t.port("bad")), timeout=10) as app:
            assert wait_closed(app, 10) == expect
        t.wait_for(r"LOG[34]\[\d+\]: .*certificate verify failed")
        data = os.urandom(50_000)
        assert roundtrip(t.port("good"), data) == data
        assert t.stop() == 0
    finally:
        untrusted.close()


# ------------------------------------------------------------------ unclean TLS EOF


class RawTlsClient:
    """A TLS client over SSLObject + MemoryBIO, so the test controls every TCP segment
    (here: a FIN without close_notify, which ssl.SSLSocket cannot send)."""

    def __init__(self, port: int, certs: Certs) -> None:
        ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_hostname="localhost")
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                data = self.sock.recv(65536)
                assert data, "tunnel closed during the handshake"
                self.incoming.write(data)
        self._flush()

    def _flush(self) -> None:
        if self.outgoing.pending:
            self.sock.sendall(self.outgoing.read())

    def send(self, data: bytes) -> None:
        self.obj.write(data)
        self._flush()

    def close(self) -> None:
        self.sock.close()


class RecordingBackend:
    """Reads until the connection ends and records how: 'eof' or 'reset'."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.port = self.sock.getsockname()[1]
        self.received = 0
        self.ended = threading.Event()
        self.how = ""
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(20)
            try:
                while chunk := conn.recv(65536):
                    self.received += len(chunk)
                self.how = "eof"
            except ConnectionResetError:
                self.how = "reset"
            except TimeoutError:
                self.how = "timeout"
            self.ended.set()

    def close(self) -> None:
        self.sock.close()


def test_tls_eof_without_close_notify_is_a_close(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    """A TLS client that sends a FIN without close_notify: stunnel treats it as the end of
    the connection (`TLS socket closed (SSL_read)`, info level), passes a clean EOF to the
    backend and logs `Connection closed`, not an error and a reset."""
    backend = RecordingBackend()
    try:
        t = tunnels.start(
            tunnels.conf(
                f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{backend.port}\ncert = {certs.server_pem}\n"
                f"[good]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
            ),
            impl=impl,
        )
        client = RawTlsClient(t.port("srv"), certs)
        client.send(b"u" * 5000)
        t.wait_for(r"Service \[srv\] connected remote server")
        wait_until(lambda: backend.received >= 5000, 20, "the backend got the 5000 bytes")
        client.sock.shutdown(socket.SHUT_WR)  # FIN, no close_notify
        assert backend.ended.wait(10)
        client.close()
        assert (backend.how, backend.received) == ("eof", 5000)
        t.wait_for(r"LOG5\[\d+\]: Connection closed: 0 byte\(s\) sent to TLS, 5000 byte\(s\) sent to socket")
        assert not any("LOG3" in line for line in t.log.splitlines() if "[ui]" not in line), (
            "an unclean TLS EOF is not an error"
        )
        good_tls(t.port("good"), certs)
        assert t.stop() == 0
    finally:
        backend.close()
