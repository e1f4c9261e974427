"""``maxConnections = N`` (a pytunnel extension): at N live connections a service stops
accepting; new clients wait in the kernel's backlog and are served as slots free.

Real processes: ``pytunnel run`` in server mode with a status server, a threaded echo backend
that counts its live connections (the cap is checked from there), real TLS clients.
stunnel 5.68 has no such option (it is on its to-do list), so there is no stunnel4 control.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from conftest import Certs, TunnelFactory, pytunnel_cmd
from loopback_support import Listener
from monitoring_support import poll, start_with_status

CAP = 4
FLOOD = 10 * CAP
CHUNK = 16384


class CountingEcho(Listener):
    """An echo backend that counts live connections: +1 at accept, -1 at the client's EOF
    (the tunnel sends its FIN before its own connection ends, so this count never exceeds the
    tunnel's).  ``peak`` is the most it ever saw at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.live = 0
        self.peak = 0
        super().__init__(backlog=512)

    def on_accept(self, conn: socket.socket) -> None:
        with self.lock:
            self.live += 1
            self.peak = max(self.peak, self.live)

    def handle(self, s: Any) -> None:
        counted = True
        try:
            while data := s.recv(65536):
                s.sendall(data)
            with self.lock:
                self.live -= 1
            counted = False
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        finally:
            if counted:
                with self.lock:
                    self.live -= 1


def _tls(port: int, ctx: ssl.SSLContext, timeout: float) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def _read_exactly(s: ssl.SSLSocket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


class Stream(threading.Thread):
    """One long TLS stream: 16 KiB out, the same 16 KiB back, until stopped; ``bad`` counts
    rounds whose echo differed."""

    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        super().__init__(daemon=True)
        self.port, self.ctx = port, ctx
        self.rounds = 0
        self.bad = 0
        self.error: str | None = None
        self.up = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        try:
            with _tls(self.port, self.ctx, 60) as s:
                self.up.set()
                while not self.stop.is_set():
                    data = os.urandom(CHUNK)
                    s.sendall(data)
                    if _read_exactly(s, CHUNK) != data:
                        self.bad += 1
                    self.rounds += 1
        except OSError as exc:
            self.error = repr(exc)


class FloodClient(threading.Thread):
    """Connects (the kernel completes TCP while the service is at its cap), then waits for its
    TLS handshake, sends one line and reads its echo."""

    def __init__(self, port: int, ctx: ssl.SSLContext, n: int) -> None:
        super().__init__(daemon=True)
        self.port, self.ctx, self.n = port, ctx, n
        self.connected = threading.Event()
        self.reply = b""
        self.error: str | None = None
        self.done_at = 0.0

    def run(self) -> None:
        payload = f"flood client {self.n}\n".encode()
        try:
            raw = socket.create_connection(("127.0.0.1", self.port), timeout=120)
            self.connected.set()
            with self.ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(payload)
                self.reply = _read_exactly(s, len(payload))
        except (OSError, ValueError) as exc:
            self.error = repr(exc)
        self.done_at = time.monotonic()


def _get(address: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as resp:  # noqa: S310
            return int(resp.status), resp.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


def _metric(text: str, name: str, service: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(f'{name}{{service="{service}"}}'):
            return float(line.split()[-1])
    return None


def test_flood_of_ten_times_the_cap(tunnels: TunnelFactory, certs: Certs) -> None:
    backend = CountingEcho()
    try:
        t, status = start_with_status(
            tunnels,
            f"[capped]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{backend.port}\n"
            f"cert = {certs.server_pem}\nmaxConnections = {CAP}\n",
        )
        port = t.port("capped")
        ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
        streams = [Stream(port, ctx) for _ in range(CAP)]
        for s in streams:
            s.start()
        poll("the streams to be up", lambda: all(s.up.is_set() for s in streams) and backend.live == CAP)

        flood = [FloodClient(port, ctx, n) for n in range(FLOOD)]
        for f in flood:
            f.start()
        poll("the flood's TCP connections", lambda: all(f.connected.is_set() for f in flood))
        t.wait_for(r"maxConnections = 4 reached; new clients wait in the backlog")
        # the streams go on while the flood waits: each makes 20 more round trips
        marks = [s.rounds for s in streams]
        poll(
            "20 more rounds on every stream",
            lambda: all(s.rounds >= m + 20 for s, m in zip(streams, marks, strict=True)),
        )
        served_early = sum(1 for f in flood if f.done_at)
        ready, _ = _get(status, "/readyz")
        metrics_mid = _get(status, "/metrics")[1]

        for s in streams:
            s.stop.set()
        for s in streams:
            s.join(30)
        poll("every flood client served", lambda: all(f.done_at for f in flood), timeout=120)
        metrics_end = _get(status, "/metrics")[1]

        figures = {
            "cap": CAP,
            "flood": FLOOD,
            "stream_rounds": [s.rounds for s in streams],
            "stream_bad_rounds": sum(s.bad for s in streams),
            "flood_served_while_streams_ran": served_early,
            "flood_ok": sum(1 for f in flood if f.reply == f"flood client {f.n}\n".encode()),
            "backend_peak": backend.peak,
            "backend_accepted": backend.connections,
            "limited_total": _metric(metrics_end, "pytunnel_connections_limited_total", "capped"),
        }
        print("\nmaxConnections flood:", json.dumps(figures))
        assert [s.error for s in streams] == [None] * CAP
        assert figures["stream_bad_rounds"] == 0
        assert served_early == 0, "a flood client was served while CAP streams held every slot"
        assert ready == 200, "/readyz must stay ready at the cap"
        assert [f.error for f in flood if f.error] == []
        assert figures["flood_ok"] == FLOOD
        assert backend.peak == CAP, f"the backend saw {backend.peak} at once (cap {CAP})"
        assert backend.connections == CAP + FLOOD
        assert _metric(metrics_mid, "pytunnel_connections_max", "capped") == CAP
        assert figures["limited_total"] == FLOOD
        assert t.proc.poll() is None
    finally:
        backend.close()


def test_cap_beyond_the_descriptor_budget_is_refused_at_check(tunnels: TunnelFactory, certs: Certs) -> None:
    import subprocess

    conf = tunnels.conf(
        f"[big]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\ncert = {certs.server_pem}\n"
        "maxConnections = 500\n"
    )
    cmd = ["bash", "-c", 'ulimit -n 256 && exec "$@"', "sh", *pytunnel_cmd("check", str(conf))]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert f"{conf}:" in out and "maxConnections = 500 is beyond the descriptor budget" in out, out
    assert "RLIMIT_NOFILE 256 carries 116 connections" in out, out
    ok = tunnels.conf(
        f"[small]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\ncert = {certs.server_pem}\n"
        "maxConnections = 100\n"
    )
    cmd[-1] = str(ok)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stdout + done.stderr


BIG_CAP = 150  # far from it (C_ROOM = 128 free) uvloop's accept loop serves; near it, ours


def _listener_fds(pid: int, port: int) -> int:
    """How many of ``pid``'s descriptors are the listening socket on ``port``: 2 while uvloop's
    accept loop serves a duplicate of it (tunnel/listener.py), 1 while ours accepts."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":
            inodes.add(fields[9])
    links = []
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            links.append(os.readlink(fd))
        except OSError:
            continue
    return sum(1 for link in links if link in {f"socket:[{i}]" for i in inodes})


def test_uvloop_accept_hands_over_near_the_cap(tunnels: TunnelFactory, certs: Certs) -> None:
    """Far from the cap uvloop's accept loop serves; near it ours takes over and stops at the
    cap exactly (the excess waits in the backlog); once the connections end, uvloop's again."""
    backend = CountingEcho()
    held: list[ssl.SSLSocket] = []
    try:
        t, _status = start_with_status(
            tunnels,
            f"[capped]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{backend.port}\n"
            f"cert = {certs.server_pem}\nmaxConnections = {BIG_CAP}\n",
        )
        port, pid = t.port("capped"), t.proc.pid
        ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
        poll("uvloop's accept loop on a duplicate", lambda: _listener_fds(pid, port) == 2)
        for n in range(BIG_CAP):
            s = _tls(port, ctx, 60)
            held.append(s)
            s.sendall(b"held %d\n" % n)
            assert _read_exactly(s, len(b"held %d\n" % n)) == b"held %d\n" % n
        poll("our accept loop near the cap", lambda: _listener_fds(pid, port) == 1)
        flood = [FloodClient(port, ctx, n) for n in range(20)]
        for f in flood:
            f.start()
        poll("the flood's TCP connections", lambda: all(f.connected.is_set() for f in flood))
        t.wait_for(rf"maxConnections = {BIG_CAP} reached; new clients wait in the backlog")
        for s in held[:10]:  # the tunnel goes on serving the held ones meanwhile
            s.sendall(b"again\n")
            assert _read_exactly(s, 6) == b"again\n"
        assert not any(f.done_at for f in flood), "a client was served beyond the cap"
        for s in held:
            s.close()
        poll("every waiting client served", lambda: all(f.done_at for f in flood), timeout=120)
        assert [f.error for f in flood if f.error] == []
        assert all(f.reply == f"flood client {f.n}\n".encode() for f in flood)
        assert backend.peak == BIG_CAP, f"the backend saw {backend.peak} at once (cap {BIG_CAP})"
        poll("the connections to end", lambda: backend.live == 0)
        with _tls(port, ctx, 60) as s:  # our loop accepts it, and hands back to uvloop's
            s.sendall(b"last\n")
            assert _read_exactly(s, 5) == b"last\n"
        poll("uvloop's accept loop again", lambda: _listener_fds(pid, port) == 2)
        assert "Traceback" not in t.log and "Internal error" not in t.log
        assert t.proc.poll() is None
    finally:
        for s in held:
            s.close()
        backend.close()
