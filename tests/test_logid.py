"""logId: the connection id in log lines, under both implementations with the same config."""

from __future__ import annotations

import re
import socket
import ssl
from pathlib import Path

import pytest
from conftest import Certs, EchoServer, Tunnel, TunnelFactory

ACCEPTED = re.compile(r"LOG5\[([^\]]+)\]: Service \[srv\] accepted connection from")


def serve_two(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, mode: str
) -> tuple[Tunnel, list[str]]:
    t = tunnels.start(
        tunnels.conf(
            f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
            f"logId = {mode}\n"
        ),
        impl=impl,
    )
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    for n in range(2):
        with (
            socket.create_connection(("127.0.0.1", t.port("srv")), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            s.sendall(b"ping %d" % n)
            assert s.recv(100) == b"ping %d" % n
    t.wait_for(r"(?s)accepted connection.*accepted connection")
    return t, ACCEPTED.findall(t.log)


def test_sequential(tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str) -> None:
    _t, ids = serve_two(tunnels, certs, echo, impl, "sequential")
    assert ids == ["0", "1"]


def test_unique(tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str) -> None:
    """22 random base62 characters, as stunnel 5.68 prints them; never repeated."""
    _t, ids = serve_two(tunnels, certs, echo, impl, "unique")
    assert len(ids) == 2 and ids[0] != ids[1]
    assert all(re.fullmatch(r"[A-Za-z0-9]{22}", i) for i in ids), ids


def test_process(tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str) -> None:
    t, ids = serve_two(tunnels, certs, echo, impl, "process")
    assert ids == [str(t.proc.pid)] * 2


def test_thread(tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str) -> None:
    """The kernel id of the thread that served the connection: stunnel runs a thread per
    connection (gone when it ends); pytunnel serves every connection on its event-loop thread."""
    t, ids = serve_two(tunnels, certs, echo, impl, "thread")
    assert all(i.isdigit() for i in ids), ids
    if impl == "pytunnel":
        assert ids[0] == ids[1]
        assert Path(f"/proc/{t.proc.pid}/task/{ids[0]}").exists()
    else:
        assert ids[0] != ids[1]
        assert ids[0] != str(t.proc.pid)


@pytest.mark.parametrize("mode", ["sequential", "unique", "thread", "process"])
def test_each_mode_is_checked(tunnels: TunnelFactory, mode: str) -> None:
    """`pytunnel check` accepts the four values and nothing else (file:line on a typo)."""
    import subprocess
    import sys

    conf = tunnels.conf(f"[srv]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\nlogId = {mode}\n")
    ok = subprocess.run([sys.executable, "-m", "tunnel", "check", str(conf)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    bad = tunnels.conf(f"[srv]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\nlogId = {mode}s\n")
    out = subprocess.run([sys.executable, "-m", "tunnel", "check", str(bad)], capture_output=True, text=True)
    assert out.returncode == 1
    assert f"{bad}:9" in out.stderr and "logId" in out.stderr
