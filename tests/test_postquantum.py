"""Post-quantum key exchange by default under ``pytunnel run`` (OpenSSL >= 3.5), stunnel's
groups under ``pytunnel CONFIG``, and the negotiated group in the log and /metrics.

OpenSSL 3.5 is not this machine's: the scenarios run in a Debian 13 ("trixie") root made
with ``mmdebstrap`` (Python 3.13 linked to OpenSSL 3.5, pytunnel's dependencies from
Debian's own packages; about 40 s, once per session), pytunnel started in it with
``chroot`` (loopback is shared), and OpenSSL 3.5's ``s_client``/``s_server`` from that root
as the peers.  Where the root cannot be built the tests fail saying why (CI's .ci/run installs
mmdebstrap); outside CI a missing mmdebstrap or a non-root user skips.  Knobs:
PYTUNNEL_TRIXIE_TAR (keep the root's tarball there and reuse it), DEBIAN_MIRROR.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import BOUND, ROOT, Certs, EchoServer, TunnelFactory, cannot_run_here
from identity_support import scrape
from loopback_support import free_port, wait_port

PACKAGES = "python3,python3-cryptography,python3-pydantic,python3-click,python3-uvloop,python3-prometheus-client,openssl"
MLKEM = "X25519MLKEM768"


@pytest.fixture(scope="session")
def trixie(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Debian 13 root with Python 3.13, OpenSSL 3.5 and pytunnel's dependencies."""
    if os.geteuid() != 0:
        cannot_run_here("building and entering a Debian 13 root needs root (mmdebstrap, chroot)")
    mmdebstrap = shutil.which("mmdebstrap")
    if mmdebstrap is None:
        cannot_run_here("mmdebstrap is not installed (apt-get install mmdebstrap)")
    assert mmdebstrap is not None
    base = tmp_path_factory.mktemp("trixie")
    tar = Path(os.environ.get("PYTUNNEL_TRIXIE_TAR") or base / "trixie.tar")
    if not tar.is_file():
        cmd = [mmdebstrap, "--variant=apt", f"--include={PACKAGES}", "trixie", str(tar)]
        if os.environ.get("DEBIAN_MIRROR"):
            cmd.append(os.environ["DEBIAN_MIRROR"])
        r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"mmdebstrap could not build the Debian 13 root:\n{r.stderr[-3000:]}"
    root = base / "root"
    root.mkdir()
    with tarfile.open(tar) as tf:
        tf.extractall(root, filter="fully_trusted" if sys.version_info >= (3, 12) else None)  # noqa: S202
    shutil.copytree(ROOT / "tunnel", root / "opt" / "pytunnel" / "tunnel")
    (root / "work").mkdir()
    r = subprocess.run(
        ["chroot", str(root), "python3", "-c", "import ssl; print(ssl.OPENSSL_VERSION_INFO[:2])"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() >= "(3, 5)", f"the root's OpenSSL: {r.stdout}{r.stderr}"
    return root


@dataclass
class Inside:
    """pytunnel running inside the root."""

    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.log, re.M)
            if m:
                return m
            assert self.proc.poll() is None, f"pytunnel exited {self.proc.returncode}:\n{self.log}"
            time.sleep(0.05)
        raise AssertionError(f"/{pattern}/ not seen:\n{self.log}")

    def port(self) -> int:
        return int(BOUND.findall(self.wait_for(BOUND.pattern).string)[0][2])


@pytest.fixture
def inside(trixie: Path, certs: Certs) -> Iterator[Callable[..., Inside]]:
    started: list[Inside] = []
    shutil.copy(certs.server_pem, trixie / "work" / "server.pem")
    shutil.copy(certs.ca_pem, trixie / "work" / "ca.pem")

    def start(body: str, mode: str, status: bool = False) -> Inside:
        n = len(started)
        (trixie / "work" / f"t{n}.conf").write_text(
            "foreground = yes\nsyslog = no\npid =\ndebug = 6\n" + body
        )
        log_path = trixie / "work" / f"t{n}.log"
        env = ["PYTHONPATH=/opt/pytunnel"] + (["PYTUNNEL_STATUS=127.0.0.1:0"] if status else [])
        argv = ["run", f"/work/t{n}.conf"] if mode == "run" else [f"/work/t{n}.conf"]
        with open(log_path, "wb") as fh:
            proc = subprocess.Popen(
                ["chroot", str(trixie), "env", *env, "python3", "-m", "tunnel", *argv],
                stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT,
            )  # fmt: skip
        t = Inside(proc, log_path)
        started.append(t)
        t.wait_for("Accepting new connections")
        return t

    yield start
    for t in started:
        t.proc.kill()
        t.proc.wait()


def s_client(root: Path, port: int, groups: str) -> str:
    r = subprocess.run(
        ["chroot", str(root), "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-groups", groups,
         "-CAfile", "/work/ca.pem", "-servername", "localhost"],
        input=b"", capture_output=True, timeout=30,
    )  # fmt: skip
    return (r.stdout + r.stderr).decode(errors="replace")


def server_conf(echo: EchoServer, extra: str = "") -> str:
    return f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = /work/server.pem\n{extra}"


def test_server_prefers_mlkem_under_run(
    trixie: Path, inside: Callable[..., Inside], echo: EchoServer
) -> None:
    t = inside(server_conf(echo), "run", status=True)
    out = s_client(trixie, t.port(), MLKEM)
    assert f"Negotiated TLS1.3 group: {MLKEM}" in out, out
    t.wait_for(rf"LOG6\[\d+\]: TLS group: {MLKEM}$")
    # a client offering the hybrid and the classic group gets the hybrid (OpenSSL's default order)
    assert f"Negotiated TLS1.3 group: {MLKEM}" in s_client(trixie, t.port(), f"x25519:{MLKEM}")
    samples = scrape(t)
    assert samples[("pytunnel_tls_handshakes_total", (("group", MLKEM), ("service", "srv")))] == 2


def test_compat_keeps_stunnels_groups_and_curves_turns_it_off(
    trixie: Path, inside: Callable[..., Inside], echo: EchoServer
) -> None:
    """``pytunnel CONFIG``: stunnel's list (no hybrid), as stunnel 5.68 on the same OpenSSL
    would; ``curves = X25519`` under ``run`` turns the hybrid off; a hybrid name in curves
    turns it on under either command line."""
    compat = inside(server_conf(echo), "compat")
    assert "Cipher is (NONE)" in s_client(trixie, compat.port(), MLKEM)
    out = s_client(trixie, compat.port(), f"{MLKEM}:X25519")
    assert "Peer Temp Key: X25519" in out, out  # OpenSSL 3.5 names a classic group this way
    off = inside(server_conf(echo, "curves = X25519\n"), "run")
    assert "Cipher is (NONE)" in s_client(trixie, off.port(), MLKEM)
    on = inside(server_conf(echo, f"curves = {MLKEM}:X25519\n"), "compat")
    assert f"Negotiated TLS1.3 group: {MLKEM}" in s_client(trixie, on.port(), MLKEM)


@contextlib.contextmanager
def s_server(root: Path, groups: str) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen(
        ["chroot", str(root), "openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", "/work/server.pem",
         "-groups", groups, "-rev"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        wait_port(port, proc, "openssl s_server", timeout=15)
        yield port
    finally:
        proc.kill()
        proc.wait()


def test_client_negotiates_mlkem_under_run(trixie: Path, inside: Callable[..., Inside]) -> None:
    with s_server(trixie, MLKEM) as port:
        body = (
            f"[cli]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{port}\n"
            "CAfile = /work/ca.pem\ncheckHost = localhost\n"
        )
        t = inside(body, "run")
        with socket.create_connection(("127.0.0.1", t.port()), timeout=15) as s:
            s.sendall(b"quantum\n")
            assert s.recv(100).strip() == b"mutnauq"
        t.wait_for(rf"LOG6\[\d+\]: TLS group: {MLKEM}$")
        compat = inside(body.replace("CAfile", "verifyChain = yes\nCAfile"), "compat")
        with socket.create_connection(("127.0.0.1", compat.port()), timeout=15) as s:
            s.sendall(b"quantum\n")
            with contextlib.suppress(ConnectionResetError):
                assert s.recv(100) == b""  # stunnel's list offers no hybrid: no handshake
        compat.wait_for(r"SSL_connect: .*handshake failure")


# ------------------------------------------------------------------ this machine's OpenSSL


def test_group_is_logged_and_counted_on_this_openssl(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer
) -> None:
    conf = tunnels.conf(
        f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
    )
    t = tunnels.start(conf, extra_env={"PYTUNNEL_STATUS": "127.0.0.1:0"})
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    raw = socket.create_connection(("127.0.0.1", t.port("srv")), timeout=15)
    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(b"g")
        assert s.recv(10) == b"g"
    m = t.wait_for(r"LOG6\[\d+\]: TLS group: (\S+)$")
    assert m.group(1).lower() in ("x25519", MLKEM.lower())
    samples = scrape(t)
    assert samples[("pytunnel_tls_handshakes_total", (("group", m.group(1)), ("service", "srv")))] == 1


def test_hybrid_name_on_this_openssl(tunnels: TunnelFactory, certs: Certs) -> None:
    """Before OpenSSL 3.5 a hybrid name in curves is refused, saying why; from 3.5 on it loads."""
    conf = tunnels.conf(
        f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:1\ncert = {certs.server_pem}\ncurves = {MLKEM}\n"
    )
    t = tunnels.start(conf, wait=False)
    if ssl.OPENSSL_VERSION_INFO >= (3, 5):
        t.wait_for("Configuration successful")
        return
    assert t.proc.wait(timeout=30) != 0
    assert "the ML-KEM hybrid groups need OpenSSL 3.5 or newer" in t.log, t.log
