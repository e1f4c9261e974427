"""Operating a running tunnel: status server, metrics, drain, certificate hot reload, JSON logs.

Real processes, real sockets, real TLS; /metrics is parsed with prometheus_client's own
parser and the values are compared with the traffic the test itself sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import trustme
from conftest import ROOT, Certs, EchoServer, Tunnel, TunnelFactory, pytunnel_cmd
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

STATUS_LINE = r"Status server listening on http://([\d.]+):(\d+)"


# ------------------------------------------------------------------ helpers


def status_of(t: Tunnel) -> str:
    m = t.wait_for(STATUS_LINE)
    return f"{m.group(1)}:{m.group(2)}"


def get(addr: str, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{addr}{path}", timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def scrape(addr: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (sample name, sorted labels)."""
    code, body = get(addr, "/metrics")
    assert code == 200
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metric(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def server_conf(tunnels: TunnelFactory, echo: EchoServer, cert: Path | str) -> Path:
    return tunnels.conf(f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {cert}\n")


def start_ops(tunnels: TunnelFactory, conf: Path, **env: str) -> Tunnel:
    base = {"PYTUNNEL_STATUS": "127.0.0.1:0"}
    base.update(env)
    t = tunnels.start(conf, mode="run", extra_env=base)
    t.wait_for("Accepting new connections")
    return t


def tls_client(port: int, ca: Path) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(ca))
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def tls_roundtrip(port: int, ca: Path, data: bytes) -> bytes:
    with tls_client(port, ca) as s:
        s.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        return got


def served_serial(port: int, ca: Path) -> int:
    with tls_client(port, ca) as s:
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


# ------------------------------------------------------------------ status server


def test_livez_readyz_and_unknown_paths(tunnels: TunnelFactory, certs: Certs, echo: EchoServer) -> None:
    t = start_ops(tunnels, server_conf(tunnels, echo, certs.server_pem))
    addr = status_of(t)
    assert get(addr, "/livez") == (200, b"ok\n")
    code, body = get(addr, "/readyz")
    doc = json.loads(body)
    assert code == 200
    assert doc["ready"] is True and doc["draining"] is False and doc["listening"] is True
    assert doc["services"] == [{"name": "srv", "listening": [f"127.0.0.1:{t.port('srv')}"], "active": 0}]
    assert get(addr, "/nope")[0] == 404
    # a garbage request gets a 400 and the server goes on
    with socket.create_connection(("127.0.0.1", int(addr.rsplit(":", 1)[1])), timeout=5) as s:
        s.sendall(b"\x16\x03\x01 garbage\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 400")
    assert get(addr, "/livez")[0] == 200
    assert t.stop() == 0


def test_metrics_move_by_the_traffic_sent(tunnels: TunnelFactory, certs: Certs, echo: EchoServer) -> None:
    t = start_ops(tunnels, server_conf(tunnels, echo, certs.server_pem))
    addr = status_of(t)
    before = scrape(addr)
    assert metric(before, "pytunnel_info", version=metric_version(before)) == 1
    payloads = [os.urandom(n) for n in (1, 1000, 300_000)]
    for data in payloads:
        assert tls_roundtrip(t.port("srv"), certs.ca_pem, data) == data
    # one connection held open: counted as active, its bytes already visible
    held = tls_client(t.port("srv"), certs.ca_pem)
    held.sendall(b"x" * 777)
    echoed = b""
    while len(echoed) < 777:
        echoed += held.recv(777)
    # one client that speaks plain text to the TLS port: a handshake failure
    with socket.create_connection(("127.0.0.1", t.port("srv")), timeout=5) as s:
        s.sendall(b"EHLO plain\r\n" * 20)
        with contextlib.suppress(OSError):
            s.recv(100)
    deadline = time.monotonic() + 10
    while True:
        after = scrape(addr)
        if metric(after, "pytunnel_connections_total", service="srv", reason="closed") >= 3 or (
            time.monotonic() > deadline
        ):
            break
        time.sleep(0.05)
    sent = sum(len(p) for p in payloads)
    assert metric(after, "pytunnel_connections_total", service="srv", reason="closed") == 3
    assert metric(after, "pytunnel_connections_active", service="srv") == 1
    for direction in ("to_tls", "to_plain"):
        moved = metric(after, "pytunnel_bytes_total", service="srv", direction=direction) - metric(
            before, "pytunnel_bytes_total", service="srv", direction=direction
        )
        assert moved == sent + 777, direction  # exact, the held connection included
    assert metric(after, "pytunnel_handshake_failures_total", service="srv", reason="protocol_error") == 1
    assert metric(after, "pytunnel_handshake_seconds_count") == 4
    assert metric(after, "pytunnel_handshake_seconds_bucket", le="+Inf") == 4
    assert metric(after, "pytunnel_handshake_seconds_sum") > 0
    leaf = x509.load_pem_x509_certificates(certs.server_pem.read_bytes())[0]
    not_after = metric(after, "pytunnel_cert_not_after_seconds", service="srv", cert=str(certs.server_pem))
    assert not_after == pytest.approx(leaf.not_valid_after_utc.timestamp())
    assert metric(after, "pytunnel_ready") == 1
    assert metric(after, "process_resident_memory_bytes") > 0
    held.close()
    assert t.stop() == 0


def metric_version(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> str:
    for name, labels in samples:
        if name == "pytunnel_info":
            return dict(labels)["version"]
    raise AssertionError("no pytunnel_info")


def test_healthcheck_command(tunnels: TunnelFactory, certs: Certs, echo: EchoServer) -> None:
    t = start_ops(tunnels, server_conf(tunnels, echo, certs.server_pem))
    addr = status_of(t)
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    def check(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            pytunnel_cmd("healthcheck", *args),
            env=dict(env, **extra),
            capture_output=True,
            text=True,
            timeout=30,
        )

    ok = check("--status", addr)
    assert ok.returncode == 0, ok.stderr
    assert "healthy" in ok.stdout
    assert check(PYTUNNEL_STATUS=addr).returncode == 0
    assert check("--ready", PYTUNNEL_STATUS=addr).returncode == 0
    assert t.stop() == 0
    down = check("--status", addr)
    assert down.returncode == 1 and "unhealthy" in down.stderr
    env.pop("PYTUNNEL_STATUS", None)
    none = check()
    assert none.returncode == 1 and "PYTUNNEL_STATUS" in none.stderr


def test_bad_status_address_and_busy_port(tunnels: TunnelFactory, certs: Certs, echo: EchoServer) -> None:
    conf = server_conf(tunnels, echo, certs.server_pem)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        pytunnel_cmd("run", "--status", "/tmp/x.sock", str(conf)), env=env, capture_output=True, text=True
    )
    assert out.returncode == 2 and "--status" in out.stderr and "HOST:PORT" in out.stderr
    # stunnel's command line takes the same setting from the environment, checked as strictly
    out = subprocess.run(
        pytunnel_cmd(str(conf)), env=dict(env, PYTUNNEL_DRAIN_TIMEOUT="soon"), capture_output=True, text=True
    )
    assert out.returncode == 1 and "PYTUNNEL_DRAIN_TIMEOUT='soon'" in out.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        t = tunnels.start(conf, mode="run", extra_env={"PYTUNNEL_STATUS": f"127.0.0.1:{port}"}, wait=False)
        assert t.proc.wait(20) == 3
    assert f"Binding the status server to 127.0.0.1:{port}: Address already in use (98)" in t.log


# ------------------------------------------------------------------ drain


class Stream(threading.Thread):
    """Sends ``size`` random bytes slowly through the tunnel and hashes what comes back."""

    def __init__(self, port: int, size: int, seconds: float) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.data = os.urandom(size)
        self.seconds = seconds
        self.back = hashlib.sha256()
        self.got = 0
        self.error: BaseException | None = None
        self.started_sending = threading.Event()

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
                reader = threading.Thread(target=self._read, args=(s,), daemon=True)
                reader.start()
                chunk = 16384
                pause = self.seconds / (len(self.data) / chunk)
                for i in range(0, len(self.data), chunk):
                    s.sendall(self.data[i : i + chunk])
                    self.started_sending.set()
                    time.sleep(pause)
                s.shutdown(socket.SHUT_WR)
                reader.join(30)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def _read(self, s: socket.socket) -> None:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return
            self.got += len(chunk)
            self.back.update(chunk)

    def intact(self) -> bool:
        return self.got == len(self.data) and self.back.digest() == hashlib.sha256(self.data).digest()


def client_server_pair(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, **env: str
) -> tuple[Tunnel, Tunnel]:
    server = tunnels.start(server_conf(tunnels, echo, certs.server_pem), mode="run")
    client_conf = tunnels.conf(
        f"[cli]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{server.port('srv')}\n"
        f"CAfile = {certs.ca_pem}\ncheckHost = localhost\n"
    )
    client = start_ops(tunnels, client_conf, **env)
    return client, server


def test_drain_lets_streams_in_flight_finish(tunnels: TunnelFactory, certs: Certs, echo: EchoServer) -> None:
    client, server = client_server_pair(tunnels, certs, echo, PYTUNNEL_DRAIN_TIMEOUT="20")
    addr = status_of(client)
    streams = [Stream(client.port("cli"), 2_000_000, 2.0) for _ in range(4)]
    for s in streams:
        s.start()
    for s in streams:
        assert s.started_sending.wait(10)
    t0 = time.monotonic()
    client.signal(signal.SIGTERM)
    client.wait_for(r"Draining 4 connection\(s\) for up to 20 seconds")
    # not ready while draining, and no new connection is accepted
    code, body = get(addr, "/readyz")
    assert code == 503 and json.loads(body)["draining"] is True
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", client.port("cli")), timeout=2).close()
    assert client.proc.wait(30) == 0
    elapsed = time.monotonic() - t0
    for s in streams:
        s.join(30)
        assert s.error is None
        assert s.intact()
    assert elapsed < 15
    log = client.log
    for line in ("Stopped accepting new connections", "All connections finished", "Terminated"):
        assert line in log
    assert server.stop() == 0


def test_connections_queued_at_sigterm_are_served_not_reset(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer
) -> None:
    client, server = client_server_pair(tunnels, certs, echo)
    client.signal(signal.SIGSTOP)  # clients queue up in the kernel's accept backlog meanwhile
    try:
        socks = [socket.create_connection(("127.0.0.1", client.port("cli")), timeout=20) for _ in range(20)]
        for i, s in enumerate(socks):
            s.sendall(b"queued %02d" % i)
            s.shutdown(socket.SHUT_WR)
        client.signal(signal.SIGTERM)
    finally:
        client.signal(signal.SIGCONT)
    for i, s in enumerate(socks):
        got = b""
        while chunk := s.recv(100):
            got += chunk
        s.close()
        assert got == b"queued %02d" % i
    assert client.proc.wait(20) == 0
    assert "Stopped accepting new connections" in client.log
    assert server.stop() == 0


def test_pre_drain_delay_keeps_accepting_while_not_ready(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer
) -> None:
    t = start_ops(tunnels, server_conf(tunnels, echo, certs.server_pem), PYTUNNEL_PRE_DRAIN_DELAY="2")
    addr = status_of(t)
    t.signal(signal.SIGTERM)
    t.wait_for(r"still accepting for 2 seconds \(pre-drain delay\)")
    assert get(addr, "/readyz")[0] == 503
    assert get(addr, "/livez")[0] == 200
    assert tls_roundtrip(t.port("srv"), certs.ca_pem, b"still here") == b"still here"
    assert t.proc.wait(15) == 0
    assert t.log.index("pre-drain delay") < t.log.index("Stopped accepting new connections")


def test_second_signal_stops_at_once(tunnels: TunnelFactory, certs: Certs, echo: EchoServer) -> None:
    t = start_ops(tunnels, server_conf(tunnels, echo, certs.server_pem), PYTUNNEL_DRAIN_TIMEOUT="60")
    with tls_client(t.port("srv"), certs.ca_pem) as held:
        held.sendall(b"hi")
        assert held.recv(2) == b"hi"
        t.signal(signal.SIGTERM)
        t.wait_for(r"Draining 1 connection\(s\) for up to 60 seconds")
        t0 = time.monotonic()
        t.signal(signal.SIGINT)
        assert t.proc.wait(10) == 0
        assert time.monotonic() - t0 < 5
    assert "Second termination signal: closing every connection now" in t.log


# ------------------------------------------------------------------ certificate hot reload


def k8s_secret_dir(root: Path, ca: trustme.CA, version: int) -> Path:
    """A Kubernetes Secret volume: files are links into ..data, itself a link to a dated dir."""
    real = root / f"..2026_11_25_{version:02d}"
    real.mkdir()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(real / "tls.crt"))
    leaf.private_key_pem.write_to_path(str(real / "tls.key"))
    tmp = root / "..data_tmp"
    tmp.symlink_to(real.name)
    os.replace(tmp, root / "..data")  # atomic swap, as the kubelet does
    for name in ("tls.crt", "tls.key"):
        if not (root / name).is_symlink():
            (root / name).symlink_to(f"..data/{name}")
    return real


