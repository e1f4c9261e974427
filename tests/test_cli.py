"""The command line as scripts use it: stunnel's flags and exit codes, pytunnel's
`run`/`check`/`version`, PYTUNNEL_* environment variables, `-fd N`, the console script.

Where stunnel4 has the same command line (`-version`, `-help`, `-sockets`, `-options`,
`CONF`, `-fd N`) the test runs both; pytunnel's own subcommands run pytunnel only."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from conftest import ROOT, Certs, EchoServer, Tunnel, TunnelFactory, need_stunnel, pytunnel_cmd

STUNNEL_BANNER = re.compile(r"^stunnel 5\.\d+ (.* )?on \S+ platform$")


def env_with(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTUNNEL_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra or {})
    return env


def cmd_for(impl: str, *args: str) -> list[str]:
    return [need_stunnel(), *args] if impl == "stunnel4" else pytunnel_cmd(*args)


def run(
    cmd: Sequence[str], env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(cmd),
        capture_output=True,
        text=True,
        timeout=30,
        env=env_with(env),
        stdin=subprocess.DEVNULL,
        cwd=cwd,
    )


def console_script() -> str:
    # the script of the interpreter running the tests first: PATH may lead to another venv's
    script = str(Path(sys.executable).parent / "pytunnel")
    if not os.path.exists(script):
        script = shutil.which("pytunnel") or script
    if not os.path.exists(script):
        pytest.fail("the pytunnel console script is not installed (pip install -e .)")
    return script


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("[!] ")]


# ------------------------------------------------------------------ -version and friends


def test_version_banner() -> None:
    out = run(pytunnel_cmd("-version"))
    assert out.returncode == 0
    assert out.stdout == ""
    lines = out.stderr.splitlines()
    assert re.match(r"^stunnel 5\.\d+ .* on .* platform$", lines[0]), lines[0]
    openssl = ssl.OPENSSL_VERSION.split("OpenSSL ", 1)[1]
    compiled = [line for line in lines if line.startswith("Compiled/running with OpenSSL ")]
    assert compiled == [f"Compiled/running with OpenSSL {openssl}"], lines


def test_version_shape_matches_stunnel(impl: str) -> None:
    """What tools read from `stunnel -version` (stderr only, exit 0, the banner, defaults)."""
    out = run(cmd_for(impl, "-version"))
    assert out.returncode == 0
    assert out.stdout == ""
    lines = [line for line in out.stderr.splitlines() if line != "Initializing inetd mode configuration"]
    assert STUNNEL_BANNER.match(lines[0]), lines[0]
    assert any(re.match(r"^(Compiled|Running|Compiled/running) +with OpenSSL \d", line) for line in lines)
    for name, value in (("TIMEOUTclose", "60 seconds"), ("TIMEOUTconnect", "10 seconds"), ("verify", "none")):
        assert f"{name:<22} = {value}" in lines, name
    assert "FORK" not in out.stderr


@pytest.mark.parametrize(
    ("flag", "heading"),
    [
        ("-sockets", "Socket option defaults:"),
        ("-options", "Supported TLS options:"),
        ("-help", "Global options:"),
    ],
)
def test_info_flags_exit_zero(impl: str, flag: str, heading: str) -> None:
    out = run(cmd_for(impl, flag))
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    assert heading in out.stderr.splitlines()
    if flag == "-options":
        assert "options = NO_TICKET" in out.stderr.splitlines()
    if flag == "-sockets":
        assert re.search(r"^    SO_REUSEADDR +\| +yes *\|", out.stderr, re.M)


def test_help_lists_options_in_stunnels_form(impl: str) -> None:
    """`stunnel -help` prints `NAME<padding>= description` from column 0 (tools grep `^sni `)."""
    out = run(cmd_for(impl, "-help"))
    assert out.returncode == 0
    lines = out.stderr.splitlines()
    assert "Service-level options:" in lines
    for name in ("chroot", "checkHost", "sni", "verifyChain", "TIMEOUTidle"):
        assert any(re.match(rf"^{name} +=", line) for line in lines), name


def test_double_dash_help_lists_subcommands() -> None:
    out = run(pytunnel_cmd("--help"))
    assert out.returncode == 0
    commands = out.stdout.split("Commands:", 1)[1]
    for word in ("run", "check", "version"):
        assert re.search(rf"^  {word} ", commands, re.M), out.stdout
    for sub in ("run", "check"):
        sub_help = run(pytunnel_cmd(sub, "--help"))
        assert sub_help.returncode == 0
        assert "CONFIG" in sub_help.stdout


# ------------------------------------------------------------------ check


def write(tmp_path: Path, body: str, name: str = "stunnel.conf") -> Path:
    path = tmp_path / name
    path.write_text(body)
    return path


def good_body(certs: Certs) -> str:
    return (
        "foreground = yes\n"
        f"[in]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:1\ncert = {certs.server_pem}\n"
        f"[out]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:2\n"
        f"verifyChain = yes\nCAfile = {certs.ca_pem}\ncheckHost = localhost\n"
    )


def test_check_good_config_exits_zero(tmp_path: Path, certs: Certs) -> None:
    conf = write(tmp_path, good_body(certs))
    out = run(pytunnel_cmd("check", str(conf)))
    assert out.returncode == 0, out.stderr
    assert error_lines(out.stderr) == []
    assert "configuration OK (2 service(s))" in out.stderr


BAD = [
    pytest.param(
        "[gmail]\nclient = yes\naccept = 2525\nconect = smtp.gmail.com:465\n",
        4,
        "Specified option name is not valid here",
        'did you mean "connect"?',
        id="typo",
    ),
    pytest.param(
        "[gmail]\nclient = yes\naccept = 2525\n",
        1,
        "Each service must define two endpoints",
        'add "connect = [HOST:]PORT"',
        id="missing-endpoint",
    ),
    pytest.param(
        "[gmail]\nclient = maybe\naccept = 2525\nconnect = 1.2.3.4:465\n",
        2,
        "The argument needs to be either 'yes' or 'no'",
        "",
        id="client-maybe",
    ),
]


@pytest.mark.parametrize(("body", "line", "message", "hint"), BAD)
def test_check_bad_config(tmp_path: Path, body: str, line: int, message: str, hint: str) -> None:
    conf = write(tmp_path, body)
    out = run(pytunnel_cmd("check", str(conf)))
    assert out.returncode == 1
    assert out.stdout == ""
    errors = error_lines(out.stderr)
    quoted = body.splitlines()[line - 1]
    prefix = f'[!] {conf}:{line}: "{quoted}": '
    hits = [e for e in errors if e.startswith(prefix) and message in e and hint in e]
    assert hits, out.stderr
    assert errors[-1] == "[!] Configuration failed"
    assert "configuration OK" not in out.stderr


@pytest.mark.parametrize(("body", "line", "message", "hint"), [p for p in BAD if p.id != "missing-endpoint"])
def test_compat_bad_config_fails_like_stunnel(
    tmp_path: Path, impl: str, body: str, line: int, message: str, hint: str
) -> None:
    """`pytunnel CONF` / `stunnel CONF`: the same `[!] FILE:LINE: "line": message`,
    `[!] Configuration failed`, exit 1."""
    del hint
    conf = write(tmp_path, "foreground = yes\n" + body)
    out = run(cmd_for(impl, str(conf)))
    assert out.returncode == 1
    quoted = body.splitlines()[line - 1]
    expected = f'[!] {conf}:{line + 1}: "{quoted}": {message}'
    assert any(e.startswith(expected) for e in error_lines(out.stderr)), out.stderr
    assert error_lines(out.stderr)[-1] == "[!] Configuration failed"


def test_compat_missing_endpoint_fails_like_stunnel(tmp_path: Path, impl: str) -> None:
    conf = write(tmp_path, "foreground = yes\n[gmail]\nclient = yes\naccept = 2525\n")
    out = run(cmd_for(impl, str(conf)))
    assert out.returncode == 1
    assert any(
        "Service [gmail]: Each service must define two endpoints" in e for e in error_lines(out.stderr)
    )
    assert error_lines(out.stderr)[-1] == "[!] Configuration failed"


def test_check_missing_file(tmp_path: Path) -> None:
    out = run(pytunnel_cmd("check", str(tmp_path / "absent.conf")))
    assert out.returncode == 1
    assert "absent.conf" in out.stderr


# ------------------------------------------------------------------ PYTUNNEL_* environment


def test_pytunnel_config_env_for_check(tmp_path: Path, certs: Certs) -> None:
    good = write(tmp_path, good_body(certs), "good.conf")
    bad = write(tmp_path, "[x]\nclient = maybe\naccept = 1\nconnect = 2\n", "bad.conf")
    assert run(pytunnel_cmd("check"), env={"PYTUNNEL_CONFIG": str(good)}).returncode == 0
    out = run(pytunnel_cmd("check"), env={"PYTUNNEL_CONFIG": str(bad)})
    assert out.returncode == 1
    assert f'{bad}:2: "client = maybe": ' in out.stderr
    # an argument on the command line wins over the environment
    assert run(pytunnel_cmd("check", str(good)), env={"PYTUNNEL_CONFIG": str(bad)}).returncode == 0
    # neither: a usage error
    assert run(pytunnel_cmd("check")).returncode == 2


def test_drain_timeout_env_is_a_click_usage_error(tmp_path: Path) -> None:
    out = run(pytunnel_cmd("run", str(tmp_path / "x.conf")), env={"PYTUNNEL_RUN_DRAIN_TIMEOUT": "abc"})
    assert out.returncode == 2
    assert "Usage:" in out.stderr
    assert "Invalid value" in out.stderr and "drain-timeout" in out.stderr
    assert "Traceback" not in out.stderr


def test_plain_run_reports_like_click(tmp_path: Path) -> None:
    """`pytunnel run CONFIG` starts without click; whatever click would refuse it still
    refuses in click's words (a bad PYTUNNEL_* value, a directory)."""
    out = run(pytunnel_cmd("run", str(tmp_path / "x.conf")), env={"PYTUNNEL_STATUS": "nope"})
    assert out.returncode == 2 and "Usage:" in out.stderr and "--status" in out.stderr
    out = run(pytunnel_cmd("run", str(tmp_path)))
    assert out.returncode == 2 and "is a directory" in out.stderr
    out = run(pytunnel_cmd("run", str(tmp_path / "missing.conf")))
    assert out.returncode == 1 and "Traceback" not in out.stderr


