"""Scenarios of stunnel's manual that no other test ran side by side: the same config file
under pytunnel and under stunnel4 5.68, comparing the decisive log lines and the outcome.

- sessions with and without tickets (``options = NO_TICKET``);
- ``failover = prio`` / ``rr``: stunnel's LOG6 lines for each connection's attempts;
- PKCS#12 ``cert`` and a server without CAs: stunnel's start-up lines;
- ``local``: stunnel's bind line before the upstream connect;
- wrong values: stunnel's error words on the offending line;
- ``ticketKeySecret``: stunnel's start-up lines, on start and after SIGHUP;
- ``include = DIR`` with services in it, and an error inside an included file;
- a refused peer certificate outside ``redirect``, in server and in client mode: stunnel's
  ``CERT: Pre-verification error`` / ``Rejected by CERT at depth=N`` lines before OpenSSL's.

docs/parity.md lists every scenario of the manual with the tests that run it.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import ssl
from pathlib import Path

import pytest
from conftest import Certs, EchoServer, TunnelFactory, wait_until
from loopback_support import free_port
from test_faults import good_tls, server_conf
from test_options_tls import pkcs12_of
from test_redirect_sessions import TagServer, backends, tls_client  # noqa: F401 - backends: fixture

from tunnel.verify import subject_line

V12, V13 = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3


def count(log: str, pattern: str) -> int:
    return len(re.findall(pattern, log, re.M))


# ------------------------------------------------------------------ sessions and tickets


@pytest.mark.parametrize("version", [V12, V13], ids=["tls1.2", "tls1.3"])
@pytest.mark.parametrize("tickets", [True, False], ids=["tickets", "no-ticket"])
def test_session_resumes_with_and_without_tickets(
    tunnels: TunnelFactory,
    certs: Certs,
    backends: tuple[TagServer, TagServer],  # noqa: F811
    impl: str,
    version: ssl.TLSVersion,
    tickets: bool,
) -> None:
    """The default server resumes with a ticket; ``options = NO_TICKET`` sends none on TLS 1.2
    and resumes from the server's session cache instead (TLS 1.3: a stateful ticket).  Both
    log one `new session negotiated`, then `previous session reused`, and the same byte counts."""
    good = backends[0]
    extra = "" if tickets else "options = NO_TICKET\n"
    t = tunnels.start(
        tunnels.conf(
            f"[s]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{good.port}\ncert = {certs.server_pem}\n{extra}"
        ),
        impl=impl,
    )
    reply, session, reused, _ = tls_client(certs, t.port("s"), max_version=version)
    assert (reply, reused) == (b"GOOD:hi", False)
    assert session is not None
    if version == V12:
        assert session.has_ticket is tickets
    reply, _, reused, _ = tls_client(certs, t.port("s"), session=session, max_version=version)
    assert (reply, reused) == (b"GOOD:hi", True)
    closed = r"Connection closed: 7 byte\(s\) sent to TLS, 2 byte\(s\) sent to socket"
    wait_until(lambda: count(t.log, closed) == 2, 20, f"two /{closed}/ lines:\n{t.log}")
    assert count(t.log, r"TLS accepted: new session negotiated$") == 1, t.log
    assert count(t.log, r"TLS accepted: previous session reused$") == 1, t.log
    assert count(t.log, r"Service \[s\] accepted connection from 127\.0\.0\.1:\d+$") == 2
    assert t.stop() == 0


# ------------------------------------------------------------------ failover


def connect_lines(log: str) -> list[str]:
    keep = r"LOG[356]\[\d+\]: (failover: |s_connect: |Service \[srv\] connected remote server)"
    return [line.split(": ", 1)[1] for line in log.splitlines() if re.search(keep, line)]


def test_failover_prio_lines(tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str) -> None:
    """``failover = prio``, the first target refusing: every connection starts at entry #0,
    logs the refused attempt, then connects to the second target."""
    dead = free_port()
    t = tunnels.start(server_conf(tunnels, certs, [dead, echo.port], "failover = prio\n"), impl=impl)
    good_tls(t.port("srv"), certs)
    t.wait_for(r"Connection closed: 100000 byte\(s\) sent to TLS, 100000 byte\(s\) sent to socket")
    lines = connect_lines(t.log)
    assert lines[:5] == [
        "failover: priority, starting at entry #0",
        f"s_connect: connecting 127.0.0.1:{dead}",
        f"s_connect: connect 127.0.0.1:{dead}: Connection refused (111)",
        f"s_connect: connecting 127.0.0.1:{echo.port}",
        f"s_connect: connected 127.0.0.1:{echo.port}",
    ], t.log
    assert len(lines) == 6, t.log
    assert re.search(r"LOG6\[\d+\]: TLS closed \(SSL_read\)$", t.log, re.M), t.log  # close_notify
    assert re.fullmatch(r"Service \[srv\] connected remote server from 127\.0\.0\.1:\d+", lines[5])
    assert t.stop() == 0


def test_failover_rr_lines(tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str) -> None:
    """``failover = rr``: each connection logs its starting entry, and two connections in a
    row start at different entries and reach different targets."""
    second = EchoServer()
    try:
        t = tunnels.start(server_conf(tunnels, certs, [echo.port, second.port], "failover = rr\n"), impl=impl)
        for _ in range(2):
            good_tls(t.port("srv"), certs)
        assert (echo.connections, second.connections) == (1, 1)
        wait_until(lambda: count(t.log, r"Connection closed: ") == 2, 20, "two closed connections")
        starts = re.findall(r"failover: round-robin, starting at entry #(\d)$", t.log, re.M)
        assert sorted(starts) == ["0", "1"], t.log
        assert count(t.log, r"s_connect: connecting 127\.0\.0\.1:\d+$") == 2
        assert t.stop() == 0
    finally:
        second.close()


# ------------------------------------------------------------------ PKCS#12 and local


def test_pkcs12_and_no_ca_startup_lines(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, tmp_path: Path
) -> None:
    """``cert = FILE.p12``: one pair of lines for certificate and key; a server without any
    CA logs `No trusted certificates found` (LOG3 in 5.68, LOG6 in pytunnel as in stunnel
    5.7x: nothing is verified); the served bytes go through."""
    p12 = pkcs12_of(certs.server_pem, tmp_path / "server.p12")
    t = tunnels.start(
        tunnels.conf(f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {p12}\n"),
        impl=impl,
    )
    for line in (
        rf"LOG6\[ui\]: Loading certificate and private key from file: {re.escape(str(p12))}$",
        rf"LOG6\[ui\]: Certificate and private key loaded from file: {re.escape(str(p12))}$",
        r"LOG[36]\[ui\]: No trusted certificates found$",  # 5.68: LOG3; pytunnel: LOG6 (5.7x)
    ):
        assert re.search(line, t.log, re.M), f"{line}\n{t.log}"
    assert "Loading private key" not in t.log
    good_tls(t.port("srv"), certs)
    assert t.stop() == 0


def test_local_source_lines(tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str) -> None:
    """``local = 127.0.0.2``: the bind line, then the upstream connection from that address."""
    t = tunnels.start(server_conf(tunnels, certs, [echo.port], "local = 127.0.0.2\n"), impl=impl)
    good_tls(t.port("srv"), certs)
    lines = connect_lines(t.log)
    assert lines[:2] == [
        f"s_connect: connecting 127.0.0.1:{echo.port}",
        f"s_connect: connected 127.0.0.1:{echo.port}",
    ]
    assert re.fullmatch(r"Service \[srv\] connected remote server from 127\.0\.0\.2:\d+", lines[2]), t.log
    assert re.search(r"LOG6\[\d+\]: bind succeeded on an ephemeral port\n.*s_connect: connecting", t.log), (
        t.log
    )
    assert t.stop() == 0


# ------------------------------------------------------------------ ticketKeySecret


def test_ticket_secrets_are_logged_at_each_load(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    """``ticketKeySecret``/``ticketMacSecret``: stunnel's two lines right after `Initializing
    service`, at start and again after SIGHUP (resumption across it: tests/test_redirect_sessions.py)."""
    key, mac = "00112233445566778899aabbccddeeff", "ff" * 32
    t = tunnels.start(
        server_conf(tunnels, certs, [echo.port], f"ticketKeySecret = {key}\nticketMacSecret = {mac}\n"),
        impl=impl,
    )
    block = r"Initializing service \[srv\]\n.*ticketKeySecret configured\n.*ticketMacSecret configured\n"
    assert count(t.log, block) == 1, t.log
    t.signal(signal.SIGHUP)
    wait_until(lambda: count(t.log, block) == 2, 20, f"the lines again after SIGHUP:\n{t.log}")
    assert key not in t.log and mac not in t.log
    assert t.stop() == 0


# ------------------------------------------------------------------ include


def include_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    d = tmp_path / "conf.d"
    d.mkdir()
    for name, body in files.items():
        (d / name).write_text(body)
    return d


def test_include_runs_the_services_of_a_directory(
    tunnels: TunnelFactory,
    certs: Certs,
    backends: tuple[TagServer, TagServer],  # noqa: F811
    impl: str,
    tmp_path: Path,
) -> None:
    """``include = DIR`` in the global section: each file's services run, read in file-name
    order (`bound to` lines in that order), and each serves its own backend."""
    good, other = backends
    d = include_dir(
        tmp_path,
        {
            "20-b.conf": f"[b]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{other.port}\ncert = {certs.server_pem}\n",
            "10-a.conf": f"[a]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{good.port}\ncert = {certs.server_pem}\n",
        },
    )
    conf = tunnels.conf(f"include = {d}\n")
    # the factory counts `accept` lines in the main file only: wait for both services here
    t = tunnels.start(conf, impl=impl, wait=False)
    t.wait_for(r"Configuration successful")
    wait_until(lambda: count(t.log, r"Service \[[ab]\] \(FD=\d+\) bound to") == 2, 20, "two services bound")
    bound = re.findall(r"Service \[([ab])\] \(FD=\d+\) bound to 127\.0\.0\.1:(\d+)$", t.log, re.M)
    assert [name for name, _ in bound] == ["a", "b"]
    ports = {name: int(port) for name, port in bound}
    assert tls_client(certs, ports["a"])[0] == b"GOOD:hi"
    assert tls_client(certs, ports["b"])[0] == b"REDIRECTED:hi"
    for name in ("a", "b"):
        t.wait_for(rf"Service \[{name}\] accepted connection from 127\.0\.0\.1:\d+$")
    assert (good.count, other.count) == (1, 1)
    assert t.stop() == 0


def test_an_error_in_an_included_file_names_that_file(
    tunnels: TunnelFactory, certs: Certs, impl: str, tmp_path: Path
) -> None:
    """A bad line in an included file: `[!] INCLUDED_FILE:LINE: "line": message`, then
    `[!] FILE:LINE: "include = DIR": Failed to include a file` and `[!] Configuration
    failed`; the process exits 1 without serving."""
    d = include_dir(
        tmp_path,
        {"a.conf": f"[a]\naccept = 127.0.0.1:0\nconect = 127.0.0.1:9\ncert = {certs.server_pem}\n"},
    )
    conf = tunnels.conf(f"include = {d}\n")
    t = tunnels.start(conf, impl=impl, wait=False)
    assert t.proc.wait(30) == 1
    errors = [line for line in t.log.splitlines() if line.startswith("[!] ")]
    inner = f'[!] {d / "a.conf"}:3: "conect = 127.0.0.1:9": Specified option name is not valid here'
    outer = f'[!] {conf}:5: "include = {d}": Failed to include a file'
    first = [i for i, line in enumerate(errors) if line.startswith(inner)]
    assert first and outer in errors[first[0] :], t.log
    assert errors[-1] == "[!] Configuration failed", t.log
    assert "bound to" not in t.log


# ------------------------------------------------------------------ refused certificates


def other_subject(certs: Certs) -> str:
    pem = certs.other_server_pem.read_text()
    block = pem[pem.index("-----BEGIN CERTIFICATE-----") :]
    return subject_line(ssl.PEM_cert_to_DER_cert(block[: block.index("-----END CERTIFICATE-----") + 25]))


def test_refused_client_certificate_lines(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    """verifyChain in server mode, a client certificate from an unknown CA: stunnel's two CERT
    lines, then the handshake's failure, and nothing reaches the backend."""
    t = tunnels.start(
        tunnels.conf(
            f"[s]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\n"
            f"verifyChain = yes\nCAfile = {certs.ca_pem}\n"
        ),
        impl=impl,
    )
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    ctx.load_cert_chain(str(certs.other_server_pem))
    with socket.create_connection(("127.0.0.1", t.port("s")), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="localhost") as s:
                s.sendall(b"hello")
                assert s.recv(10) == b""
        except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
            pass  # TLS 1.3: the alert arrives after the client's handshake ended
    t.wait_for(r"Connection reset/closed: 0 byte\(s\) sent to TLS, 0 byte\(s\) sent to socket")
    assert_refused_lines(t.log, certs, "SSL_accept")
    assert echo.connections == 0
    assert t.stop() == 0


def assert_refused_lines(log: str, certs: Certs, verb: str) -> None:
    """stunnel's lines for a certificate from an untrusted CA: CERT, Rejected, then `verb`."""
    lines = [
        line.split(": ", 1)[1]
        for line in log.splitlines()
        if re.search(rf"LOG[345]\[\d+\]: (CERT|Rejected|{verb})", line)
    ]
    assert lines[:2] == [
        "CERT: Pre-verification error: unable to get local issuer certificate",
        f"Rejected by CERT at depth=0: {other_subject(certs)}",
    ], log
    assert lines[2].startswith(f"{verb}: ") and "certificate verify failed" in lines[2], log


def test_refused_server_certificate_lines(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str
) -> None:
    """verifyChain in client mode, the server's certificate from a CA the client does not
    trust: the same CERT lines, then `SSL_connect: … certificate verify failed`."""
    server = tunnels.start(
        tunnels.conf(
            f"[s]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.other_server_pem}\n"
        )
    )
    t = tunnels.start(
        tunnels.conf(
            f"[c]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{server.port('s')}\n"
            f"verifyChain = yes\nCAfile = {certs.ca_pem}\n"
        ),
        impl=impl,
    )
    with socket.create_connection(("127.0.0.1", t.port("c")), timeout=10) as app:
        app.sendall(b"hello")
        with contextlib.suppress(ConnectionResetError):  # reset = yes after a TLS failure
            assert app.recv(10) == b""
    t.wait_for(r"Connection closed/reset: 0 byte\(s\) sent to TLS, 0 byte\(s\) sent to socket")
    assert_refused_lines(t.log, certs, "SSL_connect")
    assert echo.connections == 0
    assert t.stop() == 0


# ------------------------------------------------------------------ wrong configurations


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("failover = random", "The argument needs to be either 'rr' or 'prio'"),
        ("verify = 9", "Bad verify level"),
        ("sslVersion = TLSv9", "Invalid protocol version"),
        ("delay = maybe", "The argument needs to be either 'yes' or 'no'"),
    ],
    ids=["failover", "verify", "sslVersion", "delay"],
)
def test_wrong_value_is_stunnels_error(
    tunnels: TunnelFactory, certs: Certs, impl: str, line: str, message: str
) -> None:
    """A bad value: `[!] FILE:LINE: "line": stunnel's words`, `[!] Configuration failed`, exit 1."""
    conf = tunnels.conf(
        f"[s]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\ncert = {certs.server_pem}\n{line}\n"
    )
    t = tunnels.start(conf, impl=impl, wait=False)
    assert t.proc.wait(30) == 1
    errors = [text for text in t.log.splitlines() if text.startswith("[!] ")]
    number = conf.read_text().splitlines().index(line) + 1
    assert any(e.startswith(f'[!] {conf}:{number}: "{line}": {message}') for e in errors), t.log
    assert errors[-1] == "[!] Configuration failed", t.log
