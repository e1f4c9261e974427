"""--workers: several processes on the same ports, supervised; resumption across workers."""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import time
import urllib.request
from pathlib import Path

from conftest import Certs, EchoServer, Tunnel, TunnelFactory


def start(tunnels: TunnelFactory, certs: Certs, echo: EchoServer, **env: str) -> tuple[Tunnel, str]:
    conf = tunnels.conf(
        f"logId = process\n[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
    )
    t = tunnels.start(
        conf, mode="run", extra_env={"PYTUNNEL_WORKERS": "2", "PYTUNNEL_STATUS": "127.0.0.1:0", **env}
    )
    t.wait_for("All 2 workers accept connections")
    addr = t.wait_for(r"Status server listening on http://([\d.:]+) ").group(1)
    return t, addr


def worker_pids(t: Tunnel) -> set[int]:
    return {int(p) for p in re.findall(r"Worker \d started \(PID=(\d+)\)", t.log)}


def test_two_workers_share_the_port_and_resume_each_others_sessions(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer
) -> None:
    t, _ = start(tunnels, certs, echo)
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2  # a session id/ticket usable at once
    session = None
    reused = 0
    for i in range(40):
        with (
            socket.create_connection(("127.0.0.1", t.port("srv")), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost", session=session) as s,
        ):
            s.sendall(b"w%02d" % i)
            assert s.recv(3) == b"w%02d" % i
            reused += s.session_reused
            session = session or s.session
    pids = worker_pids(t)
    assert len(pids) == 2
    served = {int(p) for p in re.findall(r"LOG5\[(\d+)\]: Service \[srv\] accepted connection", t.log)}
    assert served == pids, "both workers took connections"
    # the ticket key was made before the fork: whichever worker serves, the session resumes
    assert reused == 39
    resumed_by = {int(p) for p in re.findall(r"LOG6\[(\d+)\]: TLS accepted: previous session reused", t.log)}
    assert resumed_by == pids
    assert t.stop() == 0


def test_metrics_and_readiness_cover_every_worker(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer
) -> None:
    t, addr = start(tunnels, certs, echo)
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    for i in range(12):
        with (
            socket.create_connection(("127.0.0.1", t.port("srv")), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            s.sendall(b"m%02d" % i)
            assert s.recv(3) == b"m%02d" % i
    deadline = time.monotonic() + 10
    text = ""
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        if 'pytunnel_connections_total{reason="closed",service="srv"} 12.0' in text:
            break
        time.sleep(0.1)
    assert 'pytunnel_connections_total{reason="closed",service="srv"} 12.0' in text, text
    assert 'pytunnel_bytes_total{direction="to_tls",service="srv"} 36.0' in text
    with urllib.request.urlopen(f"http://{addr}/readyz", timeout=10) as resp:
        body = resp.read().decode()
    assert '"ready": true' in body and '"workers": 2' in body
    assert t.stop() == 0


def test_a_dead_worker_is_restarted(tunnels: TunnelFactory, certs: Certs, echo: EchoServer) -> None:
    t, _ = start(tunnels, certs, echo)
    victim = sorted(worker_pids(t))[0]
    os.kill(victim, signal.SIGKILL)
    t.wait_for(rf"Worker \d \(PID={victim}\) exited with signal 9; restarting in 1 s")
    deadline = time.monotonic() + 15
    while len(worker_pids(t)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(worker_pids(t)) == 3
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    for i in range(10):  # connections that hashed to the dead worker's socket waited for the new one
        with (
            socket.create_connection(("127.0.0.1", t.port("srv")), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            s.sendall(b"r%02d" % i)
            assert s.recv(3) == b"r%02d" % i
    assert t.stop() == 0
    assert "Terminated" in t.log


def test_bad_worker_count_is_refused(tunnels: TunnelFactory, tmp_path: Path) -> None:
    conf = tunnels.conf("workers = lots\n[x]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\n")
    t = tunnels.start(conf, mode="run", wait=False)
    assert t.proc.wait(20) == 1
    assert "workers = 'lots': expected a number of processes or auto" in t.log