def test_the_entry_point_knows_the_click_commands() -> None:
    from tunnel.cli import COMMANDS
    from tunnel.commands import cli

    assert set(cli.commands) == COMMANDS


def test_stunnels_command_line_and_plain_run_import_no_click(tmp_path: Path) -> None:
    code = (
        "import sys, tunnel.cli as c; assert c.plain_run(['run', sys.argv[1]]) is not None; "
        "assert c.plain_run(['run', '--status', 'x', sys.argv[1]]) is None; print('click' in sys.modules)"
    )
    out = run([sys.executable, "-c", code, str(tmp_path / "x.conf")])
    assert out.stdout.strip() == "False", out.stderr


def test_drain_timeout_env_applies(tunnels: TunnelFactory, certs: Certs, echo: EchoServer) -> None:
    conf = tunnels.conf(
        f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
    )
    t = tunnels.start(conf, mode="run", extra_env={"PYTUNNEL_RUN_DRAIN_TIMEOUT": "1"})
    t.wait_for(r"Accepting new connections")
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    with (
        socket.create_connection(("127.0.0.1", t.port("srv")), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        s.sendall(b"stay")
        assert s.recv(4) == b"stay"
        t.signal(signal.SIGTERM)
        t.wait_for(r"Draining 1 connection\(s\) for up to 1 seconds")
        assert t.proc.wait(10) == 0  # the connection stays idle: the 1 s deadline ends it
    assert "Drain deadline reached: closing 1 connection(s)" in t.log
    assert "Terminated" in t.log


# ------------------------------------------------------------------ -fd N


def test_fd_reads_the_config(impl: str, certs: Certs, echo: EchoServer, tmp_path: Path) -> None:
    body = (
        "foreground = yes\nsyslog = no\npid =\ndebug = 6\n"
        f"[fd]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
    )
    rfd, wfd = os.pipe()
    os.write(wfd, body.encode())
    os.close(wfd)
    log = tmp_path / "fd.log"
    try:
        with open(log, "wb") as fh:
            proc = subprocess.Popen(
                cmd_for(impl, "-fd", str(rfd)),
                pass_fds=(rfd,),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env_with(),
            )
    finally:
        os.close(rfd)
    t = Tunnel(proc=proc, log_path=log)
    try:
        m = t.wait_for(r"Service \[fd\] \(FD=\d+\) bound to 127\.0\.0\.1:(\d+)$")
        t.wait_for(r"Accepting new connections")
        assert re.search(rf"Reading configuration from (file )?(descriptor |FD=){rfd}\b", t.log), t.log
        ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
        with (
            socket.create_connection(("127.0.0.1", int(m.group(1))), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            s.sendall(b"ping over fd")
            assert s.recv(64) == b"ping over fd"
    finally:
        code = t.stop()
    assert code == 0
    assert "Terminated" in t.log


# ------------------------------------------------------------------ start-up failure


def test_port_in_use_exits_3(tunnels: TunnelFactory, certs: Certs, echo: EchoServer) -> None:
    """pytunnel only: stunnel4 exits 1 here; pytunnel's start-up failure status is 3."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        conf = tunnels.conf(
            f"[x]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
        )
        t = tunnels.start(conf, wait=False)
        assert t.proc.wait(15) == 3
        assert re.search(
            rf"LOG3\[ui\]: Binding service \[x\] to 127\.0\.0\.1:{port}: Address already in use \(98\)$",
            t.log,
            re.M,
        ), t.log
        assert "bound to" not in t.log
        assert "Accepting new connections" not in t.log
    finally:
        holder.close()


# ------------------------------------------------------------------ the console script


def test_console_script_matches_module(tmp_path: Path, certs: Certs) -> None:
    script = console_script()
    for args in (["-version"], ["-sockets"], ["--help"], ["version"]):
        a = run([script, *args])
        b = run(pytunnel_cmd(*args))
        assert (a.returncode, a.stdout) == (b.returncode, b.stdout), args
        assert a.stderr.replace("pytunnel", "") == b.stderr.replace("pytunnel", ""), args
    bad = write(tmp_path, "[x]\nclient = yes\naccept = 2525\nconect = 1\n")
    a = run([script, "check", str(bad)])
    b = run(pytunnel_cmd("check", str(bad)))
    assert a.returncode == b.returncode == 1
    assert error_lines(a.stderr) == error_lines(b.stderr)
    good = write(tmp_path, good_body(certs), "good.conf")
    assert run([script, "check", str(good)]).returncode == 0


def test_console_script_runs_a_tunnel(tmp_path: Path, certs: Certs, echo: EchoServer) -> None:
    conf = write(
        tmp_path,
        "foreground = yes\nsyslog = no\npid =\ndebug = 6\n"
        f"[s]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n",
    )
    log = tmp_path / "script.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(
            [console_script(), str(conf)], stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT
        )
    t = Tunnel(proc=proc, log_path=log)
    try:
        m = t.wait_for(r"Service \[s\] \(FD=\d+\) bound to 127\.0\.0\.1:(\d+)$")
        t.wait_for(r"Accepting new connections")
        ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
        with (
            socket.create_connection(("127.0.0.1", int(m.group(1))), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as s,
        ):
            s.sendall(b"script")
            assert s.recv(6) == b"script"
    finally:
        code = t.stop()
    assert code == 0


def test_fd_that_is_not_open(impl: str) -> None:
    """`-fd N` with nothing open at N: stunnel's line and status 1, no traceback."""
    out = run(cmd_for(impl, "-fd", "77"), env=env_with())
    assert out.returncode == 1, out.stderr
    assert "Cannot open configuration file" in out.stderr
    assert "Traceback" not in out.stderr
