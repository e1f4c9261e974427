"""The command line: stunnel's flags, `run`/`check`/`version`, exit codes, PYTUNNEL_* env."""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
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


def test_version_banner_is_stunnels_shape() -> None:
    out = run("-version")
    assert out.returncode == 0
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert re.match(r"^stunnel 5\.\d+ .* on \S+ platform$", lines[0]), lines[0]
    openssl = ssl.OPENSSL_VERSION.removeprefix("OpenSSL ")
    assert f"Compiled/running with OpenSSL {openssl}" in lines
    assert any(line.startswith("TIMEOUTclose") and "60 seconds" in line for line in lines)
    assert "FORK" not in out.stderr
    assert "FIPS" not in out.stderr


@pytest.mark.parametrize("flag", ["-sockets", "-options", "-help"])
def test_stunnel_info_flags(flag: str) -> None:
    out = run(flag)
    assert out.returncode == 0, out.stderr
    text = out.stderr
    if flag == "-sockets":
        assert re.search(r"TCP_NODELAY\s+\|\s+--\|\s+yes\|\s+yes", text), text
        assert re.search(r"SO_REUSEADDR\s+\|\s+yes\|", text)
    elif flag == "-options":
        assert "options = NO_TICKET" in text and "options = CIPHER_SERVER_PREFERENCE" in text
    else:
        assert "pytunnel -fd <n>" in text and "verifyChain" in text


def test_windows_only_flag_is_refused() -> None:
    out = run("-install")
    assert out.returncode == 1
    assert "Windows" in out.stderr


def test_help_lists_subcommands() -> None:
    out = run("--help")
    assert out.returncode == 0
    for word in ("run", "check", "version", "Examples"):
        assert word in out.stdout


def test_console_script_matches_module(tmp_path: Path) -> None:
    script = shutil.which("pytunnel") or str(Path(sys.executable).parent / "pytunnel")
    if not os.path.exists(script):
        pytest.fail("the pytunnel console script is not installed (pip install -e .)")
    out = subprocess.run([script, "version"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert out.stdout == run("version").stdout


def bad(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "stunnel.conf"
    path.write_text(body)
    return path


@pytest.mark.parametrize(
    ("body", "line", "needle"),
    [
        ("[gmail]\nclient = yes\naccept = 2525\nconect = smtp.gmail.com:465\n", 4, 'did you mean "connect"?'),
        ("[gmail]\nclient = yes\naccept = 2525\n", 1, "Each service must define two endpoints"),
        (
            "[gmail]\nclient = maybe\naccept = 2525\nconnect = 1.2.3.4:465\n",
            2,
            "needs to be either 'yes' or 'no'",
        ),
    ],
)
def test_check_reports_file_line_and_fix(tmp_path: Path, body: str, line: int, needle: str) -> None:
    conf = bad(tmp_path, body)
    out = run("check", str(conf))
    assert out.returncode == 1
    errors = [x for x in out.stderr.splitlines() if x.startswith("[!]")]
    text = body.splitlines()[line - 1]
    assert any(f'{conf}:{line}: "{text}": ' in e and needle in e for e in errors), out.stderr
    assert errors[-1] == "[!] Configuration failed"


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


def test_compat_mode_bad_config_fails_like_stunnel(tmp_path: Path) -> None:
    out = run(str(bad(tmp_path, "foreground = yes\n[x]\naccept = 1\n")))
    assert out.returncode == 1
    assert "Each service must define two endpoints" in out.stderr
    assert out.stderr.rstrip().endswith("Configuration failed")


def test_missing_config_file(tmp_path: Path) -> None:
    out = run(str(tmp_path / "absent.conf"))
    assert out.returncode == 1
    assert "cannot read the configuration file" in out.stderr


def test_env_var_supplies_the_config(tmp_path: Path) -> None:
    conf = bad(tmp_path, "[x]\naccept = 1\n")
    out = run("check", env={"PYTUNNEL_CONFIG": str(conf)})
    assert out.returncode == 1
    assert "Each service must define two endpoints" in out.stderr


def test_env_var_option_is_validated(tmp_path: Path) -> None:
    out = run("run", str(tmp_path / "x.conf"), env={"PYTUNNEL_RUN_DRAIN_TIMEOUT": "abc"})
    assert out.returncode == 2
    assert "drain-timeout" in out.stderr


def test_fd_reads_the_config_from_a_descriptor(certs: Certs, echo: EchoServer, tmp_path: Path) -> None:
    body = (
        "foreground = yes\nsyslog = no\ndebug = 6\n"
        f"[fd]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
    )
    rfd, wfd = os.pipe()
    os.write(wfd, body.encode())
    os.close(wfd)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log = tmp_path / "fd.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            pytunnel_cmd("-fd", str(rfd)), pass_fds=(rfd,), stdout=fh, stderr=subprocess.STDOUT, env=env
        )
    os.close(rfd)
    try:
        from conftest import Tunnel

        t = Tunnel(proc=proc, log_path=log)
        m = t.wait_for(r"Service \[fd\] \(FD=\d+\) bound to 127\.0\.0\.1:(\d+)$")
        ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
        with (
            socket.create_connection(("127.0.0.1", int(m.group(1))), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"
        assert "Reading configuration from file FD=" in t.log
    finally:
        proc.terminate()
        assert proc.wait(15) == 0


def test_port_in_use_is_a_startup_failure(tunnels: TunnelFactory, echo: EchoServer, certs: Certs) -> None:
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        conf = tunnels.conf(
            f"[busy]\naccept = 127.0.0.1:{port}\nconnect = {echo.port}\ncert = {certs.server_pem}\n"
        )
        t = tunnels.start(conf, wait=False)
        assert t.proc.wait(15) == 3
        assert f"Binding service [busy] to 127.0.0.1:{port}: Address already in use (98)" in t.log
        assert "Binding service [busy] failed" in t.log
        assert "bound to" not in t.log
    finally:
        holder.close()


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
