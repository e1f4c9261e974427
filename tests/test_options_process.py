"""Process-wide options run for real: ``RNDfile``/``RNDbytes``/``RNDoverwrite`` (the seed
file is read and rewritten), ``syslog = yes`` (datagrams on a real ``/dev/log`` socket) and
``delay = yes`` (a name resolved again for each connection).

``/dev/log`` and ``/etc/hosts`` are the system's: the tunnel runs in a private mount
namespace (``unshare``; a user namespace as well when we are not root) where a tmpfs
``/dev`` holds a ``log`` link to the test's own socket and ``/etc/hosts`` is the test's
file.  Both implementations run the same config in the same namespace.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    BOUND,
    ROOT,
    Certs,
    EchoServer,
    Tunnel,
    TunnelFactory,
    cannot_run_here,
    need_stunnel,
    pytunnel_cmd,
    stunnel4_lacks,
)
from loopback_support import TagServer

# /dev becomes a tmpfs with links to the few devices a tunnel opens (links, not bind mounts:
# a user namespace may not open devices mounted in it), /dev/log our socket and, when given,
# /etc/hosts our file; then the tunnel is exec'd (its pid is the one we started)
NAMESPACE = r"""
set -e
old=$1 log=$2 hosts=$3
shift 3
mount --rbind /dev "$old"
mount -t tmpfs tmpfs /dev
for n in null zero full random urandom tty; do
  if [ -e "$old/$n" ]; then ln -s "$old/$n" "/dev/$n"; fi
done
ln -s /proc/self/fd /dev/fd
ln -s "$log" /dev/log
if [ -n "$hosts" ]; then mount --bind "$hosts" /etc/hosts; fi
exec "$@"
"""


def need_unshare() -> list[str]:
    """The command that opens a private mount namespace, or skip (fail under CI)."""
    unshare = shutil.which("unshare")
    prefix = [unshare or "unshare", "--mount"] + ([] if os.geteuid() == 0 else ["--user", "--map-root-user"])
    reason = ""
    if unshare is None:
        reason = "unshare (util-linux) is not installed"
    else:
        probe = subprocess.run([*prefix, "true"], capture_output=True, timeout=30)
        if probe.returncode != 0:
            reason = f"cannot open a mount namespace: {probe.stderr.decode(errors='replace').strip()}"
    if reason:
        cannot_run_here(reason)
    return prefix


def start_isolated(
    tunnels: TunnelFactory, body: str, impl: str, log_socket: Path, hosts: Path | None = None
) -> Tunnel:
    """Start a tunnel (config ``body`` as written, no header) in its own mount namespace."""
    prefix = need_unshare()
    tunnels.count += 1
    conf = tunnels.tmp_path / f"isolated{tunnels.count}.conf"
    conf.write_text(body)
    tunnel_cmd = [need_stunnel(), str(conf)] if impl == "stunnel4" else pytunnel_cmd(str(conf))
    old = tunnels.tmp_path / f"olddev{tunnels.count}"
    old.mkdir()
    cmd = [*prefix, "sh", "-c", NAMESPACE, "ns", str(old), str(log_socket), str(hosts or ""), *tunnel_cmd]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    log_path = tunnels.tmp_path / f"{impl}-{tunnels.count}.log"
    with open(log_path, "wb") as fh:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env)
    t = Tunnel(proc=proc, log_path=log_path)
    tunnels.started.append(t)
    t.wait_for(r"Configuration successful")
    expected = body.count("\naccept")
    deadline = time.monotonic() + 20
    while len(BOUND.findall(t.log)) < expected:
        assert time.monotonic() < deadline and proc.poll() is None, t.log
        time.sleep(0.02)
    for svc, _host, port in BOUND.findall(t.log):
        t.ports.setdefault(svc, []).append(int(port))
    return t


class SyslogReceiver:
    """A datagram socket standing in for syslogd: it keeps every message it is sent."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o666)
        self.messages: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            self.messages.append(data.decode(errors="replace"))

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern)
        while time.monotonic() < deadline:
            for msg in list(self.messages):
                if m := rx.search(msg):
                    return m
            time.sleep(0.02)
        raise AssertionError(f"no syslog message matches /{pattern}/:\n" + "\n".join(self.messages))

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def syslogd(tmp_path: Path) -> Iterator[SyslogReceiver]:
    receiver = SyslogReceiver(tmp_path / "log.sock")
    yield receiver
    receiver.close()


# ------------------------------------------------------------------ syslog


