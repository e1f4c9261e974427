"""``sandbox`` (a pytunnel extension): the Landlock sandbox pytunnel enters after start-up.

Real processes: ``pytunnel run`` (sandbox on by default where the kernel offers Landlock),
``exec`` programs that try files and ports inside and outside what the configuration names,
certificate hot reload and SIGHUP reload.  On a kernel without Landlock the tests check the
warning path instead (and say so); stunnel has nothing like it (no stunnel4 control).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import ssl
import sys
from pathlib import Path

import pytest
from conftest import Certs, EchoServer, TunnelFactory
from monitoring_support import poll


def landlock_abi() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    return max(int(libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))), 0)


ABI = landlock_abi()


def read_all(port: int, ca: Path) -> str:
    ctx = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=20) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out.decode()


@pytest.fixture
def layout(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, certs: Certs) -> dict[str, Path]:
    """The configuration's directory (with the exec program), the certificate's, and a secret
    in a directory the configuration does not name."""
    cfg, tls = tmp_path / "etc", tmp_path_factory.mktemp("tls")
    cfg.mkdir()
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.txt").write_text("the secret\n")
    shutil.copy(certs.server_pem, tls / "server.pem")
    (tls / "server.pem").chmod(0o600)
    reader = cfg / "reader"
    reader.write_text(
        "#!/bin/sh\n"
        f"for f in {tls / 'server.pem'} {outside / 'secret.txt'}; do\n"
        '  if IFS= read -r line < "$f"; then echo "read $f: $line"; fi\n'
        "done 2>&1\n"
    )
    reader.chmod(0o755)
    return {"cfg": cfg, "outside": outside, "reader": reader, "pem": tls / "server.pem"}


def conf_text(layout: dict[str, Path], extra: str = "") -> str:
    return f"{extra}[r]\naccept = 127.0.0.1:0\nexec = {layout['reader']}\ncert = {layout['pem']}\n"


def test_exec_child_reads_named_files_only(
    tunnels: TunnelFactory, certs: Certs, layout: dict[str, Path]
) -> None:
    conf = layout["cfg"] / "t.conf"
    conf.write_text("foreground = yes\nsyslog = no\npid =\ndebug = 6\n" + conf_text(layout))
    t = tunnels.start(conf, mode="run")
    answer = read_all(t.port("r"), certs.ca_pem)
    if ABI == 0:
        t.wait_for(r"Sandbox: not available: .*; running without one")
        assert "the secret" in answer
        pytest.xfail("this kernel offers no Landlock: only the warning path could be checked")
    m = t.wait_for(r"LOG5\[ui\]: Sandbox: Landlock ABI (\d+), (\d+) rules")
    assert int(m.group(1)) == ABI and int(m.group(2)) > 5
    assert f"read {layout['pem']}: -----BEGIN" in answer, answer  # named by cert =
    assert "the secret" not in answer, answer
    assert "secret.txt: Permission denied" in answer, answer
    print(f"\nsandbox: ABI {m.group(1)}, {m.group(2)} rules; exec child: {answer.strip()!r}")


@pytest.mark.parametrize("how", ["sandbox = no", "pytunnel CONFIG"])
def test_sandbox_off(tunnels: TunnelFactory, certs: Certs, layout: dict[str, Path], how: str) -> None:
    conf = layout["cfg"] / "t.conf"
    extra = "sandbox = no\n" if how == "sandbox = no" else ""
    conf.write_text("foreground = yes\nsyslog = no\npid =\ndebug = 6\n" + conf_text(layout, extra))
    t = tunnels.start(conf, mode="run" if how == "sandbox = no" else "compat")
    answer = read_all(t.port("r"), certs.ca_pem)
    assert "read" in answer and "the secret" in answer, answer
    assert "Sandbox: Landlock" not in t.log
    t.wait_for(r"Sandbox: off")


def test_reloads_inside_and_outside_the_sandbox(
    tunnels: TunnelFactory, certs: Certs, layout: dict[str, Path]
) -> None:
    if ABI == 0:
        pytest.xfail("this kernel offers no Landlock: nothing confines a reload")
    conf = layout["cfg"] / "t.conf"
    head = "foreground = yes\nsyslog = no\npid =\ndebug = 6\n"
    conf.write_text(head + conf_text(layout))
    t = tunnels.start(conf, mode="run", extra_env={"PYTUNNEL_CERT_RELOAD_INTERVAL": "0.2"})
    t.wait_for(r"Sandbox: Landlock ABI")
    # certificate hot reload: the file replaced by a rename (a new inode, as Kubernetes does)
    fresh = layout["pem"].with_suffix(".new")
    certs.ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(fresh))
    fresh.chmod(0o600)
    os.replace(fresh, layout["pem"])
    t.wait_for(r"Service \[r\]: certificates reloaded")
    assert "-----BEGIN" in read_all(t.port("r"), certs.ca_pem)
    # SIGHUP with the same paths: reloaded
    t.signal(signal.SIGHUP)
    poll("the first reload", lambda: t.log.count("Configuration successful") >= 2, timeout=30)
    # SIGHUP naming a certificate outside the sandbox: refused, the old configuration stays
    outside_pem = layout["outside"] / "server.pem"
    shutil.copy(certs.server_pem, outside_pem)
    conf.write_text(head + conf_text(layout).replace(str(layout["pem"]), str(outside_pem)))
    t.signal(signal.SIGHUP)
    m = t.wait_for(
        r"LOG3\[ui\]: .*Reload refused: outside the sandbox set up at start-up: (.*); restart pytunnel"
    )
    assert str(layout["outside"]) in m.group(1)
    t.wait_for(r"Keeping the old configuration")
    assert "-----BEGIN" in read_all(t.port("r"), certs.ca_pem)


def test_connect_to_a_port_not_configured_fails(tunnels: TunnelFactory, certs: Certs, tmp_path: Path) -> None:
    """ABI >= 4: the process (and its exec children) may connect only to configured ports."""
    if ABI < 4:
        pytest.xfail(f"Landlock ABI {ABI} has no TCP rules (they need ABI 4, Linux 6.7)")
    echo, other = EchoServer(), EchoServer()
    try:
        prog = tmp_path / "dial"
        prog.write_text(
            f"#!{sys.executable}\nimport socket\n"
            f"for port in ({echo.port}, {other.port}):\n"
            "    try:\n"
            "        socket.create_connection(('127.0.0.1', port), timeout=5).close()\n"
            "        print(port, 'connected')\n"
            "    except OSError as exc:\n"
            "        print(port, exc.strerror)\n"
        )
        prog.chmod(0o755)
        conf = tunnels.conf(
            f"[fwd]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
            f"[dial]\naccept = 127.0.0.1:0\nexec = {prog}\ncert = {certs.server_pem}\n"
        )
        t = tunnels.start(conf, mode="run")
        t.wait_for(r"Sandbox: Landlock ABI")
        answer = read_all(t.port("dial"), certs.ca_pem)
        assert f"{echo.port} connected" in answer, answer
        assert f"{other.port} Permission denied" in answer, answer
        print(f"\nsandbox TCP rules: {answer.strip()!r}")
    finally:
        echo.close()
        other.close()
