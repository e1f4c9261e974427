"""``acceptProxy = yes`` (a pytunnel extension): a PROXY v1/v2 header from a load balancer
before every accepted connection; its address becomes the client's.

Real processes: Debian's ``haproxy`` in front (``send-proxy``, ``send-proxy-v2``), pytunnel
behind it, the test's clients on 127.0.0.2 so the carried address differs from the load
balancer's (127.0.0.1).  Hostile headers are hand-built.  stunnel 5.68 cannot read a PROXY
header (it only sends one), so there is no stunnel4 control.
"""

from __future__ import annotations

import os
import re
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Certs, EchoServer, Tunnel, TunnelFactory, need_root, need_tool
from loopback_support import free_port
from monitoring_support import poll, start_with_status

SIG = b"\r\n\r\n\x00\r\nQUIT\n"
CLIENT_HOST = "127.0.0.2"  # the test's clients; the load balancer connects from 127.0.0.1


def v2(fam: int, body: bytes, cmd: int = 0x21) -> bytes:
    return SIG + bytes([cmd, fam]) + struct.pack("!H", len(body)) + body


def v2_inet(src: str, sport: int, dst: str, dport: int, tlvs: bytes = b"") -> bytes:
    body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return v2(0x11, body + tlvs)


def tlv(kind: int, value: bytes) -> bytes:
    return struct.pack("!BH", kind, len(value)) + value


def tls_after(
    sock: socket.socket, prefix: bytes, ctx: ssl.SSLContext, data: bytes, split: bool = False
) -> bytes:
    """A TLS exchange over ``sock`` whose first flight is ``prefix`` + the ClientHello in one
    write (or, ``split``, one byte per write): send ``data``, read as many bytes back."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname="localhost")
    pending = prefix
    first = [True]

    def flush() -> None:
        nonlocal pending
        pending += out.read()
        if split and first[0]:  # the first flight, one byte per segment
            for i in range(len(pending)):
                sock.send(pending[i : i + 1])
                time.sleep(0.001)
        elif pending:
            sock.sendall(pending)
        pending = b""
        first[0] = False

    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            flush()
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed during the handshake") from None
            inc.write(chunk)
    obj.write(data)
    flush()
    got = b""
    while len(got) < len(data):
        try:
            got += obj.read(65536)
        except ssl.SSLWantReadError:
            chunk = sock.recv(65536)
            if not chunk:
                break
            inc.write(chunk)
    return got


def client_socket(port: int, timeout: float = 15) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(CLIENT_HOST, 0))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def closed_by_peer(s: socket.socket, timeout: float) -> bool:
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


# ---- HAProxy in front ----------------------------------------------------------------------
class HAProxy:
    def __init__(self, tmp: Path, target: int, send: str) -> None:
        self.port = free_port()
        cfg = tmp / f"haproxy-{send}.cfg"
        cfg.write_text(
            "global\n    maxconn 256\ndefaults\n    mode tcp\n    timeout connect 5s\n"
            "    timeout client 30s\n    timeout server 30s\n"
            f"frontend fe\n    bind 127.0.0.1:{self.port}\n    default_backend be\n"
            f"backend be\n    server s1 127.0.0.1:{target} {send}\n"
        )
        self.proc = subprocess.Popen(
            [need_tool("haproxy", "haproxy"), "-db", "-f", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            except OSError:
                return False
            return True

        poll("haproxy to listen", up, timeout=30, every=0.05)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


class ProxyLineEcho(EchoServer):
    """protocol = proxy's backend: answers the PROXY line it got, then echoes."""

    def _handle(self, conn: socket.socket) -> None:
        try:
            line = b""
            while not line.endswith(b"\n"):
                chunk = conn.recv(1)
                if not chunk:
                    return
                line += chunk
            conn.sendall(line)
            super()._handle(conn)
        except OSError:
            conn.close()


@pytest.fixture
def fronted(
    tunnels: TunnelFactory, certs: Certs, tmp_path: Path
) -> Iterator[tuple[Tunnel, ProxyLineEcho, Path]]:
    prog = tmp_path / "whoami"
    prog.write_text('#!/bin/sh\necho "$REMOTE_HOST $REMOTE_PORT"\n')
    prog.chmod(0o755)
    backend = ProxyLineEcho()
    conf = tunnels.conf(
        "acceptProxy = yes\n"
        f"[whoami]\naccept = 127.0.0.1:0\nexec = {prog}\ncert = {certs.server_pem}\n"
        f"[onward]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{backend.port}\nprotocol = proxy\n"
        f"cert = {certs.server_pem}\n"
    )
    yield tunnels.start(conf), backend, prog
    backend.close()


