"""Command-line behaviour not covered by test_cli.py: hints, all-at-once errors, run mode."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
from pathlib import Path

from conftest import ROOT, Certs, EchoServer, TunnelFactory, pytunnel_cmd, roundtrip


def run(*args: str, env: dict[str, str] | None = None, **kw: object) -> subprocess.CompletedProcess[str]:
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(ROOT)
    full_env.update(env or {})
    return subprocess.run(
        pytunnel_cmd(*args),
        capture_output=True,
        text=True,
        timeout=30,
        env=full_env,
        stdin=subprocess.DEVNULL,
        **kw,
    )  # type: ignore[call-overload, no-any-return]


def test_windows_only_flag_is_refused() -> None:
    out = run("-install")
    assert out.returncode == 1
    assert "Windows" in out.stderr


def bad(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "stunnel.conf"
    path.write_text(body)
    return path


def test_missing_endpoint_hint_names_the_missing_option(tmp_path: Path) -> None:
    out = run("check", str(bad(tmp_path, "[x]\nclient = yes\naccept = 2525\n")))
    assert 'add "connect = [HOST:]PORT"' in out.stderr


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    body = "[a]\nclient = maybe\naccept = 1\nconnect = 2\n[b]\nclient = yes\naccept = 3\nconect = 4\n"
    out = run("check", str(bad(tmp_path, body)))
    assert out.returncode == 1
    assert ":2: " in out.stderr and ":8: " in out.stderr


def test_check_passes_the_example_offline() -> None:
    out = run("check", str(ROOT / "examples" / "stunnel.conf"))
    assert out.returncode == 0, out.stderr
    assert "configuration OK" in out.stderr


def test_check_reports_a_missing_certificate(tmp_path: Path) -> None:
    conf = bad(tmp_path, f"[s]\naccept = 1\nconnect = 2\ncert = {tmp_path / 'nope.pem'}\n")
    out = run("check", str(conf))
    assert out.returncode == 1
    assert "nope.pem" in out.stderr and "Failed to initialize TLS context" in out.stderr


def test_run_mode_serves_and_exits_zero_on_sigterm(
    tunnels: TunnelFactory, echo: EchoServer, certs: Certs
) -> None:
    conf = tunnels.conf(
        f"[s]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
    )
    t = tunnels.start(conf, mode="run")
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    with (
        socket.create_connection(("127.0.0.1", t.port("s")), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        s.sendall(b"hello")
        assert s.recv(5) == b"hello"
    assert t.stop() == 0
    assert "Terminated" in t.log
    assert t.log.count("Accepting new connections") == 1


def test_roundtrip_helper_sanity(echo: EchoServer) -> None:
    """The echo backend itself honours half-close (the other tests rely on it)."""
    assert roundtrip(echo.port, b"abc" * 1000) == b"abc" * 1000


def test_sockets_table_is_stunnels() -> None:
    """`-sockets` prints the same table as Debian's stunnel4 (defaults and OS column)."""
    from conftest import need_stunnel

    ours = run("-sockets").stderr
    theirs = subprocess.run([need_stunnel(), "-sockets"], capture_output=True, text=True, timeout=30).stderr
    table = lambda text: text[text.index("Socket option defaults:") :]  # noqa: E731
    assert table(ours) == table(theirs)
