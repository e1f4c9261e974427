"""Reliability under load, faults and bad input: real processes, pytunnel and stunnel4 side by side.

Every check runs the same config under both implementations (the ``impl`` fixture) where
stunnel4 can do it, and records its figures (MB/s, RSS, fd counts, CPU, times, error counts)
in ``reliability.json`` under pytest's base temp dir (the path is printed at the end; run with
``-s`` to see each figure as it is measured).  docs/reliability.md tabulates one run.

Speed is never asserted: the machines are shared.  Bounds are on memory, file descriptors,
CPU while idle-but-saturated, and "within N seconds" for things that must happen promptly.

Topologies (the app is this test process; backends are threaded Python servers):

* client mode: app -> tunnel under test (client = yes, verifying) -> TLS backend (Python ssl)
* server mode: app -> stunnel4 client -> tunnel under test (cert) -> plain backend

The other half of the TLS hop is never stunnel4 in server mode: stunnel 5.68 in server mode
truncates a backend's reply that ends with a half-close (see docs/reliability.md), which would
charge its losses to whichever implementation is under test.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import re
import resource
import signal
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import (
    BOUND,
    Certs,
    EchoServer,
    Tunnel,
    TunnelFactory,
    cannot_run_here,
    need_root,
    roundtrip,
    wait_until,
)
from loopback_support import free_port
from reliability_support import (
    Bulk,
    Echo,
    Figures,
    MiB,
    OldTls,
    PrefixStream,
    Silent,
    StalledSink,
    StreamResult,
    app_state,
    block,
    client_hello,
    closed_port,
    conn_id_of,
    cpu_seconds,
    download,
    fd_count,
    half_close,
    key_fragments,
    lines_of,
    rotated_sha256,
    rss_kib,
    rst_close,
    send_rotated,
    settle_states,
    settle_value,
    short_roundtrip,
    start_limited,
    status_field,
    tls_echo_once,
    upload,
    wait_closed,
    wait_fds,
)

# ------------------------------------------------------------------ fixtures and chains


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Figures]:
    figs = Figures()
    yield figs
    path = tmp_path_factory.getbasetemp() / "reliability.json"
    figs.dump(path)
    extra = os.environ.get("RELIABILITY_JSON")
    if extra:
        figs.dump(Path(extra))
    print(f"\n[reliability] figures written to {path}")


@pytest.fixture(autouse=True)
def _no_key_material_in_any_log(tunnels: TunnelFactory, certs: Certs) -> Iterator[None]:
    """After every test here: no log of any tunnel it started holds private key material."""
    yield
    fragments = key_fragments(certs.server_pem.read_bytes()) + key_fragments(certs.client_pem.read_bytes())
    for t in tunnels.started:
        log = t.log
        assert "PRIVATE KEY" not in log, t.log_path
        leaked = [f for f in fragments if f in log]
        assert not leaked, f"{t.log_path} holds key material: {leaked[:2]}"


def started(tunnels: TunnelFactory, body: str, impl: str, **kw: object) -> Tunnel:
    t = tunnels.start(tunnels.conf(body), impl=impl, **kw)  # type: ignore[arg-type]
    t.wait_for(r"Accepting new connections")
    return t


def server_body(certs: Certs, backend: int, extra: str = "") -> str:
    return f"[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{backend}\ncert = {certs.server_pem}\n{extra}"


def client_body(certs: Certs, upstream: int, extra: str = "") -> str:
    return (
        f"[cli]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{upstream}\n"
        f"verifyChain = yes\nCAfile = {certs.ca_pem}\ncheckHost = localhost\n{extra}"
    )


def mode_chain(
    tunnels: TunnelFactory, certs: Certs, backend: int, impl: str, mode: str, extra: str = ""
) -> tuple[Tunnel, int]:
    """The tunnel under test in ``mode`` in front of ``backend`` (a TLS one in client mode);
    returns the tunnel and the port the app connects to."""
    if mode == "client":
        t = started(tunnels, client_body(certs, backend, extra), impl)
        return t, t.port("cli")
    t = started(tunnels, server_body(certs, backend, extra), impl)
    peer = started(tunnels, client_body(certs, t.port("srv")), "stunnel4")
    return t, peer.port("cli")


@pytest.fixture(params=["client", "server"])
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def bulk(certs: Certs, mode: str) -> Iterator[Bulk]:
    """The bulk backend for ``mode``: TLS in client mode, plain in server mode."""
    b = Bulk(certs.server_pem if mode == "client" else None)
    yield b
    b.close()


# ------------------------------------------------------------------ integrity and load

STREAMS = 64  # 32 uploads + 32 downloads of 16 MiB: 1 GiB through the tunnel, both ways at once


def lost_by_stunnel4(impl: str, lost: int) -> None:
    if impl == "stunnel4" and lost:
        pytest.xfail(f"stunnel4 lost {lost} byte(s): its known half-close truncation (docs/reliability.md)")


@pytest.mark.slow
def test_1gib_through_64_streams(
    tunnels: TunnelFactory, certs: Certs, bulk: Bulk, impl: str, mode: str, figures: Figures
) -> None:
    """1 GiB in 64 concurrent streams of 16 MiB, half of them uploads to a hashing sink and half
    downloads from a generator: every stream's SHA-256 matches end to end, no byte is lost."""
    t, port = mode_chain(tunnels, certs, bulk.port, impl, mode)
    rss0 = rss_kib(t.proc.pid)
    t0 = time.monotonic()

    def one(i: int) -> StreamResult:
        offset = i * 262147 % len(block())
        return upload(port, offset) if i % 2 == 0 else download(port, offset)

    block()
    with ThreadPoolExecutor(STREAMS) as pool:
        results = list(pool.map(one, range(STREAMS)))
    elapsed = time.monotonic() - t0
    moved = sum(r.received for r in results)
    lost = sum(r.sent - r.received for r in results)
    bad = [(i, r) for i, r in enumerate(results) if not r.digest_ok]
    figures.record(
        f"1 GiB / 64 streams, {mode} mode",
        impl,
        mb_per_s=round(moved / elapsed / 1e6, 1),
        seconds=round(elapsed, 2),
        bytes_moved=moved,
        bytes_lost=lost,
        bad_streams=len(bad),
        rss_before_mib=round(rss0 / 1024, 1),
        rss_after_mib=round(rss_kib(t.proc.pid) / 1024, 1),
    )
    lost_by_stunnel4(impl, lost)
    assert not bad, bad[:3]
    assert lost == 0 and moved == STREAMS * 16 * MiB
    assert t.stop() == 0