@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
def test_haproxy_in_front(
    fronted: tuple[Tunnel, ProxyLineEcho, Path], certs: Certs, tmp_path: Path, send: str
) -> None:
    t, _backend, _prog = fronted
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    fronts = [HAProxy(tmp_path, t.port(name), send) for name in ("whoami", "onward")]
    try:
        with client_socket(fronts[0].port) as raw, ctx.wrap_socket(raw, server_hostname="localhost") as s:
            cport = s.getsockname()[1]
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
        assert answer == f"{CLIENT_HOST} {cport}\n".encode(), answer  # exec's REMOTE_HOST/PORT
        t.wait_for(rf"Service \[whoami\] accepted connection from {CLIENT_HOST}:{cport}$")
        version = 2 if send.endswith("v2") else 1
        t.wait_for(rf"PROXY v{version} header: client {CLIENT_HOST}:{cport} \(via 127\.0\.0\.1:\d+\)")

        with client_socket(fronts[1].port) as raw, ctx.wrap_socket(raw, server_hostname="localhost") as s:
            cport = s.getsockname()[1]
            s.sendall(b"payload\n")
            got = b""
            while not got.endswith(b"payload\n"):
                chunk = s.recv(4096)
                assert chunk, got
                got += chunk
        # the header sent onward names the client and the address it reached at the balancer
        assert got == f"PROXY TCP4 {CLIENT_HOST} 127.0.0.1 {cport} {fronts[1].port}\r\npayload\n".encode()
    finally:
        for f in fronts:
            f.close()


# ---- hand-built headers ------------------------------------------------------------------------
HOSTILE: dict[str, bytes] = {
    "no header (a ClientHello)": b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + os.urandom(32),
    "v1 truncated": b"PROXY TCP4 203.0.113.9 ",
    "v1 bad address": b"PROXY TCP4 203.0.113.999 127.0.0.1 4444 443\r\n",
    "v1 address of the other family": b"PROXY TCP4 ::1 127.0.0.1 4444 443\r\n",
    "v1 bad port": b"PROXY TCP4 203.0.113.9 127.0.0.1 99999 443\r\n",
    "v1 LF without CR": b"PROXY TCP4 203.0.113.9 127.0.0.1 4444 443\n",
    "v1 oversized": b"PROXY TCP4 " + b"1" * 120,
    "wrong signature": b"\r\n\r\n\x00\r\nQUIX\n" + bytes([0x21, 0x11, 0, 12]) + bytes(12),
    "v2 truncated": v2_inet("203.0.113.9", 4444, "127.0.0.1", 443)[:20],
    "v2 length short of its addresses": v2(0x11, bytes(4)),
    "v2 TLV longer than the header": v2_inet("203.0.113.9", 4444, "127.0.0.1", 443, b"\x01\x00\x32ab"),
    "v2 half a TLV": v2_inet("203.0.113.9", 4444, "127.0.0.1", 443, b"\x01\x00"),
    "v2 oversized": SIG + bytes([0x21, 0x11]) + struct.pack("!H", 60000),
    "v2 unknown family": v2(0x41, bytes(12)),
    "v2 datagram": v2(0x12, bytes(12)),
    "v2 version 3": v2(0x11, bytes(12), cmd=0x31),
    "v2 command 5": v2(0x11, bytes(12), cmd=0x25),
}


def test_hostile_headers_close_one_connection_each(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, tmp_path: Path
) -> None:
    conf = tunnels.conf(
        f"[lb]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
        "acceptProxy = yes\nTIMEOUTbusy = 5\n"
    )
    t, status = start_with_status(tunnels, conf)
    port = t.port("lb")
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    # a slow header (TIMEOUTbusy) first: the good connections below must not wait for it
    slow = client_socket(port)
    slow.sendall(b"PROXY TCP4 203.0.113.9 ")
    lying = client_socket(port)  # announces 200 bytes, sends 20
    lying.sendall(v2(0x11, bytes(200))[:36])
    for name, header in HOSTILE.items():
        with client_socket(port) as s:
            s.sendall(header)
            if name == "v1 truncated" or name == "v2 truncated":
                s.shutdown(socket.SHUT_WR)
            assert closed_by_peer(s, 10), name
    good = tls_after(client_socket(port), v2_inet("203.0.113.9", 4444, "127.0.0.1", 443), ctx, b"ok")
    assert good == b"ok"
    # the slow two are still waiting for TIMEOUTbusy: the others did not queue behind them
    assert not closed_by_peer(slow, 0.05) and not closed_by_peer(lying, 0.05), "held up by slow headers"
    assert closed_by_peer(slow, 20) and closed_by_peer(lying, 20)
    t.wait_for(
        r"PROXY header from 127\.0\.0\.2:\d+: (truncated|not complete).*\n(.*\n)*.*PROXY header from 127\.0\.0\.2:\d+: not complete within TIMEOUTbusy"
    )
    failures = re.findall(r"LOG3\[\d+\]: PROXY header from 127\.0\.0\.2:\d+: (.*)$", t.log, re.M)
    assert len(failures) == len(HOSTILE) + 2, failures  # one line each
    metrics = poll(
        "the proxy_header count",
        lambda: _metrics_with(status, 'reason="proxy_header",service="lb"'),
    )
    m = re.search(r'pytunnel_connections_total\{reason="proxy_header",service="lb"\} (\d+)', metrics)
    assert m is not None and int(m.group(1)) == len(HOSTILE) + 2
    assert "Traceback" not in t.log and "Internal error" not in t.log
    print(f"\nhostile PROXY headers: {len(HOSTILE) + 2} closed, one line each: {sorted(set(failures))}")