def test_syslog_yes_sends_to_dev_log(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, syslogd: SyslogReceiver
) -> None:
    """syslog = yes: each line goes to /dev/log as an RFC 3164 datagram with the facility
    and level of `debug` and the `service` name as ident; nothing above the level."""
    body = (
        f"foreground = yes\npid =\nsyslog = yes\ndebug = local3.info\nservice = tunneltest\n"
        f"[s]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
    )
    t = start_isolated(tunnels, body, impl, syslogd.path)
    facility = 19  # local3
    # glibc's format for openlog("tunneltest", LOG_CONS | LOG_NDELAY): a time stamp, no pid
    header = rf"^<{facility * 8 + 5}>\w{{3}} [ \d]\d \d\d:\d\d:\d\d tunneltest: "
    syslogd.wait_for(header + r"LOG5\[ui\]: Configuration successful$")
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    with ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", t.port("s"))), server_hostname="localhost"
    ) as s:
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
    syslogd.wait_for(
        rf"^<{facility * 8 + 5}>.*: LOG5\[\d+\]: Service \[s\] accepted connection from 127\.0\.0\.1"
    )
    syslogd.wait_for(rf"^<{facility * 8 + 6}>.*: LOG6\[")  # info is let through, debug is not
    assert t.stop() == 0
    assert not [m for m in syslogd.messages if m.startswith(f"<{facility * 8 + 7}>")]


def test_syslog_no_sends_nothing(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, syslogd: SyslogReceiver
) -> None:
    body = (
        f"foreground = yes\npid =\nsyslog = no\ndebug = 6\n"
        f"[s]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
    )
    t = start_isolated(tunnels, body, impl, syslogd.path)
    assert t.stop() == 0
    assert syslogd.messages == []


# ------------------------------------------------------------------ RNDfile


@pytest.mark.parametrize("overwrite", [True, False])
def test_rnd_file_is_read_and_rewritten(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, overwrite: bool, tmp_path: Path
) -> None:
    """RNDfile is read (RNDbytes of it) at start-up; with RNDoverwrite = yes (the default)
    it is rewritten with new random data, with RNDoverwrite = no it is left alone."""
    seed = tmp_path / "seed.rnd"
    original = os.urandom(2048)
    seed.write_bytes(original)
    conf = tunnels.conf(
        f"debug = 7\nRNDfile = {seed}\nRNDbytes = 64\nRNDoverwrite = {'yes' if overwrite else 'no'}\n"
        f"[s]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
    )
    t = tunnels.start(conf, impl=impl)
    if impl == "stunnel4":
        t.wait_for(r"No PRNG seeding was required")
        assert seed.read_bytes() == original
        stunnel4_lacks(
            "with OpenSSL 3 it never reads RNDfile: the PRNG is seeded already "
            "(it logs 'No PRNG seeding was required' and leaves the file alone)"
        )
    t.wait_for(r"LOG7\[ui\]: Snagged 64 random bytes from " + re.escape(str(seed)))
    if overwrite:
        t.wait_for(r"LOG7\[ui\]: Wrote 1024 new random bytes to " + re.escape(str(seed)))
        after = seed.read_bytes()
        assert len(after) == 1024 and after != original[:1024]
    else:
        t.wait_for(r"Configuration successful")
        assert "new random bytes" not in t.log
        assert seed.read_bytes() == original


# ------------------------------------------------------------------ delay


def first_bytes(port: int, certs: Certs) -> bytes:
    """What the backend behind the (server-mode) tunnel says first."""
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    with ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=20), server_hostname="localhost"
    ) as s:
        return s.recv(16)


@pytest.mark.parametrize("delay", [True, False])
def test_delay_resolves_for_each_connection(
    tunnels: TunnelFactory, certs: Certs, impl: str, delay: bool, tmp_path: Path, syslogd: SyslogReceiver
) -> None:
    """connect = backend.test:PORT, a name from /etc/hosts.  With delay = yes the name is
    looked up for each connection: when the hosts file moves it to another address, the
    next connection goes there.  With delay = no it was resolved once, at start-up."""
    for _attempt in range(20):  # the same port on two loopback addresses
        a = TagServer(b"A", host="127.0.0.2")
        try:
            b = TagServer(b"B", host="127.0.0.3", port=a.port)
            break
        except OSError:
            a.close()
    else:
        raise AssertionError("no port free on both 127.0.0.2 and 127.0.0.3")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n127.0.0.2 backend.test\n")
    try:
        body = (
            "foreground = yes\npid =\nsyslog = no\ndebug = 6\n"
            f"[d]\ncert = {certs.server_pem}\naccept = 127.0.0.1:0\nconnect = backend.test:{a.port}\n"
            f"delay = {'yes' if delay else 'no'}\n"
        )
        t = start_isolated(tunnels, body, impl, syslogd.path, hosts=hosts)
        assert first_bytes(t.port("d"), certs) == b"A"
        with open(hosts, "w") as fh:  # the same inode: the bind mount sees it
            fh.write("127.0.0.1 localhost\n127.0.0.3 backend.test\n")
        assert first_bytes(t.port("d"), certs) == (b"B" if delay else b"A")
    finally:
        a.close()
        b.close()
