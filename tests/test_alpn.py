"""``alpn = PROTO[,PROTO...]`` (pytunnel extension), both modes, against OpenSSL's own tools.

stunnel 5.68 has no ALPN option, so these run pytunnel only; the peers are real: ``openssl
s_client -alpn`` in front of a pytunnel server, ``openssl s_server -alpn`` behind a pytunnel
client, and two pytunnels (client -> server) with the negotiated name in the PROXY v2 header
and the JSON close line.
"""

from __future__ import annotations

import contextlib
import json
import socket
import ssl
import subprocess
from collections.abc import Iterator

import protocol_servers as fake
import pytest
from conftest import Certs, EchoServer, Tunnel, TunnelFactory, need_tool, roundtrip
from identity_support import wait_metric
from loopback_support import free_port, wait_port


def server(tunnels: TunnelFactory, certs: Certs, port: int, alpn: str, extra: str = "", **kw: str) -> Tunnel:
    conf = tunnels.conf(
        f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{port}\ncert = {certs.server_pem}\n"
        f"alpn = {alpn}\n{extra}"
    )
    env = {"PYTUNNEL_STATUS": "127.0.0.1:0", **kw}
    return tunnels.start(conf, extra_env=env, mode="run")


def s_client(port: int, certs: Certs, offer: str | None) -> str:
    """openssl s_client's view of one handshake (its stdout and stderr)."""
    cmd = [need_tool("openssl"), "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "localhost"]
    cmd += ["-CAfile", str(certs.ca_pem), "-verify_return_error"]
    if offer is not None:
        cmd += ["-alpn", offer]
    out = subprocess.run(cmd, input=b"", capture_output=True, timeout=30)
    return (out.stdout + out.stderr).decode(errors="replace")


def test_server_selects_the_first_of_its_own_list(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer
) -> None:
    t = server(tunnels, certs, echo.port, "h2,http/1.1")
    # the client prefers http/1.1; the server's order decides
    assert "ALPN protocol: h2" in s_client(t.port("srv"), certs, "http/1.1,h2")
    assert "ALPN protocol: http/1.1" in s_client(t.port("srv"), certs, "http/1.1,spdy/3")
    t.wait_for(r"LOG6\[\d+\]: ALPN: negotiated h2$")
    t.wait_for(r"LOG6\[\d+\]: ALPN: negotiated http/1\.1$")


def test_no_common_protocol_gets_the_alert(tunnels: TunnelFactory, certs: Certs, echo: EchoServer) -> None:
    t = server(tunnels, certs, echo.port, "h2")
    seen = s_client(t.port("srv"), certs, "imap,pop3")
    assert "no application protocol" in seen, seen  # the alert, as the client reports it
    line = t.wait_for(r"LOG3\[\d+\]: SSL_accept: no application protocol$")
    assert (
        wait_metric(
            t, "pytunnel_handshake_failures_total", 1, service="srv", reason="no_application_protocol"
        )
        == 1
    )
    assert echo.received == 0
    # one line about it (and the close lines): no second complaint, no traceback
    assert t.log.count("no application protocol") == 1, line
    # a client offering no ALPN at all is served, by the same process
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    raw = socket.create_connection(("127.0.0.1", t.port("srv")), timeout=15)
    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
        assert s.selected_alpn_protocol() is None
        s.sendall(b"no alpn")
        assert s.recv(100) == b"no alpn"
    t.wait_for(r"ALPN: none negotiated")


@contextlib.contextmanager
def s_server(certs: Certs, alpn: str | None) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """openssl s_server [-alpn LIST] -rev: answers each line reversed."""
    port = free_port()
    cmd = [need_tool("openssl"), "s_server", "-accept", f"127.0.0.1:{port}", "-rev"]
    cmd += ["-cert", str(certs.server_pem)]
    proc = subprocess.Popen(
        cmd + (["-alpn", alpn] if alpn else []),
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(port, proc, "openssl s_server", timeout=15)
        yield port, proc
    finally:
        proc.kill()
        proc.wait()


def client(tunnels: TunnelFactory, certs: Certs, port: int, alpn: str, mode: str = "run") -> Tunnel:
    conf = tunnels.conf(
        f"[cli]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{port}\nalpn = {alpn}\n"
        f"verifyChain = yes\nCAfile = {certs.ca_pem}\ncheckHost = localhost\n"
    )
    return tunnels.start(conf, mode=mode)


def reversed_line(port: int, text: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(text + b"\n")
        got = b""
        while not got.endswith(b"\n"):
            chunk = s.recv(100)
            assert chunk, got
            got += chunk
        return got.strip()


@pytest.mark.parametrize("mode", ["compat", "run"])
def test_client_offers_and_logs(tunnels: TunnelFactory, certs: Certs, mode: str) -> None:
    with s_server(certs, "postgresql") as (port, _proc):
        t = client(tunnels, certs, port, "postgresql", mode)
        assert reversed_line(t.port("cli"), b"select 1") == b"1 tceles"
        t.wait_for(r"LOG6\[\d+\]: ALPN: negotiated postgresql$")


def test_client_without_a_common_protocol(tunnels: TunnelFactory, certs: Certs) -> None:
    """A server without ALPN: served, "none negotiated".  A server with other protocols
    alerts (s_server sends no_application_protocol): one line, counted, nothing relayed."""
    with s_server(certs, None) as (port, _proc):
        t = client(tunnels, certs, port, "postgresql")
        assert reversed_line(t.port("cli"), b"abc") == b"cba"
        t.wait_for(r"LOG6\[\d+\]: ALPN: none negotiated$")
    with s_server(certs, "h2") as (port, _proc):
        conf = tunnels.conf(
            f"[cli]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{port}\nalpn = postgresql\n"
            f"verifyChain = yes\nCAfile = {certs.ca_pem}\ncheckHost = localhost\n"
        )
        t = tunnels.start(conf, mode="run", extra_env={"PYTUNNEL_STATUS": "127.0.0.1:0"})
        with socket.create_connection(("127.0.0.1", t.port("cli")), timeout=15) as s:
            s.sendall(b"abc\n")
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(100) == b""
        t.wait_for(r"LOG3\[\d+\]: SSL_connect: .*no application protocol")
        got = wait_metric(
            t, "pytunnel_handshake_failures_total", 1, service="cli", reason="no_application_protocol"
        )
        assert got == 1


def test_pytunnel_to_pytunnel_into_proxy_v2_and_json(tunnels: TunnelFactory, certs: Certs) -> None:
    """A pytunnel client offering h2 to a pytunnel server choosing it: the upstream behind
    the server learns h2 from the PROXY v2 header, and the JSON close line says alpn=h2."""
    srv = fake.FakeServer(fake.proxy_reader)
    try:
        conf = tunnels.conf(
            f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{srv.port}\ncert = {certs.server_pem}\n"
            "alpn = h2,http/1.1\nprotocol = proxy-v2\n"
        )
        back = tunnels.start(conf, mode="run", extra_env={"PYTUNNEL_LOG_FORMAT": "json"}, wait=False)
        m = back.wait_for(r'"message":"Service \[srv\] \(FD=\d+\) bound to 127\.0\.0\.1:(\d+)"')
        back.ports["srv"] = [int(m.group(1))]
        back.wait_for("Accepting new connections")
        front = client(tunnels, certs, back.port("srv"), "h2")
        assert roundtrip(front.port("cli"), b"PRI * HTTP/2.0") == b"PRI * HTTP/2.0"
        header = fake.parse_proxy_v2(bytes.fromhex(srv.events[0][3:]))
        assert header["tlvs"][0x01] == b"h2"  # PP2_TYPE_ALPN
        front.wait_for(r"ALPN: negotiated h2")
        back.wait_for(r'"event":"closed"')
    finally:
        srv.close()
    closed = [d for d in map(json.loads, back.log.splitlines()) if d.get("event") == "closed"]
    assert [d.get("alpn") for d in closed] == ["h2"]


@pytest.mark.parametrize(
    ("value", "error"),
    [("h2,,http/1.1", "no empty names"), ("h2,h2", "listed twice"), ("x" * 300, "at most 255 bytes")],
)
def test_bad_lists_are_refused(tunnels: TunnelFactory, certs: Certs, value: str, error: str) -> None:
    conf = tunnels.conf(
        f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:1\ncert = {certs.server_pem}\nalpn = {value}\n"
    )
    t = tunnels.start(conf, wait=False)
    assert t.proc.wait(timeout=30) != 0
    assert error in t.log and f"{conf}:9" in t.log, t.log