def serial_of(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def test_certificate_rotation_on_a_symlinked_secret(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    k8s_secret_dir(secret, certs.ca, 1)
    first = serial_of(secret / "tls.crt")
    conf = tunnels.conf(
        f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\n"
        f"cert = {secret / 'tls.crt'}\nkey = {secret / 'tls.key'}\n"
    )
    t = start_ops(tunnels, conf, PYTUNNEL_CERT_RELOAD_INTERVAL="0.2")
    addr = status_of(t)
    port = t.port("srv")
    assert served_serial(port, certs.ca_pem) == first
    old = tls_client(port, certs.ca_pem)
    old.sendall(b"before")
    assert old.recv(6) == b"before"

    k8s_secret_dir(secret, certs.ca, 2)
    second = serial_of(secret / "tls.crt")
    assert second != first
    t.wait_for(r"Service \[srv\]: certificates reloaded")
    assert served_serial(port, certs.ca_pem) == second
    # the connection made before the swap lives on with its session
    old.sendall(b"after")
    assert old.recv(5) == b"after"
    old.close()
    samples = scrape(addr)
    assert metric(samples, "pytunnel_reloads_total", result="success") == 1

    # a broken pair (certificate from one issue, key from another): logged, old one kept
    real = k8s_secret_dir(secret, certs.ca, 3)
    other = certs.ca.issue_cert("localhost")
    other.private_key_pem.write_to_path(str(real / "tls.key"))
    t.wait_for(r"Service \[srv\]: certificate reload failed: .*tls\.key.*; keeping the certificates in use")
    assert served_serial(port, certs.ca_pem) == second
    samples = scrape(addr)
    assert metric(samples, "pytunnel_reloads_total", result="failure") == 1
    assert metric(samples, "pytunnel_reloads_total", result="success") == 1
    assert "PRIVATE KEY" not in t.log
    assert t.stop() == 0


def test_reload_off_when_interval_is_zero(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, tmp_path: Path
) -> None:
    cert = tmp_path / "server.pem"
    cert.write_bytes(certs.server_pem.read_bytes())
    t = start_ops(tunnels, server_conf(tunnels, echo, cert), PYTUNNEL_CERT_RELOAD_INTERVAL="0")
    # the control: the same file, watched every 0.1 s; once it has picked up two changes, each
    # change was there to see for several of its intervals
    control = start_ops(tunnels, server_conf(tunnels, echo, cert), PYTUNNEL_CERT_RELOAD_INTERVAL="0.1")
    first = served_serial(t.port("srv"), certs.ca_pem)
    for n in (1, 2):
        certs.ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(cert))
        control.wait_for(rf"(?s)(certificates reloaded.*){{{n}}}")
    assert served_serial(t.port("srv"), certs.ca_pem) == first
    assert "certificates reloaded" not in t.log
    assert "Certificate files not watched (PYTUNNEL_CERT_RELOAD_INTERVAL = 0)" in t.log
    assert "Certificate files checked for changes every 0.1 s" in control.log
    assert control.stop() == 0
    assert t.stop() == 0


# ------------------------------------------------------------------ JSON logs


def test_json_logs_parse_and_carry_the_connection_fields(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer
) -> None:
    conf = server_conf(tunnels, echo, certs.server_pem)
    t = tunnels.start(conf, mode="run", extra_env={"PYTUNNEL_LOG_FORMAT": "json"}, wait=False)
    m = t.wait_for(r'"message":"Service \[srv\] \(FD=\d+\) bound to 127\.0\.0\.1:(\d+)"')
    port = int(m.group(1))
    t.wait_for("Accepting new connections")
    assert tls_roundtrip(port, certs.ca_pem, b"json please") == b"json please"
    t.wait_for(r'"event":"closed"')
    assert t.stop() == 0
    docs = [json.loads(line) for line in t.log.splitlines() if line.strip()]
    assert all({"time", "level", "id", "event", "message"} <= d.keys() for d in docs)
    closed = [d for d in docs if d["event"] == "closed"]
    assert len(closed) == 1
    c = closed[0]
    assert c["service"] == "srv" and c["reason"] == "closed"
    assert c["bytes"] == {"to_tls": 11, "to_plain": 11}
    assert re.fullmatch(r"127\.0\.0\.1:\d+", c["peer"])
    assert isinstance(c["duration"], float | int) and c["duration"] >= 0
    assert any(d["event"] == "accepted" and d["peer"] == c["peer"] for d in docs)
    assert docs[-1]["message"] == "Terminated"


def test_json_config_errors_are_json_too(tmp_path: Path) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text("[x]\nclient = maybe\n")
    out = subprocess.run(
        pytunnel_cmd("run", "--log-format", "json", str(bad)),
        env=dict(os.environ, PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    docs = [json.loads(line) for line in out.stderr.splitlines()]
    assert docs[-1]["message"] == "Configuration failed"
    assert any('"client = maybe"' in d["message"] and d["level"] == "err" for d in docs)
