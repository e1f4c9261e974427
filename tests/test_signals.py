"""Real processes, real signals: HUP reloads, TERM stops (pytunnel drains), USR1 reopens
the log file, USR2 lists connections.  The same configs run under pytunnel and stunnel4
except where stunnel4 is documented to differ (it exits on TERM without draining)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import (
    BOUND,
    ROOT,
    Certs,
    EchoServer,
    Tunnel,
    TunnelFactory,
    need_stunnel,
    pytunnel_cmd,
    roundtrip,
    xfail_if_stunnel4_truncated,
)
from loopback_support import free_port


def start(tunnels: TunnelFactory, conf: Path, impl: str) -> Tunnel:
    """Start and wait for `Accepting new connections`: both implementations install their
    signal handlers after binding, so a signal before that line may still kill the process."""
    t = tunnels.start(conf, impl=impl)
    t.wait_for(r"Accepting new connections")
    return t


def bound_ports(t: Tunnel, service: str) -> list[int]:
    """Every port the service has logged as bound, oldest first (a reload logs it again)."""
    return [int(port) for svc, _host, port in BOUND.findall(t.log) if svc == service]


def wait_count(t: Tunnel, pattern: str, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(re.findall(pattern, t.log, re.M)) >= count:
            return
        if t.proc.poll() is not None:
            break
        time.sleep(0.02)
    raise AssertionError(f"wanted {count} x /{pattern}/:\n{t.log}")


def chain(
    tunnels: TunnelFactory, certs: Certs, backend: int, impl: str, extra: str = ""
) -> tuple[Tunnel, Tunnel]:
    """app -> client tunnel -> server tunnel -> backend, both tunnels of ``impl``."""
    server = start(
        tunnels,
        tunnels.conf(
            f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{backend}\ncert = {certs.server_pem}\n{extra}"
        ),
        impl=impl,
    )
    client = start(
        tunnels,
        tunnels.conf(
            f"[cli]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{server.port('srv')}\n"
            f"verifyChain = yes\nCAfile = {certs.ca_pem}\ncheckHost = localhost\n{extra}"
        ),
        impl=impl,
    )
    return client, server


class Transfer(threading.Thread):
    """A roundtrip in a thread; ``result`` is the bytes back or the exception."""

    def __init__(self, port: int, data: bytes) -> None:
        super().__init__(daemon=True)
        self.port, self.data = port, data
        self.result: bytes | BaseException | None = None

    def run(self) -> None:
        try:
            self.result = roundtrip(self.port, self.data, timeout=60)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.result = exc


# ------------------------------------------------------------------ SIGHUP


@pytest.mark.parametrize("hup", ["cli", "srv"])
def test_sighup_during_a_long_transfer(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, hup: str
) -> None:
    """HUP the client-mode or the server-mode tunnel while 20 MiB cross it.  (stunnel4
    closes and binds its listeners again, so `accept = …:0` gets a new port: the signalled
    tunnel is checked on the port of its latest `bound to` line.)"""
    client, server = chain(tunnels, certs, echo.port, impl)
    target = client if hup == "cli" else server
    data = os.urandom(20 * 1024 * 1024)
    xfer = Transfer(client.port("cli"), data)
    xfer.start()
    deadline = time.monotonic() + 30
    while echo.received < 4 * 1024 * 1024 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert echo.received < len(data), "the transfer finished before the signal: make it longer"
    target.signal(signal.SIGHUP)
    wait_count(target, r"Configuration successful", 2)
    xfer.join(60)
    assert not xfer.is_alive()
    assert isinstance(xfer.result, bytes), xfer.result
    xfail_if_stunnel4_truncated(impl, data, xfer.result)
    assert hashlib.sha256(xfer.result).digest() == hashlib.sha256(data).digest()
    assert echo.received == len(data)
    assert target.log.count("Accepting new connections") == 1
    wait_count(target, BOUND.pattern, 2)
    # the reloaded tunnel still serves
    if hup == "cli":
        back = roundtrip(bound_ports(client, "cli")[-1], b"after reload" * 1000)
        assert back == b"after reload" * 1000
    else:
        assert tls_echo_once(bound_ports(server, "srv")[-1], certs, b"after reload") == b"after reload"
    assert client.stop() == 0
    assert server.stop() == 0


def test_sighup_switches_the_connect_target(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    second = EchoServer()
    try:
        body = "[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{}\ncert = " + str(certs.server_pem) + "\n"
        conf = tunnels.conf(body.format(echo.port))
        t = start(tunnels, conf, impl)
        assert tls_echo_once(t.port("srv"), certs, b"one") == b"one"
        assert (echo.connections, second.connections) == (1, 0)
        conf.write_text(conf.read_text().replace(f":{echo.port}\n", f":{second.port}\n"))
        t.signal(signal.SIGHUP)
        wait_count(t, BOUND.pattern, 2)
        wait_count(t, r"Configuration successful", 2)
        # stunnel's lines operators grep after a HUP to see the certificate was (re)loaded
        wait_count(t, rf"LOG6\[ui\]: Certificate loaded from file: {re.escape(str(certs.server_pem))}$", 2)
        assert tls_echo_once(bound_ports(t, "srv")[-1], certs, b"two") == b"two"
        assert (echo.connections, second.connections) == (1, 1)
        assert t.log.count("Accepting new connections") == 1
        assert t.stop() == 0
    finally:
        second.close()


def tls_echo_once(port: int, certs: Certs, data: bytes) -> bytes:
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        s.sendall(data)
        out = b""
        while len(out) < len(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        s.unwrap()
        return out


def test_sighup_with_a_broken_config_keeps_the_old_one(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    conf = tunnels.conf(
        f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
    )
    t = start(tunnels, conf, impl)
    port = t.port("srv")
    text = conf.read_text()
    conf.write_text(text + "conect = 127.0.0.1:1\n")
    line = len(text.splitlines()) + 1
    t.signal(signal.SIGHUP)
    t.wait_for(rf'LOG3\[ui\]: {re.escape(str(conf))}:{line}: "conect = 127\.0\.0\.1:1": ')
    # stunnel: the error line(s), `Configuration failed`, `Failed to reload the configuration file`
    t.wait_for(r"LOG3\[ui\]: Configuration failed")
    assert tls_echo_once(port, certs, b"still here") == b"still here"
    assert echo.connections == 1
    assert t.proc.poll() is None
    assert t.stop() == 0


# ------------------------------------------------------------------ SIGTERM


def test_sigterm_exits_zero(tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str) -> None:
    t = start(
        tunnels,
        tunnels.conf(
            f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
        ),
        impl=impl,
    )
    assert tls_echo_once(t.port("srv"), certs, b"x") == b"x"
    t.signal(signal.SIGTERM)
    assert t.proc.wait(15) == 0
    assert re.search(r"LOG5\[ui\]: Terminated$", t.log, re.M), t.log
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", t.port("srv")), timeout=5).close()


def test_sigterm_after_the_log_reader_died(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    """Foreground, logging into a pipe whose reader went away (a dead `| logger`): the tunnel
    keeps serving, and TERM still stops it with status 0 (the log write's EPIPE must not
    swallow the signal)."""
    conf = tunnels.conf(
        f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
    )
    cmd = [need_stunnel(), str(conf)] if impl == "stunnel4" else pytunnel_cmd(str(conf))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
    )
    try:
        assert proc.stderr is not None
        seen = b""
        while b"Accepting new connections" not in seen or not BOUND.search(seen.decode(errors="replace")):
            chunk = proc.stderr.read1(65536)
            assert chunk, seen.decode(errors="replace")
            seen += chunk
        match = BOUND.search(seen.decode(errors="replace"))
        assert match is not None
        port = int(match.group(3))
        proc.stderr.close()  # the reader dies; every later log line meets EPIPE
        for _ in range(2):
            assert tls_echo_once(port, certs, b"still here") == b"still here"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_drains_a_connection_in_flight(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer
) -> None:
    """pytunnel only: stunnel4 exits on TERM at once, without draining."""
    client, server = chain(tunnels, certs, echo.port, "pytunnel")
    first = os.urandom(1024 * 1024)
    rest = os.urandom(1024 * 1024)
    out = bytearray()
    with socket.create_connection(("127.0.0.1", client.port("cli")), timeout=20) as s:

        def reader() -> None:
            while chunk := s.recv(262144):
                out.extend(chunk)

        rd = threading.Thread(target=reader, daemon=True)
        rd.start()
        s.sendall(first)
        deadline = time.monotonic() + 20
        while len(out) < len(first) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(out) == len(first)
        client.signal(signal.SIGTERM)
        server.signal(signal.SIGTERM)
        for t in (client, server):
            t.wait_for(r"Draining 1 connection\(s\) for up to 5 seconds")
        # no new connections while draining
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", client.port("cli")), timeout=5).close()
        s.sendall(rest)
        s.shutdown(socket.SHUT_WR)
        rd.join(20)
        assert not rd.is_alive()
    assert hashlib.sha256(out).digest() == hashlib.sha256(first + rest).digest()
    for t in (client, server):
        assert t.proc.wait(15) == 0
        assert "All connections finished" in t.log
        assert re.search(r"LOG5\[ui\]: Terminated$", t.log, re.M)


# ------------------------------------------------------------------ SIGUSR2, SIGUSR1


def test_sigusr2_lists_active_connections(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    t = start(
        tunnels,
        tunnels.conf(
            f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
        ),
        impl=impl,
    )
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    with (
        socket.create_connection(("127.0.0.1", t.port("srv")), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        s.sendall(b"held")
        assert s.recv(4) == b"held"
        # stunnel: `Active connection 1: Service [srv], 4 byte(s) sent to TLS, 4 byte(s) sent to socket`
        # (stunnel updates its counters a moment after the bytes move: ask again until it shows)
        wanted = (
            r"LOG\d\[ui\]: .*[Ss]ervice \[srv\].* 4 byte\(s\)( sent)? to TLS, 4 byte\(s\)( sent)? to socket$"
        )
        for _ in range(20):
            t.signal(signal.SIGUSR2)
            t.wait_for(r"LOG\d\[ui\]: (Listed )?1 active connection\(s\)$")
            if re.search(wanted, t.log, re.M):
                break
            time.sleep(0.1)
        assert re.search(wanted, t.log, re.M), t.log
    assert t.stop() == 0


def start_logging_to(out: Path, tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str) -> Tunnel:
    """A server-mode tunnel whose log also goes to ``out`` (`output =`)."""
    body = f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
    return start(tunnels, tunnels.conf(f"output = {out}\n" + body), impl=impl)


def test_sigusr1_reopens_the_output_file(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, tmp_path: Path
) -> None:
    out = tmp_path / "tunnel.log"
    t = start_logging_to(out, tunnels, certs, echo, impl)
    deadline = time.monotonic() + 10
    while "Accepting new connections" not in (out.read_text() if out.exists() else ""):
        assert time.monotonic() < deadline, "the output file never got the start-up lines"
        time.sleep(0.02)
    rotated = tmp_path / "tunnel.log.1"
    out.rename(rotated)
    t.signal(signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while not out.exists():
        assert time.monotonic() < deadline, "no new output file after SIGUSR1"
        time.sleep(0.02)
    t.wait_for(r"Log file reopened")
    assert tls_echo_once(t.port("srv"), certs, b"new") == b"new"
    t.wait_for(r"Connection closed: ")
    deadline = time.monotonic() + 10
    while "Connection closed: " not in out.read_text():
        assert time.monotonic() < deadline, out.read_text()
        time.sleep(0.02)
    new_text = out.read_text()
    assert "Log file reopened" in new_text
    assert "accepted connection" in new_text
    assert "accepted connection" not in rotated.read_text()
    assert t.stop() == 0


def wait_text(path: Path, needle: str, timeout: float = 10.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        if needle in text:
            return text
        assert time.monotonic() < deadline, f"{needle!r} never reached {path}:\n{text}"
        time.sleep(0.02)


def test_sigusr1_when_the_log_cannot_be_reopened(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, tmp_path: Path
) -> None:
    """The log's directory is gone at rotation time: stunnel's line, and the tunnel goes on
    serving (and still stops on TERM)."""
    logdir = tmp_path / "logs"
    logdir.mkdir()
    out = logdir / "tunnel.log"
    t = start_logging_to(out, tunnels, certs, echo, impl)
    wait_text(out, "Accepting new connections" if impl == "pytunnel" else "Configuration successful")
    out.unlink()
    logdir.rmdir()
    t.signal(signal.SIGUSR1)
    t.wait_for(rf"LOG3\[ui\]: Cannot open log file: {re.escape(str(out))}")
    assert tls_echo_once(t.port("srv"), certs, b"still") == b"still"
    assert t.stop() == 0


def test_sighup_applies_debug_and_output_and_reopens_the_log(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, tmp_path: Path
) -> None:
    """A reload takes the new `debug` and `output`, and reopens the output file (rotation by
    HUP, as stunnel closes and opens its log around a reload)."""
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    with socket.socket() as probe:  # a fixed port: stunnel rebinds every listener on reload
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    body = f"[srv]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
    conf = tunnels.conf(f"output = {first}\n" + body)
    t = start(tunnels, conf, impl=impl)
    wait_text(first, "Configuration successful")
    rotated = tmp_path / "a.log.1"
    first.rename(rotated)
    t.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not first.exists():  # a fresh a.log after the reload
        assert time.monotonic() < deadline, t.log
        time.sleep(0.02)
    t.wait_for(r"Configuration successful(?s:.*)Configuration successful")
    assert tls_echo_once(port, certs, b"one") == b"one"
    wait_text(first, "accepted connection")
    assert "accepted connection" not in rotated.read_text()
    # now debug 3 and another file: no notice lines for the next connection, in b.log
    header = conf.read_text().split("[srv]")[0]
    conf.write_text(
        header.replace("debug = 6", "debug = 3").replace(f"output = {first}", f"output = {second}") + body
    )
    t.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not second.exists():
        assert time.monotonic() < deadline, t.log
        time.sleep(0.02)
    time.sleep(0.5)
    before = t.log.count("accepted connection")
    assert tls_echo_once(port, certs, b"two") == b"two"
    # a fence: a plaintext client makes an `SSL_accept:` error (LOG3, still logged); whatever
    # the connection before it logged is in the file by then
    with socket.create_connection(("127.0.0.1", port), timeout=10) as bad:
        bad.sendall(b"GET / HTTP/1.0\r\n\r\n")
        with contextlib.suppress(OSError):
            bad.recv(100)
    wait_text(second, "SSL_accept")
    assert t.log.count("accepted connection") == before, "debug = 3 still logs notices"
    assert "accepted connection" not in second.read_text()
    assert t.stop() == 0


def test_sighup_renames_and_swaps_services_on_their_ports(
    tunnels: TunnelFactory, certs: Certs, impl: str
) -> None:
    """A reload that renames a service on the same port, and one that swaps the ports of two
    services: every port keeps serving, now with the new services' targets."""
    backends = [EchoServer() for _ in range(2)]
    try:
        p1, p2 = free_port(), free_port()

        def section(name: str, port: int, backend: EchoServer) -> str:
            return f"[{name}]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{backend.port}\ncert = {certs.server_pem}\n"

        conf = tunnels.conf(section("a", p1, backends[0]) + section("b", p2, backends[1]))
        header = conf.read_text().split("[a]")[0]
        t = start(tunnels, conf, impl)

        def reload(body: str, count: int) -> None:
            conf.write_text(header + body)
            t.signal(signal.SIGHUP)
            wait_count(t, r"Configuration successful", count)

        def served(port: int, backend: EchoServer) -> None:
            before = backend.connections
            assert tls_echo_once(port, certs, b"hi") == b"hi"
            assert backend.connections == before + 1

        reload(section("renamed", p1, backends[0]) + section("b", p2, backends[1]), 2)
        served(p1, backends[0])
        served(p2, backends[1])
        reload(section("renamed", p2, backends[0]) + section("b", p1, backends[1]), 3)
        served(p2, backends[0])
        served(p1, backends[1])
        assert t.stop() == 0
    finally:
        for b in backends:
            b.close()


def test_sighup_onto_a_busy_port_binds_once_it_is_free(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    """`accept` moved to a port someone else still holds: stunnel retries until the bind
    works; so does pytunnel, with no further signal."""
    p1 = free_port()
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    p2 = holder.getsockname()[1]
    body = (
        "[a]\naccept = 127.0.0.1:{}\nconnect = 127.0.0.1:" + str(echo.port) + f"\ncert = {certs.server_pem}\n"
    )
    conf = tunnels.conf(body.format(p1))
    t = start(tunnels, conf, impl)
    conf.write_text(conf.read_text().replace(f"127.0.0.1:{p1}\n", f"127.0.0.1:{p2}\n"))
    t.signal(signal.SIGHUP)
    t.wait_for(rf"Binding service \[a\] to 127\.0\.0\.1:{p2}: Address already in use \(98\)")
    holder.close()
    deadline = time.monotonic() + 15
    while True:
        try:
            assert tls_echo_once(p2, certs, b"moved") == b"moved"
            break
        except (ConnectionRefusedError, ConnectionResetError, ssl.SSLError):
            assert time.monotonic() < deadline, t.log
            time.sleep(0.2)
    assert t.stop() == 0
