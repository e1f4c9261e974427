"""Global process options with real processes: daemonizing, pid file, output file and log mode."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from conftest import ROOT, EchoServer, pytunnel_cmd


def wait_until(predicate: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("condition not met in time")


def test_background_daemon_with_pid_and_output(tmp_path: Path, echo: EchoServer) -> None:
    pid_file, out = tmp_path / "pytunnel.pid", tmp_path / "out.log"
    out.write_text("old line that log = overwrite must remove\n")
    conf = tmp_path / "d.conf"
    conf.write_text(
        f"pid = {pid_file}\noutput = {out}\nlog = overwrite\nsyslog = no\ndebug = 6\n"
        f"[plain]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # foreground is not set: like stunnel, the command returns once the daemon is started
    done = subprocess.run(pytunnel_cmd(str(conf)), env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    wait_until(lambda: pid_file.exists() and "Accepting new connections" in out.read_text())
    pid = int(pid_file.read_text())
    try:
        assert pid != os.getpid()
        text = out.read_text()
        assert "old line" not in text
        assert "LOG5[ui]: Configuration successful" in text
        assert done.stderr == ""  # a daemon does not log to the terminal
        os.kill(pid, 0)  # still running after its parent exited
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: not pid_file.exists())
    assert "Terminated" in out.read_text()


def test_foreground_quiet_logs_only_to_output(tmp_path: Path, echo: EchoServer) -> None:
    out = tmp_path / "out.log"
    conf = tmp_path / "q.conf"
    conf.write_text(
        f"foreground = quiet\noutput = {out}\nsyslog = no\ndebug = 6\n"
        f"[q]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        pytunnel_cmd(str(conf)), env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    try:
        wait_until(lambda: out.exists() and "Accepting new connections" in out.read_text())
        port = int(out.read_text().split("bound to 127.0.0.1:")[1].split()[0])
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
        wait_until(lambda: "accepted connection from" in out.read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0
    assert err == b""


def test_chroot_and_setuid_keep_serving_tls(tmp_path: Path, echo: EchoServer) -> None:
    """Everything a connection needs is loaded before chroot and setuid (nothing to import after)."""

    import trustme
    from conftest import need_root

    need_root("chroot and setuid")
    jail = tmp_path / "jail"
    jail.mkdir()
    ca = trustme.CA()
    cert = tmp_path / "server.pem"
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(cert))
    ca_pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    conf = tmp_path / "jail.conf"
    conf.write_text(
        f"foreground = yes\nsyslog = no\npid =\ndebug = 6\nchroot = {jail}\nsetuid = nobody\nsetgid = nogroup\n"
        f"[srv]\naccept = 127.0.0.1:0\nconnect = localhost:{echo.port}\ncert = {cert}\n"
        f"[cli]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:1\nverifyChain = yes\nCAfile = {ca_pem}\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTUNNEL_STATUS="127.0.0.1:0")
    log = tmp_path / "jail.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(pytunnel_cmd("run", str(conf)), env=env, stdout=fh, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: "Accepting new connections" in log.read_text() or proc.poll() is not None)
        text = log.read_text()
        assert proc.poll() is None, text
        port = int(text.split("Service [srv] (FD=")[1].split("bound to 127.0.0.1:")[1].split()[0])
        tls_echo(port, ca_pem)
        status = proc_status(proc.pid)
        assert status["Uid"].split()[0] != "0" and status["Gid"].split()[0] != "0"
        addr = text.split("Status server listening on http://")[1].split()[0]
        import urllib.request

        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as resp:
            assert b"pytunnel_connections_total" in resp.read()
        assert "Traceback" not in log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, log.read_text()


def proc_status(pid: int) -> dict[str, str]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def test_debian_chroot_layout(tmp_path: Path, echo: EchoServer, impl: str) -> None:
    """Debian's stunnel4 layout: chroot + pid + output as paths inside the jail + setuid.
    The pid file and the log land in the jail (the log owned by the setuid user, mode 0640,
    never at the host path), and the tunnel serves and stops cleanly."""
    import uuid

    import trustme
    from conftest import TunnelFactory, need_root

    need_root("chroot and setuid")
    import pwd

    nobody = pwd.getpwnam("nobody").pw_uid
    jail = tmp_path / "jail"
    jail.mkdir()
    jail.chmod(0o1777)
    ca = trustme.CA()
    cert = tmp_path / "server.pem"
    ca.issue_cert("localhost").private_key_and_cert_chain_pem.write_to_path(str(cert))
    cert.chmod(0o600)
    ca_pem = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    name = f"pytunnel-test-{uuid.uuid4().hex}"
    factory = TunnelFactory(tmp_path)
    conf = tmp_path / "debian.conf"
    conf.write_text(
        f"foreground = yes\nsyslog = no\ndebug = 6\nchroot = {jail}\nsetuid = nobody\nsetgid = nogroup\n"
        f"pid = /{name}.pid\noutput = /{name}.log\n"
        f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {cert}\n"
    )
    t = factory.start(conf, impl=impl, wait=False)
    try:
        log_in_jail = jail / f"{name}.log"
        wait_until(
            lambda: (
                log_in_jail.exists() and "bound to" in log_in_jail.read_text() or t.proc.poll() is not None
            )
        )
        assert t.proc.poll() is None, t.log + (log_in_jail.read_text() if log_in_jail.exists() else "")
        text = log_in_jail.read_text()
        port = int(text.split("bound to 127.0.0.1:")[1].split()[0])
        tls_echo(port, ca_pem)
        wait_until(lambda: "accepted connection" in log_in_jail.read_text())
        assert (jail / f"{name}.pid").read_text().strip() == str(t.proc.pid)
        st = log_in_jail.stat()
        assert st.st_uid == nobody
        assert st.st_mode & 0o777 == 0o640
        assert not Path(f"/{name}.log").exists()
        assert not Path(f"/{name}.pid").exists()
        assert "Traceback" not in t.log
    finally:
        for stray in (Path(f"/{name}.log"), Path(f"/{name}.pid")):
            stray.unlink(missing_ok=True)
        if t.proc.poll() is None:
            t.proc.send_signal(signal.SIGTERM)
        code = t.proc.wait(15)
        factory.close()
    assert code == 0, t.log


def test_pid_file_is_written_after_setuid(tmp_path: Path, echo: EchoServer, impl: str) -> None:
    """stunnel writes the pid file as the user it runs as (so it can remove it at the end):
    a directory only root may write is refused with stunnel's lines, never left stale."""
    from conftest import TunnelFactory, need_root

    need_root("setuid")
    piddir = tmp_path / "piddir"
    piddir.mkdir(mode=0o755)
    tmp_path.chmod(0o755)
    factory = TunnelFactory(tmp_path)
    conf = factory.conf(
        f"setuid = nobody\nsetgid = nogroup\npid = {piddir / 'x.pid'}\n"
        f"[c]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\n"
    )
    t = factory.start(conf, impl=impl, wait=False)
    try:
        assert t.proc.wait(15) != 0
        t.wait_for(rf"Cannot create pid file {piddir / 'x.pid'}")
        t.wait_for(r"create: Permission denied \(13\)")
        assert not (piddir / "x.pid").exists()
    finally:
        factory.close()


def tls_echo(port: int, ca_pem: Path) -> None:
    """Bytes through the jailed tunnel and back."""
    import ssl

    ctx = ssl.create_default_context(cafile=str(ca_pem))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        s.sendall(b"jailed")
        assert s.recv(6) == b"jailed"