def test_half_close_then_the_whole_reply(
    tunnels: TunnelFactory, certs: Certs, bulk: Bulk, impl: str, mode: str, figures: Figures
) -> None:
    """The app sends 4 MiB, shuts its write side, then reads a 32 MiB reply that the backend
    only starts after the EOF.  (test_faults.py::test_half_close_reply_after_eof does the same
    through a client+server chain with a 200 kB reply.)"""
    t, port = mode_chain(tunnels, certs, bulk.port, impl, mode)
    size, reply = 4 * MiB, 32 * MiB
    t0 = time.monotonic()
    res = half_close(port, size, reply)
    figures.record(
        f"half-close, 32 MiB reply after EOF, {mode} mode",
        impl,
        seconds=round(time.monotonic() - t0, 2),
        reply_bytes=res.received,
        bytes_lost=res.sent - res.received,
        error=res.error,
    )
    lost_by_stunnel4(impl, res.sent - res.received)
    assert res.digest_ok, res
    assert t.stop() == 0


STALL_TOTAL = 200 * MiB
# pytunnel runs the full 10,000; stunnel4 (only the comparison here) runs 2,500 to keep the
# module's run time down: the docs table says so
SHORT_CONNECTIONS = {"pytunnel": 10_000, "stunnel4": 2_500}
LANES = 4  # connections run back to back in 4 lanes at once (keeps both cores busy)


@pytest.mark.slow
def test_stalled_reader_bounded_memory(
    tunnels: TunnelFactory, certs: Certs, impl: str, mode: str, figures: Figures
) -> None:
    """The far end stops reading while the app sends 200 MiB: the tunnel's RSS grows by at
    most 64 MiB (flow control pushes back to the app), and every byte arrives once the far end
    reads again."""
    sink = StalledSink(certs.server_pem if mode == "client" else None)
    try:
        t, port = mode_chain(tunnels, certs, sink.port, impl, mode)
        pid = t.proc.pid
        rss0 = rss_kib(pid)
        sent = [0]
        reply = bytearray()
        errors: list[str] = []

        def app() -> None:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=120) as s:

                    class Counting:
                        def sendall(self, b: memoryview) -> None:
                            s.sendall(b)
                            sent[0] += len(b)

                    send_rotated(Counting(), 0, STALL_TOTAL)
                    s.shutdown(socket.SHUT_WR)
                    while chunk := s.recv(4096):
                        reply.extend(chunk)
            except OSError as exc:
                errors.append(repr(exc))

        th = threading.Thread(target=app, daemon=True)
        th.start()
        peak, last, still = rss0, -1, time.monotonic()
        while time.monotonic() - still < 1.5 and sent[0] < STALL_TOTAL:
            time.sleep(0.1)
            peak = max(peak, rss_kib(pid))
            if sent[0] != last:
                last, still = sent[0], time.monotonic()
        stalled_at = sent[0]
        for _ in range(5):  # the stall holds: sample a little longer
            time.sleep(0.1)
            peak = max(peak, rss_kib(pid))
        sink.go.set()
        th.join(120)
        growth_mib = (peak - rss0) / 1024
        figures.record(
            f"stalled reader, 200 MiB, {mode} mode",
            impl,
            rss_growth_mib=round(growth_mib, 1),
            rss_before_mib=round(rss0 / 1024, 1),
            stalled_after_mib=round(stalled_at / MiB, 1),
            delivered_mib=round(sink.received / MiB, 1),
        )
        assert not errors, errors
        assert stalled_at < STALL_TOTAL, "the app never stalled: the far end read after all?"
        assert growth_mib <= 64
        assert sink.received == STALL_TOTAL
        assert bytes(reply) == rotated_sha256(0, STALL_TOTAL) + STALL_TOTAL.to_bytes(8, "big")
        assert t.stop() == 0
    finally:
        sink.close()