def _metrics_with(status: str, needle: str) -> str | None:
    import urllib.request

    with urllib.request.urlopen(f"http://{status}/metrics", timeout=10) as resp:  # noqa: S310
        text = resp.read().decode()
    count = re.search(rf"pytunnel_connections_total\{{{re.escape(needle)}\}} (\d+)", text)
    return text if count and int(float(count.group(1))) >= len(HOSTILE) + 2 else None


GOOD: dict[str, tuple[bytes, str]] = {
    "v1 TCP4": (b"PROXY TCP4 203.0.113.9 192.0.2.1 4444 443\r\n", "203.0.113.9:4444"),
    "v1 TCP6": (b"PROXY TCP6 2001:db8::9 2001:db8::1 4444 443\r\n", "2001:db8::9:4444"),
    "v1 UNKNOWN": (b"PROXY UNKNOWN ff ee\r\n", "127.0.0.2:"),
    "v2 TCP4 with TLVs": (
        v2_inet(
            "203.0.113.9",
            4444,
            "192.0.2.1",
            443,
            tlv(0x01, b"h2") + tlv(0x02, b"example.com") + tlv(0x05, os.urandom(32)) + tlv(0xE0, b""),
        ),
        "203.0.113.9:4444",
    ),  # fmt: skip
    "v2 TCP6": (
        v2(0x21, socket.inet_pton(socket.AF_INET6, "2001:db8::9") * 2 + struct.pack("!HH", 4444, 443)),
        "2001:db8::9:4444",
    ),
    "v2 LOCAL (health check)": (v2(0x11, bytes(12), cmd=0x20), "127.0.0.2:"),
    "v2 UNSPEC": (v2(0x00, b""), "127.0.0.2:"),
}


@pytest.mark.parametrize("name", list(GOOD))
@pytest.mark.parametrize("split", [False, True], ids=["one-write", "byte-by-byte"])
def test_good_headers_name_the_client(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, name: str, split: bool
) -> None:
    conf = tunnels.conf(
        f"[lb]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
        "acceptProxy = yes\n"
    )
    t = tunnels.start(conf)
    header, shown = GOOD[name]
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    data = os.urandom(20000)
    with client_socket(t.port("lb")) as s:
        assert tls_after(s, header, ctx, data, split=split) == data
    t.wait_for(rf"Service \[lb\] accepted connection from {re.escape(shown)}")


def test_client_mode_header_then_bytes_in_one_packet(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer
) -> None:
    """Client mode: the app's bytes right behind the header (same segment) are relayed intact."""
    srv = free_port()
    conf = tunnels.conf(
        f"[srv]\naccept = 127.0.0.1:{srv}\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
        f"[cli]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{srv}\nacceptProxy = yes\n"
    )
    t = tunnels.start(conf)
    data = os.urandom(100_000)
    got = b""
    with client_socket(t.port("cli")) as s:
        s.sendall(b"PROXY TCP4 198.51.100.7 192.0.2.1 5555 80\r\n" + data)
        s.shutdown(socket.SHUT_WR)
        while chunk := s.recv(65536):
            got += chunk
    assert got == data
    t.wait_for(r"Service \[cli\] accepted connection from 198\.51\.100\.7:5555")


def test_transparent_source_leaves_from_the_carried_address(tunnels: TunnelFactory, certs: Certs) -> None:
    """``transparent = source``: the upstream connection leaves from the address the header
    carried (a loopback alias: local, so no routing is needed; IP_TRANSPARENT needs root)."""
    need_root("IP_TRANSPARENT (CAP_NET_ADMIN)")
    backend = EchoServer()  # it keeps each connection's source address
    try:
        conf = tunnels.conf(
            f"[lb]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{backend.port}\ncert = {certs.server_pem}\n"
            "acceptProxy = yes\ntransparent = source\n"
        )
        t = tunnels.start(conf)
        ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
        # a port free on 127.0.0.5 (a fixed one may still be in TIME_WAIT from the last run: then
        # the tunnel, like stunnel's local_bind, leaves from an ephemeral port instead)
        carried = free_port("127.0.0.5")
        header = f"PROXY TCP4 127.0.0.5 127.0.0.1 {carried} 443\r\n".encode()
        with client_socket(t.port("lb")) as s:
            assert tls_after(s, header, ctx, b"hello") == b"hello"
        assert backend.peers == [("127.0.0.5", carried)], (backend.peers, t.log)
    finally:
        backend.close()