@pytest.mark.slow
@pytest.mark.timeout(300)  # ~35 s idle, ~65 s seen under a parallel Docker build; 120 s is the default
def test_many_short_connections_no_leak(
    tunnels: TunnelFactory, certs: Certs, impl: str, figures: Figures
) -> None:
    """10,000 short connections back to back, 4 at a time (client mode, session resumption on,
    as by default):
    the fd count returns to its baseline and RSS does not creep."""
    count = SHORT_CONNECTIONS[impl]
    backend = Echo(certs.server_pem)
    try:
        t = started(tunnels, client_body(certs, backend.port), impl)
        pid = t.proc.pid
        port = t.port("cli")
        payload = b"ping" * 16
        for _ in range(100):  # warm up: caches, lazy imports, the session cache
            assert short_roundtrip(port, payload)
        time.sleep(0.3)
        fds0, rss0 = fd_count(pid), rss_kib(pid)
        t0 = time.monotonic()
        failures = [0]
        rss_mid = [rss0]

        def lane(n: int) -> None:
            for i in range(n):
                try:
                    ok = short_roundtrip(port, payload)
                except OSError:
                    ok = False
                failures[0] += not ok
                if i == n // 2:
                    rss_mid[0] = rss_kib(pid)

        with ThreadPoolExecutor(LANES) as pool:
            list(pool.map(lane, [count // LANES] * LANES))
        elapsed = time.monotonic() - t0
        fds1 = wait_fds(pid, fds0, timeout=10)
        rss1 = rss_kib(pid)
        figures.record(
            "short connections in a row",
            impl,
            connections=count,
            per_second=round(count / elapsed, 1),
            failures=failures[0],
            lanes=LANES,
            fds_before=fds0,
            fds_after=fds1,
            rss_before_mib=round(rss0 / 1024, 1),
            rss_half_mib=round(rss_mid[0] / 1024, 1),
            rss_after_mib=round(rss1 / 1024, 1),
        )
        assert failures[0] == 0
        assert fds1 <= fds0
        assert (rss1 - rss0) / 1024 < 16, "RSS crept by more than 16 MiB"
        assert t.stop() == 0
    finally:
        backend.close()


# ------------------------------------------------------------------ faults


def bound_ports(t: Tunnel, service: str) -> list[int]:
    """Every port the service logged as bound, oldest first (stunnel4 binds again on SIGHUP)."""
    return [int(port) for svc, _host, port in BOUND.findall(t.log) if svc == service]


def wait_count(t: Tunnel, pattern: str, count: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(re.findall(pattern, t.log, re.M)) >= count:
            return
        time.sleep(0.02)
    raise AssertionError(f"wanted {count} x /{pattern}/:\n{t.log[-3000:]}")


@pytest.mark.slow
def test_sigterm_with_16_streams_in_flight(
    tunnels: TunnelFactory, certs: Certs, impl: str, figures: Figures
) -> None:
    """SIGTERM while 16 paced streams cross the tunnel: each stream comes back intact or is
    visibly cut (a prefix, then EOF or reset), never wrong bytes; the process exits within the
    drain deadline.  pytunnel drains (8 short streams finish, 8 long ones are cut at the
    deadline); stunnel4 exits at once and cuts them all."""
    drain = 3
    backend = Echo(certs.server_pem)
    try:
        t = started(
            tunnels,
            client_body(certs, backend.port),
            impl,
            extra_env={"PYTUNNEL_DRAIN_TIMEOUT": str(drain)},
        )
        port = t.port("cli")
        streams = [PrefixStream(port, os.urandom(256 * 1024), 0.8) for _ in range(8)]
        streams += [PrefixStream(port, os.urandom(2 * MiB), 15.0) for _ in range(8)]
        for s in streams:
            s.start()
        for s in streams:
            assert s.sending.wait(15)
        time.sleep(0.2)
        t0 = time.monotonic()
        t.signal(signal.SIGTERM)
        rc = t.proc.wait(drain + 15)
        exit_s = time.monotonic() - t0
        for s in streams:
            s.join(40)
        outcomes = [s.outcome for s in streams]
        figures.record(
            "SIGTERM, 16 streams in flight",
            impl,
            exit_seconds=round(exit_s, 2),
            drain_deadline_s=drain if impl == "pytunnel" else 0,
            intact=outcomes.count("intact"),
            cut=outcomes.count("cut"),
            wrong=outcomes.count("wrong"),
        )
        assert rc == 0
        assert outcomes.count("wrong") == 0
        assert outcomes.count("intact") + outcomes.count("cut") == 16, outcomes
        for s in streams:
            if s.outcome == "cut":
                assert s.received < len(s.data)
        if impl == "pytunnel":
            assert exit_s < drain + 3
            t.wait_for(r"Draining 1\d connection\(s\) for up to 3 seconds")
            assert outcomes[:8].count("intact") >= 1, outcomes  # the short ones were drained
            assert outcomes[8:].count("cut") == 8, outcomes  # the long ones hit the deadline
        else:
            assert exit_s < 5
    finally:
        backend.close()


@pytest.mark.slow
def test_sighup_under_load_unchanged_changed_broken(
    tunnels: TunnelFactory, certs: Certs, impl: str, figures: Figures
) -> None:
    """Three SIGHUPs while 8 streams cross the tunnel: config unchanged, connect target changed,
    config broken.  The streams finish intact; after the change new connections reach the new
    target; the broken config is logged and the previous one keeps serving."""
    a, b = Echo(certs.server_pem), Echo(certs.server_pem)
    try:
        conf = tunnels.conf(client_body(certs, a.port))
        t = tunnels.start(conf, impl=impl)
        t.wait_for(r"Accepting new connections")
        streams = [PrefixStream(t.port("cli"), os.urandom(MiB), 5.0) for _ in range(8)]
        for s in streams:
            s.start()
        for s in streams:
            assert s.sending.wait(15)
        deadline = time.monotonic() + 15
        while a.handshakes < 8 and time.monotonic() < deadline:  # all 8 are through to the upstream
            time.sleep(0.02)
        times: dict[str, float] = {}

        def hup(label: str, ok: bool) -> None:
            bound = len(BOUND.findall(t.log))
            done = len(re.findall(r"Configuration (successful|failed)", t.log))
            t0 = time.monotonic()
            t.signal(signal.SIGHUP)
            wait_count(t, r"Configuration (successful|failed)", done + 1)
            times[label] = round(time.monotonic() - t0, 2)
            if ok:
                wait_count(t, BOUND.pattern, bound + 1)

        payload = b"after reload" * 100
        hup("unchanged", True)
        assert roundtrip(bound_ports(t, "cli")[-1], payload) == payload
        assert (a.handshakes, b.handshakes) == (9, 0)
        conf.write_text(conf.read_text().replace(f":{a.port}\n", f":{b.port}\n"))
        hup("changed", True)
        assert roundtrip(bound_ports(t, "cli")[-1], payload) == payload
        assert (a.handshakes, b.handshakes) == (9, 1)
        text = conf.read_text()
        conf.write_text(text + "conect = 127.0.0.1:1\n")
        hup("broken", False)
        t.wait_for(rf"LOG3\[ui\]: {re.escape(str(conf))}:{len(text.splitlines()) + 1}: ")
        t.wait_for(r"LOG3\[ui\]: Configuration failed")
        assert roundtrip(bound_ports(t, "cli")[-1], payload) == payload
        assert (a.handshakes, b.handshakes) == (9, 2)
        for s in streams:
            s.join(40)
        outcomes = [s.outcome for s in streams]
        figures.record(
            "SIGHUP under load (unchanged, changed, broken)",
            impl,
            reload_seconds=times,
            streams_intact=outcomes.count("intact"),
            streams_cut=outcomes.count("cut"),
        )
        assert outcomes == ["intact"] * 8, [(s.outcome, s.error) for s in streams]
        assert t.stop() == 0
    finally:
        a.close()
        b.close()


FAULTS = {
    # service: (what the app does, the reason the log must name, how long "promptly" is)
    "down": (r"Connection refused \(111\)", 3.0),
    "hole": (r"TIMEOUTbusy exceeded", 2 + 4.0),
    "reset": (r"Connection reset by peer|reset by peer|\(104\)", 3.0),
    "nodns": (
        r"Error resolving|No host resolved|EAI_NONAME|Name or service not known",
        5.0,
    ),  # + the resolver's
}


def resolver_seconds(name: str) -> float:
    """How long this host's resolver takes to say that ``name`` does not resolve: a tunnel
    cannot close a delay = yes connection sooner (/etc/resolv.conf's timeouts, not ours)."""
    t0 = time.monotonic()
    with contextlib.suppress(OSError):
        socket.getaddrinfo(name, 443, type=socket.SOCK_STREAM)
    return time.monotonic() - t0


def test_upstream_faults_close_promptly(
    tunnels: TunnelFactory, certs: Certs, impl: str, figures: Figures
) -> None:
    """Client mode against a closed port, a black hole (TCP accepted, TLS never answered;
    TIMEOUTbusy = 2), an upstream that resets mid-stream, and a name that does not resolve
    (delay = yes): the app's connection closes promptly, the log names the reason, and a good
    connection through the same process works afterwards.  (test_faults.py has the refused and
    black-hole cases with stunnel's exact wording; here they are timed side by side.)

    "Promptly" is pytunnel's promise, counted from what the host allows: the unresolvable name
    gets the time this host's resolver takes to fail (measured here) on top.  stunnel4's times
    are recorded; for it the connection has to close, the log to say why, and the process to
    keep serving, within a generous minute."""
    good, hole, resetting = Echo(certs.server_pem), Silent(), Echo(certs.server_pem, reset_after=65536)
    verify = f"verifyChain = yes\nCAfile = {certs.ca_pem}\ncheckHost = localhost\n"
    try:
        t = started(
            tunnels,
            f"[down]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{closed_port()}\n"
            f"[hole]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{hole.port}\nTIMEOUTbusy = 2\n"
            f"[reset]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{resetting.port}\n{verify}"
            "[nodns]\nclient = yes\naccept = 127.0.0.1:0\nconnect = no-such-host.invalid:443\ndelay = yes\n"
            f"[good]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{good.port}\n{verify}",
            impl,
        )
        results: dict[str, dict[str, object]] = {}
        resolver = resolver_seconds("no-such-host.invalid")
        for svc, (reason, promised) in FAULTS.items():
            prompt = promised + (resolver if svc == "nodns" else 0.0)
            patience = prompt + 5 if impl == "pytunnel" else max(prompt + 5, 60.0)
            t0 = time.monotonic()
            with socket.socket() as app:
                app.bind(("127.0.0.1", 0))  # the port names the connection in the log, even if
                local = app.getsockname()[1]  # connect() fails
                app.settimeout(10)
                try:
                    app.connect(("127.0.0.1", t.port(svc)))
                except ConnectionResetError:  # accepted, refused upstream and reset before this
                    how = "reset"  # process saw its connect() complete (a loaded machine)
                else:
                    if svc == "reset":
                        with contextlib.suppress(OSError):
                            app.sendall(os.urandom(512 * 1024))  # 64 KiB come back, then the RST
                    how = wait_closed(app, patience)
            took = time.monotonic() - t0

            def accepted(svc: str = svc, local: int = local) -> str | None:
                return conn_id_of(t.log, svc, local)  # the log as it is now

            cid = wait_until(accepted, 10, f"[{svc}] accepted connection line")

            def says_why(cid: str = cid, reason: str = reason) -> bool:
                return bool(re.search(reason, "\n".join(lines_of(t.log, cid))))

            with contextlib.suppress(AssertionError):  # asserted below, with the lines
                wait_until(says_why, 10, "the reason")
            errors = lines_of(t.log, cid, max_level=3)
            named = [ln for ln in lines_of(t.log, cid, max_level=6) if re.search(reason, ln)]
            results[svc] = {"seconds": round(took, 2), "app_saw": how, "error_lines": len(errors)}
            results[svc]["reason_line"] = named[0] if named else ""
            if svc == "nodns":
                results[svc]["resolver_seconds"] = round(resolver, 2)
            assert how in ("eof", "reset"), (svc, how)
            if impl == "pytunnel":
                assert took < prompt, (svc, took, f"resolver {resolver:.2f} s")
            assert named, (svc, lines_of(t.log, cid))
            data = os.urandom(50_000)
            assert roundtrip(t.port("good"), data) == data  # the process keeps serving
        figures.record("upstream faults", impl, **results)
        assert t.stop() == 0
    finally:
        for srv in (good, hole, resetting):
            srv.close()


def test_upstream_reset_mid_stream_reaches_the_app_as_a_reset(tunnels: TunnelFactory, certs: Certs) -> None:
    """pytunnel only.  tunnel/relay.py promises that a reset ends the connection and, with
    reset = yes (the default), the app gets a TCP RST "rather than a clean EOF it could mistake
    for a complete reply".  Found by this module: the app got a clean EOF after a truncated reply
    (fixed in Connection.side_lost).  stunnel4 5.68 usually ends with a clean EOF here (a reset
    only when the app is still sending), so this is pytunnel's own promise, not compatibility."""
    resetting = Echo(certs.server_pem, reset_after=65536)
    try:
        t = started(tunnels, client_body(certs, resetting.port), "pytunnel")
        seen = []
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", t.port("cli")), timeout=10) as app:
                app.sendall(b"x" * 65536)  # echoed, then the upstream resets
                seen.append(wait_closed(app, 10))
        t.wait_for(r"Connection reset by peer \(104\)")
        assert seen == ["reset"] * 3, f"the app saw {seen}: a truncated reply that ends like a complete one"
    finally:
        resetting.close()


AT_ONCE = 15  # pytunnel serves (64 - reserve) / 2 = 20 at once under RLIMIT_NOFILE 64 (service.BUDGET)


def connect_many(port: int, n: int) -> tuple[list[socket.socket], list[str]]:
    """``n`` clients, each has sent one byte to echo; and their states: 'reset' for one the
    tunnel accepted and reset before its connect() or send returned (stunnel4 sheds clients
    that fast: a race on a loaded machine), else 'waiting'."""
    held, states = [], []
    for _ in range(n):
        s = socket.socket()
        s.settimeout(30)
        try:
            s.connect(("127.0.0.1", port))
            s.sendall(b"x")
            states.append("waiting")
        except ConnectionResetError:
            states.append("reset")
        held.append(s)
    return held, states


def at_the_limit(impl: str, at_once: int = AT_ONCE) -> Callable[[list[str]], bool]:
    """When the first wave is over: pytunnel has served ``at_once`` (its bound, polled for rather
    than slept for); stunnel4 (its own sizing) has served some.  settle_states then waits for a
    second with no client changing state."""
    need = at_once if impl == "pytunnel" else 1
    return lambda states: states.count("served") >= need


@pytest.mark.slow
def test_out_of_fds_no_busy_loop_and_recovery(
    tunnels: TunnelFactory, certs: Certs, impl: str, figures: Figures
) -> None:
    """`ulimit -n 256` and 400 concurrent connections (client mode, each needs two fds): the
    tunnel does not spin on EMFILE (CPU stays low while saturated), and serves again once the
    connections go away.  The CPU is measured once the tunnel is saturated (no client changes
    state for a second), not after a fixed sleep that may end mid-handshakes on a loaded
    machine.  stunnel4 sleeps a second on EMFILE; its CPU share is recorded, not asserted: what
    stunnel guarantees is that it keeps running, serves again and gives its fds back."""
    backend = Echo(certs.server_pem)
    try:
        conf = tunnels.conf(client_body(certs, backend.port))
        t = start_limited(tunnels, conf, impl, lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256)))
        pid, port = t.proc.pid, t.port("cli")
        assert re.search(r"Max open files\s+256\s+256", Path(f"/proc/{pid}/limits").read_text())
        assert short_roundtrip(port, b"warm")
        fds0 = fd_count(pid)
        held: list[socket.socket] = []
        refused = 0
        for _ in range(400):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(b"x")
                held.append(s)
            except OSError:
                refused += 1
        seen = settle_states(held, at_the_limit(impl, 100))
        fds_full = settle_value(lambda: fd_count(pid))
        cpu0, w0 = cpu_seconds(pid), time.monotonic()
        time.sleep(2.5)  # the measuring window, saturated
        cpu_pct = 100 * (cpu_seconds(pid) - cpu0) / (time.monotonic() - w0)
        seen = [app_state(s) if state == "waiting" else state for s, state in zip(held, seen, strict=True)]
        for s in held:
            s.close()
        t0 = time.monotonic()
        resumed = None
        while resumed is None and time.monotonic() - t0 < 60:
            # one patient client: it may queue behind the closed ones the tunnel still has to accept
            with contextlib.suppress(OSError):
                if short_roundtrip(port, b"again", timeout=max(1.0, 60 - (time.monotonic() - t0))):
                    resumed = time.monotonic() - t0
            if resumed is None:
                time.sleep(0.2)
        fds1 = wait_fds(pid, fds0, timeout=60)
        emfile_lines = len(re.findall(r"Too many open files|too many clients", t.log))
        figures.record(
            "ulimit -n 256, 400 concurrent",
            impl,
            cpu_percent_saturated=round(cpu_pct, 1),
            app_served=seen.count("served"),
            app_closed_unserved=seen.count("eof") + seen.count("reset"),
            app_waiting=seen.count("waiting"),
            connect_refused=refused,
            fds_saturated=fds_full,
            fds_before=fds0,
            fds_after=fds1,
            resumed_after_s=None if resumed is None else round(resumed, 2),
            limit_log_lines=emfile_lines,
            tracebacks=t.log.count("Traceback"),
        )
        if impl == "pytunnel":
            assert cpu_pct < 50, f"{cpu_pct:.0f}% of a core while saturated: a busy loop on EMFILE?"
        assert "Internal error" not in t.log and "Traceback" not in t.log
        assert resumed is not None, "no good connection within 60 s after the fds were freed"
        assert fds1 <= fds0
        assert t.proc.poll() is None
        assert t.stop() == 0
    finally:
        backend.close()


@pytest.mark.slow
def test_slowloris_does_not_starve_real_clients(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, figures: Figures
) -> None:
    """Server mode, TIMEOUTbusy = 10: 1,000 TCP connections that never finish a handshake (half
    send part of a ClientHello, half nothing) do not stop 20 real clients, served while the
    1,000 are still held; each of the 1,000 is closed by TIMEOUTbusy, and the fds come back.
    TIMEOUTbusy is long enough that a loaded machine still serves the real clients inside it
    (they take well under a second idle); every other wait polls with a generous deadline."""
    busy = 10
    t = started(tunnels, server_body(certs, echo.port, f"TIMEOUTbusy = {busy}\n"), impl)
    pid, port = t.proc.pid, t.port("srv")
    assert tls_echo_once(port, certs.ca_pem, b"warm") == b"warm"
    fds0 = settle_value(lambda: fd_count(pid), quiet=0.5)
    rss0 = rss_kib(pid)
    hello = client_hello()
    loris: list[socket.socket] = []
    for i in range(1000):
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        if i % 2:
            s.sendall(hello[: 10 + i % 50])
        loris.append(s)
    t_opened = time.monotonic()  # TIMEOUTbusy runs from each accept: the last one is no earlier
    fds_loaded = settle_value(lambda: fd_count(pid), quiet=0.5, timeout=10)
    rss_loaded = rss_kib(pid)
    latencies: list[float] = []

    def legit(i: int) -> bool:
        t0 = time.monotonic()
        data = os.urandom(10_000)
        ok = tls_echo_once(port, certs.ca_pem, data, timeout=busy) == data
        latencies.append(time.monotonic() - t0)
        return ok

    with ThreadPoolExecutor(20) as pool:
        oks = list(pool.map(legit, range(20)))
    served_while_held = time.monotonic() - t_opened < busy
    still_held = sum(wait_closed(s, 0.001) == "open" for s in loris[-10:])
    closed = 0
    deadline = t_opened + busy + 30
    for s in loris:
        if wait_closed(s, max(0.01, deadline - time.monotonic())) != "open":
            closed += 1
        s.close()
    all_closed_s = time.monotonic() - t_opened
    fds1 = wait_fds(pid, fds0, timeout=30)
    figures.record(
        "slowloris: 1,000 stalled handshakes + 20 real clients",
        impl,
        real_ok=sum(oks),
        real_max_latency_s=round(max(latencies), 2),
        stalled_closed=closed,
        all_stalled_closed_after_s=round(all_closed_s, 1),
        fds_loaded=fds_loaded,
        rss_per_stalled_kib=round((rss_loaded - rss0) / 1000, 1),
        fds_before=fds0,
        fds_after=fds1,
    )
    assert all(oks), f"{20 - sum(oks)} of 20 real clients not served within TIMEOUTbusy ({busy} s)"
    # the real clients were served while the stalled ones stood (not after TIMEOUTbusy freed them)
    assert served_while_held and still_held == 10, (served_while_held, still_held)
    assert closed == 1000, f"{1000 - closed} stalled connection(s) still open {busy + 30} s after TIMEOUTbusy"
    assert fds1 <= fds0, (fds0, fds1)
    assert t.stop() == 0


GARBAGE_KINDS = ("random", "truncated_hello", "rst", "tls10_hello", "oversized_record")


@pytest.mark.slow
def test_garbage_handshakes(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, figures: Figures
) -> None:
    """2,000 bad handshakes, 400 of each kind (random bytes, a truncated ClientHello, an
    immediate RST, a TLS 1.0-only ClientHello, an oversized record), 16 at a time: no crash, no
    Traceback in the log, every one closed, fds back to baseline, a good connection afterwards."""
    t = started(tunnels, server_body(certs, echo.port), impl)
    pid, port = t.proc.pid, t.port("srv")
    assert tls_echo_once(port, certs.ca_pem, b"warm") == b"warm"
    time.sleep(0.2)
    fds0 = fd_count(pid)
    hello, hello10 = client_hello(), client_hello(ssl.TLSVersion.TLSv1)
    oversized = b"\x16\x03\x01\x48\x01" + os.urandom(0x4801)

    def one(i: int) -> str:
        kind = GARBAGE_KINDS[i % len(GARBAGE_KINDS)]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            if kind == "rst":
                rst_close(s)
                return "rst"
            payload = {
                "random": os.urandom(1 + i % 3000),
                "truncated_hello": hello[: len(hello) // 2],
                "tls10_hello": hello10,
                "oversized_record": oversized,
            }[kind]
            with contextlib.suppress(OSError):
                s.sendall(payload)
                if kind != "tls10_hello":
                    s.shutdown(socket.SHUT_WR)
            return wait_closed(s, 10)

    t0 = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(one, range(2000)))
    elapsed = time.monotonic() - t0
    fds1 = wait_fds(pid, fds0, timeout=10)
    ok = tls_echo_once(port, certs.ca_pem, b"still serving") == b"still serving"
    log = t.log
    figures.record(
        "2,000 garbage handshakes",
        impl,
        seconds=round(elapsed, 1),
        still_open=outcomes.count("open"),
        closed_eof=outcomes.count("eof"),
        closed_reset=outcomes.count("reset"),
        error_lines=len(re.findall(r"LOG3\[\d+\]", log)),
        tracebacks=log.count("Traceback"),
        internal_errors=log.count("Internal error"),
        fds_before=fds0,
        fds_after=fds1,
    )
    assert t.proc.poll() is None
    assert outcomes.count("open") == 0
    assert "Traceback" not in log
    assert "Internal error" not in log
    assert fds1 <= fds0
    assert ok
    assert echo.connections == 2  # the warm-up and the last one: no garbage reached the backend
    assert t.stop() == 0


def test_connections_shed_at_the_fd_limit_are_logged(
    tunnels: TunnelFactory, certs: Certs, impl: str, figures: Figures
) -> None:
    """At the fd limit every connection the tunnel closes unserved leaves a log line.  Found by
    this module: uvloop's accept (libuv's EMFILE trick) accepted and closed them silently; fixed
    by tunnel/service.py accepting itself.  stunnel4 logs `local socket: Too many open files (24)`,
    sheds a varying number of clients (`remote socket: Too many open files`, `too many
    clients`: 1 to 28 of 60 in runs here, depending on thread timing) and leaves the rest
    waiting in the kernel's backlog: its figures are recorded, and only that it says so when it
    sheds is asserted."""
    backend = Echo(certs.server_pem)
    try:
        conf = tunnels.conf(client_body(certs, backend.port))
        t = start_limited(tunnels, conf, impl, lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
        held, shed = connect_many(t.port("cli"), 60)
        seen = settle_states(held, at_the_limit(impl), initial=shed)
        unserved = seen.count("eof") + seen.count("reset")

        def lines() -> int:
            return len(re.findall(r"Too many open files|too many clients", t.log))

        with contextlib.suppress(AssertionError):  # the line may follow the close: give it time
            wait_until(lambda: lines() >= unserved, 10, "a log line for each connection shed")
        for s in held:
            s.close()
        figures.record(
            "fd limit: connections shed vs log lines",
            impl,
            app_closed_unserved=unserved,
            app_waiting=seen.count("waiting"),
            app_served=seen.count("served"),
            limit_log_lines=lines(),
        )
        if impl == "pytunnel":
            assert seen.count("served") >= AT_ONCE, seen
            assert lines() >= unserved, (
                f"{unserved} connection(s) closed unserved, {lines()} log line(s) say why"
            )
        elif unserved:
            assert lines(), f"stunnel4 shed {unserved} connection(s) without a line about the limit"
        assert t.stop() == 0
    finally:
        backend.close()


def test_excess_clients_wait_at_the_fd_limit(
    tunnels: TunnelFactory, certs: Certs, impl: str, figures: Figures
) -> None:
    """At the fd limit the excess clients wait in the kernel's backlog and are served once fds
    free up.  Each client-mode connection needs two descriptors, so pytunnel stops accepting at
    (RLIMIT_NOFILE - reserve) / 2 connections (service.BUDGET), as stunnel sizes its limit;
    before that fix accepted clients held the descriptors their upstreams needed.

    stunnel4 accepts past what its descriptors allow and closes a varying share of the excess
    unserved (4 to 23 of 60 in runs here: its threads race for the last fds), so for it the
    figures are recorded and only that every client ends, served or closed, is asserted."""
    backend = Echo(certs.server_pem)
    try:
        conf = tunnels.conf(client_body(certs, backend.port))
        t = start_limited(tunnels, conf, impl, lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
        held, shed = connect_many(t.port("cli"), 60)
        first = settle_states(held, at_the_limit(impl), initial=shed)
        for s, state in zip(held, first, strict=True):
            if state != "waiting":
                s.close()  # frees the tunnel's fds for the ones still waiting
        waiting = [s for s, state in zip(held, first, strict=True) if state == "waiting"]
        later = settle_states(
            waiting, lambda states: "waiting" not in states, quiet=0, timeout=60, close_done=True
        )
        for s in waiting:
            s.close()
        closed = first.count("eof") + first.count("reset") + later.count("eof") + later.count("reset")
        served = first.count("served") + later.count("served")
        figures.record(
            "fd limit: excess clients wait and are served",
            impl,
            served_at_once=first.count("served"),
            waited_then_served=later.count("served"),
            closed_unserved=closed,
            never_served=later.count("waiting"),
        )
        assert served + closed == 60, f"{later.count('waiting')} client(s) still waiting after 60 s"
        if impl == "pytunnel":
            assert first.count("served") >= AT_ONCE, (
                f"only {first.count('served')} of 60 served at once: are accepted clients holding the fds "
                "their upstream sockets need (a deadlock until something times out)?"
            )
            assert closed <= 15, f"{closed} of 60 clients were closed unserved instead of waiting"
        assert t.stop() == 0
    finally:
        backend.close()


# ------------------------------------------------------------------ security properties


def test_group_readable_key_is_warned(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, tmp_path: Path
) -> None:
    """A private key readable by group or others: stunnel's warning `Insecure file permissions on
    FILE` (pytunnel gained it during this work: tunnel/process.py)."""
    key = tmp_path / "loose.pem"
    key.write_bytes(certs.server_pem.read_bytes())
    key.chmod(0o644)
    t = started(tunnels, server_body(certs, echo.port).replace(str(certs.server_pem), str(key)), impl)
    assert tls_echo_once(t.port("srv"), certs.ca_pem, b"hi") == b"hi"
    t.wait_for(rf"LOG4\[ui\]: .*{re.escape(str(key))}", timeout=3)
    assert t.stop() == 0


def test_private_key_mode_0600_is_not_warned(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, tmp_path: Path
) -> None:
    key = tmp_path / "tight.pem"
    key.write_bytes(certs.server_pem.read_bytes())
    key.chmod(0o600)
    t = started(tunnels, server_body(certs, echo.port).replace(str(certs.server_pem), str(key)), impl)
    assert not re.search(rf"LOG4\[ui\]: .*{re.escape(str(key))}", t.log)
    assert t.stop() == 0


def test_key_that_does_not_match_the_certificate_is_a_startup_error(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, tmp_path: Path
) -> None:
    pem = tmp_path / "mismatch.pem"
    chain = certs.server_pem.read_bytes()
    cert_part = chain[chain.index(b"-----BEGIN CERTIFICATE-----") :]
    pem.write_bytes(certs.ca.issue_cert("localhost").private_key_pem.bytes() + cert_part)
    pem.chmod(0o600)
    conf = tunnels.conf(server_body(certs, echo.port).replace(str(certs.server_pem), str(pem)))
    t = tunnels.start(conf, impl=impl, wait=False)
    rc = t.proc.wait(20)
    assert rc != 0
    assert re.search(r"(?i)key values mismatch|KEY_VALUES_MISMATCH", t.log), t.log
    assert str(pem) in t.log
    assert not BOUND.search(t.log), "it bound a listener with a broken key pair"


def free_privileged_port() -> int:
    for port in range(1000, 600, -1):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    cannot_run_here("no free port below 1024")


def test_setuid_setgid_drop_privileges_after_binding(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, figures: Figures
) -> None:
    """`setuid = nobody`, `setgid = nogroup`: the listener on a privileged port is bound (as
    root), then every uid and gid of the process is nobody/nogroup, and it serves."""
    need_root("binding a privileged port and setuid")
    uid, gid = pwd.getpwnam("nobody").pw_uid, grp.getgrnam("nogroup").gr_gid
    port = free_privileged_port()
    t = started(
        tunnels,
        "setuid = nobody\nsetgid = nogroup\n"
        + server_body(certs, echo.port).replace("accept = 127.0.0.1:0", f"accept = 127.0.0.1:{port}"),
        impl,
    )
    assert t.port("srv") == port
    pid = t.proc.pid
    uids, gids = status_field(pid, "Uid").split(), status_field(pid, "Gid").split()
    groups = status_field(pid, "Groups").split()
    figures.record("setuid/setgid", impl, uid=" ".join(uids), gid=" ".join(gids), groups=" ".join(groups))
    assert uids == [str(uid)] * 4
    assert gids == [str(gid)] * 4
    assert groups in ([], [str(gid)])
    assert tls_echo_once(port, certs.ca_pem, b"as nobody") == b"as nobody"
    assert t.stop() == 0


def old_tls_client(port: int, version: ssl.TLSVersion) -> str:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ssl.TLSVersion.TLSv1
        ctx.maximum_version = version
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw) as s:
                return f"accepted {s.version()}"
        except (ssl.SSLError, OSError) as exc:
            return f"refused: {exc}"


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1], ids=["1.0", "1.1"])
def test_tls_below_1_2_refused_by_default_both_directions(
    tunnels: TunnelFactory,
    certs: Certs,
    echo: EchoServer,
    impl: str,
    version: ssl.TLSVersion,
    figures: Figures,
) -> None:
    """With no sslVersion options: a TLS 1.0/1.1-only client is refused in server mode and a
    TLS 1.0/1.1-only upstream is refused in client mode.  (test_tls_verification.py has the
    server-mode TLS 1.1 case for pytunnel alone.)"""
    old = OldTls(certs.server_pem, version)
    try:
        t = started(
            tunnels,
            server_body(certs, echo.port)
            + f"[cli]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{old.port}\n",
            impl,
        )
        server_side = old_tls_client(t.port("srv"), version)
        assert server_side.startswith("refused"), server_side
        with socket.create_connection(("127.0.0.1", t.port("cli")), timeout=10) as app:
            app.sendall(b"secret")
            assert wait_closed(app, 10) in ("eof", "reset")
        deadline = time.monotonic() + 5
        while not old.errors and time.monotonic() < deadline:
            time.sleep(0.05)
        assert old.handshakes == 0 and old.errors, "the client side completed a TLS < 1.2 handshake"
        lines = re.findall(r"LOG3\[\d+\]: (SSL_(?:accept|connect): .*)$", t.log, re.M)
        figures.record(
            f"TLS {version.name} refused", impl, server_mode=lines[0] if lines else "", client_mode=lines[-1]
        )
        assert len(lines) >= 2
        assert tls_echo_once(t.port("srv"), certs.ca_pem, b"1.2+") == b"1.2+"
        assert t.stop() == 0
    finally:
        old.close()


def test_plaintext_listener_off_loopback_is_warned(tunnels: TunnelFactory, certs: Certs) -> None:
    """pytunnel only (stunnel4 has no such warning): a client-mode listener anyone can reach."""
    t = started(
        tunnels,
        client_body(certs, closed_port()).replace("accept = 127.0.0.1:0", "accept = 0.0.0.0:0")
        + client_body(certs, closed_port()).replace("[cli]", "[local]"),
        "pytunnel",
    )
    t.wait_for(r"LOG4\[ui\]: Service \[cli\]: plaintext listener 0\.0\.0\.0:0 is not on loopback")
    assert "Service [local]: plaintext listener" not in t.log
    assert t.stop() == 0


def test_loopback_addresses_are_not_warned(tunnels: TunnelFactory, certs: Certs) -> None:
    """All of 127.0.0.0/8 is loopback.  Found by this module: the check compared strings, so
    127.0.0.2 got `is not on loopback; anyone who can reach it can use the tunnel`."""
    t = started(
        tunnels,
        client_body(certs, closed_port()).replace("accept = 127.0.0.1:0", "accept = 127.0.0.2:0"),
        "pytunnel",
    )
    assert "plaintext listener" not in t.log, t.log
    assert t.stop() == 0


def test_no_private_key_material_in_logs_at_debug_7(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, tmp_path: Path
) -> None:
    """debug = 7 through start-up, mutual-TLS handshakes in both modes, a failed handshake, a
    SIGHUP reload and a start-up that fails on a mismatched key: no log holds `PRIVATE KEY` or
    any slice of a key's base64.  (Every other test in this module is checked the same way at
    debug = 6 by an autouse fixture.)"""
    key = tmp_path / "server.pem"
    key.write_bytes(certs.server_pem.read_bytes())
    key.chmod(0o600)
    client = tmp_path / "client.pem"
    client.write_bytes(certs.client_pem.read_bytes())
    client.chmod(0o600)
    srv_port = free_port()  # [cli] talks to [srv] of the same process
    conf = tunnels.conf(
        f"[srv]\naccept = 127.0.0.1:{srv_port}\nconnect = 127.0.0.1:{echo.port}\ncert = {key}\n"
        f"verifyChain = yes\nCAfile = {certs.ca_pem}\n"
        f"[cli]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{srv_port}\n"
        f"cert = {client}\nverifyChain = yes\nCAfile = {certs.ca_pem}\ncheckHost = localhost\n"
    )
    conf.write_text(conf.read_text().replace("debug = 6", "debug = 7"))
    t = tunnels.start(conf, impl=impl)
    t.wait_for(r"Accepting new connections")
    data = os.urandom(100_000)
    assert roundtrip(t.port("cli"), data) == data  # client cert -> mTLS server, both keys in use
    with socket.create_connection(("127.0.0.1", srv_port), timeout=10) as s:  # a failed handshake
        s.sendall(client_hello()[:60] + os.urandom(500))
        wait_closed(s, 10)
    t.signal(signal.SIGHUP)
    wait_count(t, r"Configuration successful", 2)
    # stunnel4 logs `Configuration successful` before it binds again (to a new port: accept = 0)
    wait_count(t, r"Service \[cli\] \(FD=\d+\) bound to ", 2)
    assert roundtrip(bound_ports(t, "cli")[-1], data) == data
    assert t.stop() == 0
    bad = tmp_path / "mismatch.pem"
    chain = certs.server_pem.read_bytes()
    cert_part = chain[chain.index(b"-----BEGIN CERT") :]
    bad.write_bytes(certs.ca.issue_cert("localhost").private_key_pem.bytes() + cert_part)
    bad.chmod(0o600)
    conf2 = tunnels.conf(server_body(certs, echo.port).replace(str(certs.server_pem), str(bad)))
    conf2.write_text(conf2.read_text().replace("debug = 6", "debug = 7"))
    failed = tunnels.start(conf2, impl=impl, wait=False)
    assert failed.proc.wait(20) != 0
    fragments = key_fragments(chain) + key_fragments(certs.client_pem.read_bytes())
    fragments += key_fragments(bad.read_bytes())
    for log in (t.log, failed.log):
        assert "PRIVATE KEY" not in log
        assert not [f for f in fragments if f in log]
    assert re.search(r"LOG7\[", t.log), "no debug line: was debug = 7 really on?"


def test_chroot_then_serve(
    tunnels: TunnelFactory, certs: Certs, echo: EchoServer, impl: str, tmp_path: Path
) -> None:
    """`chroot = DIR` with an empty directory (stunnel loads everything before it).  Found by this
    module: pytunnel exited 1 with a Traceback, `ModuleNotFoundError: No module named 'grp'`, as
    it imported modules after os.chroot(); the same late imports (ctypes) broke `setuid` where
    the Python installation is not readable by the new user (here /root/.pyenv, mode 0700)."""
    need_root("chroot")
    jail = tmp_path / "jail"
    jail.mkdir()
    t = tunnels.start(
        tunnels.conf(f"chroot = {jail}\n" + server_body(certs, echo.port)), impl=impl, wait=False
    )
    t.wait_for(r"Accepting new connections")
    assert "Traceback" not in t.log
    port = [int(p) for svc, _h, p in BOUND.findall(t.log) if svc == "srv"][0]
    assert tls_echo_once(port, certs.ca_pem, b"jailed") == b"jailed"
    assert Path(f"/proc/{t.proc.pid}/root").resolve() == jail
    assert t.stop() == 0
