"""Helpers for tests/test_reliability.py: /proc readings, traffic, odd backends, the figures file.

Kept apart from conftest.py (which other suites share) so the reliability checks can grow
without touching the common fixtures.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import ssl
import struct
import subprocess
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conftest import BOUND, ROOT, Tunnel, TunnelFactory, need_stunnel, pytunnel_cmd
from loopback_support import Listener, free_port

MiB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")

# ------------------------------------------------------------------ /proc


def rss_kib(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def status_field(pid: int, name: str) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of the process (stunnel4 runs a thread per connection)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def wait_fds(pid: int, target: int, timeout: float = 10.0) -> int:
    """Wait until the process holds at most ``target`` fds; return the last count."""
    deadline = time.monotonic() + timeout
    n = fd_count(pid)
    while n > target and time.monotonic() < deadline:
        time.sleep(0.05)
        n = fd_count(pid)
    return n


# ------------------------------------------------------------------ figures


class Figures:
    """Every figure the module measured, per check and implementation; dumped as JSON."""

    def __init__(self) -> None:
        self.data: dict[str, dict[str, dict[str, Any]]] = {}

    def record(self, check: str, impl: str, **values: Any) -> None:
        self.data.setdefault(check, {}).setdefault(impl, {}).update(values)
        shown = ", ".join(f"{k}={v}" for k, v in values.items())
        print(f"\n[reliability] {check} [{impl}]: {shown}")

    def dump(self, path: Path) -> None:
        path.write_text(json.dumps(self.data, indent=2, sort_keys=True) + "\n")


# ------------------------------------------------------------------ starting a tunnel with limits


def start_limited(
    tunnels: TunnelFactory,
    conf: Path,
    impl: str,
    preexec: Callable[[], None],
    extra_env: dict[str, str] | None = None,
) -> Tunnel:
    """conftest's TunnelFactory.start, plus a ``preexec_fn`` for the child (e.g. setrlimit)."""
    cmd = [need_stunnel(), str(conf)] if impl == "stunnel4" else pytunnel_cmd(str(conf))
    tunnels.count += 1
    log_path = tunnels.tmp_path / f"{impl}-{tunnels.count}.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra_env or {})
    fh = open(log_path, "wb")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=fh, stderr=subprocess.STDOUT, env=env, preexec_fn=preexec
    )
    t = Tunnel(proc=proc, log_path=log_path)
    tunnels.started.append(t)
    t.wait_for(r"Accepting new connections")
    for svc, _host, port in BOUND.findall(t.log):
        t.ports.setdefault(svc, []).append(int(port))
    return t


# ------------------------------------------------------------------ payloads

_BLOCK: bytes | None = None


def block() -> bytes:
    """16 MiB of random bytes, made once per test process."""
    global _BLOCK
    if _BLOCK is None:
        _BLOCK = os.urandom(16 * MiB)
    return _BLOCK


def rotated_digest(data: bytes, offset: int) -> bytes:
    mv = memoryview(data)
    h = hashlib.sha256(mv[offset:])
    h.update(mv[:offset])
    return h.digest()


@dataclass
class StreamResult:
    sent: int = 0
    received: int = 0
    digest_ok: bool = False
    error: str = ""
    seconds: float = 0.0


class PrefixStream(threading.Thread):
    """A paced stream through an echo chain.  What comes back must be a prefix of what was
    sent: ``outcome`` is 'intact' (all of it), 'cut' (a prefix, then EOF or reset) or 'wrong'."""

    def __init__(self, port: int, data: bytes, seconds: float) -> None:
        super().__init__(daemon=True)
        self.port, self.data, self.seconds = port, data, seconds
        self.received = 0
        self.wrong = False
        self.error = ""
        self.outcome = ""
        self.sending = threading.Event()

    def run(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
                rd = threading.Thread(target=self._read, args=(s,), daemon=True)
                rd.start()
                chunk = 32768
                pause = self.seconds / max(1, len(self.data) // chunk)
                try:
                    for i in range(0, len(self.data), chunk):
                        s.sendall(self.data[i : i + chunk])
                        self.sending.set()
                        time.sleep(pause)
                    s.shutdown(socket.SHUT_WR)
                except OSError as exc:
                    self.error = f"send: {exc!r}"
                rd.join(30)
        except OSError as exc:
            self.error = self.error or f"connect: {exc!r}"
        if self.wrong:
            self.outcome = "wrong"
        elif self.received == len(self.data):
            self.outcome = "intact"
        else:
            self.outcome = "cut"

    def _read(self, s: socket.socket) -> None:
        mv = memoryview(self.data)
        try:
            while True:
                chunk = s.recv(262144)
                if not chunk:
                    return
                if mv[self.received : self.received + len(chunk)] != chunk:
                    self.wrong = True
                self.received += len(chunk)
        except OSError as exc:
            self.error = self.error or f"recv: {exc!r}"


# ------------------------------------------------------------------ backends


def send_rotated(s: Any, offset: int, total: int) -> None:
    """Send ``total`` bytes of the block repeated, starting at ``offset``."""
    data = block()
    mv = memoryview(data)
    pos, left = offset % len(data), total
    while left:
        n = min(MiB, left, len(data) - pos)
        s.sendall(mv[pos : pos + n])
        pos = (pos + n) % len(data)
        left -= n


def rotated_sha256(offset: int, total: int) -> bytes:
    data = block()
    mv = memoryview(data)
    h = hashlib.sha256()
    pos, left = offset % len(data), total
    while left:
        n = min(left, len(data) - pos)
        h.update(mv[pos : pos + n])
        pos = (pos + n) % len(data)
        left -= n
    return h.digest()


class Bulk(Listener):
    """The bulk backend.  A connection starts with one command byte:

    * ``U``: read up to EOF, answer SHA-256 + byte count of what came, end.
    * ``D`` + 8-byte offset: send :func:`block` rotated by the offset, end, then read to EOF.
    * ``H`` + 8-byte size: half-close check: read up to EOF, then answer SHA-256 + count and
      ``size`` bytes of the block, end.
    """

    def __init__(self, cert: Path | None = None) -> None:
        self.uploaded = 0
        super().__init__(cert)

    def handle(self, s: Any) -> None:
        cmd = s.recv(1)
        arg = 0
        if cmd in (b"D", b"H"):
            raw = b""
            while len(raw) < 8:
                more = s.recv(8 - len(raw))
                if not more:
                    return
                raw += more
            arg = int.from_bytes(raw, "big")
        if cmd in (b"U", b"H"):
            h = hashlib.sha256()
            n = 0
            while chunk := s.recv(262144):
                h.update(chunk)
                n += len(chunk)
            self.uploaded += n
            s.sendall(h.digest() + n.to_bytes(8, "big"))
            if cmd == b"H":
                send_rotated(s, 0, arg)
        elif cmd == b"D":
            send_rotated(s, arg, len(block()))
            while s.recv(65536):
                pass
        self.end(s)


class StalledSink(Listener):
    """Reads nothing until ``go`` is set, then hashes everything up to EOF and answers with
    the SHA-256 and the byte count."""

    def __init__(self, cert: Path | None = None) -> None:
        self.go = threading.Event()
        self.received = 0
        super().__init__(cert)

    def handle(self, s: Any) -> None:
        self.go.wait(120)
        h = hashlib.sha256()
        while chunk := s.recv(262144):
            h.update(chunk)
            self.received += len(chunk)
        s.sendall(h.digest() + self.received.to_bytes(8, "big"))
        self.end(s)


class Echo(Listener):
    """Echo until EOF, then end.  ``reset_after``: after that many bytes, reset the TCP connection
    instead (SO_LINGER 0) -- an upstream that dies mid-stream."""

    def __init__(self, cert: Path | None = None, reset_after: int | None = None) -> None:
        self.reset_after = reset_after
        super().__init__(cert)

    def handle(self, s: Any) -> None:
        echoed = 0
        while data := s.recv(65536):
            s.sendall(data)
            echoed += len(data)
            if self.reset_after is not None and echoed >= self.reset_after:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return
        self.end(s)


class OldTls(Listener):
    """A TLS server that speaks nothing above ``max_version`` (legacy ciphers allowed)."""

    def __init__(self, cert: Path, max_version: ssl.TLSVersion) -> None:
        super().__init__(cert)
        assert self.ctx is not None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.ctx.minimum_version = ssl.TLSVersion.TLSv1
            self.ctx.maximum_version = max_version
        self.ctx.set_ciphers("DEFAULT:@SECLEVEL=0")

    def handle(self, s: Any) -> None:
        while data := s.recv(65536):
            s.sendall(data)


class Silent(Listener):
    """Accepts TCP and never sends a byte (a black hole for a TLS client); holds the socket."""

    def __init__(self) -> None:
        self.held: list[socket.socket] = []
        super().__init__()

    def _run(self, conn: socket.socket) -> None:
        self.held.append(conn)

    def close(self) -> None:
        super().close()
        for c in self.held:
            c.close()


# ------------------------------------------------------------------ client helpers


def upload(port: int, offset: int, timeout: float = 120.0) -> StreamResult:
    """Send ``U`` + the block rotated by ``offset``, half-close; the backend's digest must match."""
    res = StreamResult()
    data = block()
    mv = memoryview(data)
    t0 = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"U")
            for part in (mv[offset:], mv[:offset]):
                for i in range(0, len(part), MiB):
                    s.sendall(part[i : i + MiB])
                    res.sent += len(part[i : i + MiB])
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        if len(reply) == 40:
            res.received = int.from_bytes(reply[32:], "big")
            res.digest_ok = res.received == len(data) and reply[:32] == rotated_digest(data, offset)
        else:
            res.error = f"reply of {len(reply)} bytes"
    except OSError as exc:
        res.error = repr(exc)
    res.seconds = time.monotonic() - t0
    return res


def download(port: int, offset: int, timeout: float = 120.0) -> StreamResult:
    """Ask for the block rotated by ``offset``, half-close, hash what comes back up to EOF."""
    res = StreamResult()
    data = block()
    h = hashlib.sha256()
    buf = bytearray(262144)
    t0 = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"D" + offset.to_bytes(8, "big"))
            s.shutdown(socket.SHUT_WR)
            while n := s.recv_into(buf):
                h.update(memoryview(buf)[:n])
                res.received += n
        res.sent = len(data)  # what the backend sent
        res.digest_ok = res.received == len(data) and h.digest() == rotated_digest(data, offset)
    except OSError as exc:
        res.error = repr(exc)
        res.sent = len(data)
    res.seconds = time.monotonic() - t0
    return res


def half_close(port: int, size: int, reply: int, timeout: float = 120.0) -> StreamResult:
    """Send ``H`` + ``size`` bytes, half-close, then read the digest and a ``reply``-byte answer
    that the backend starts only after our EOF."""
    res = StreamResult(sent=32 + 8 + reply)
    got = bytearray()
    t0 = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"H" + reply.to_bytes(8, "big"))
            send_rotated(s, 12345, size)
            s.shutdown(socket.SHUT_WR)
            buf = bytearray(262144)
            while n := s.recv_into(buf):
                got.extend(memoryview(buf)[:n])
    except OSError as exc:
        res.error = repr(exc)
    res.received = len(got)
    expect_head = rotated_sha256(12345, size) + size.to_bytes(8, "big")
    res.digest_ok = (
        len(got) == res.sent
        and bytes(got[:40]) == expect_head
        and hashlib.sha256(got[40:]).digest() == rotated_sha256(0, reply)
    )
    res.seconds = time.monotonic() - t0
    return res


def short_roundtrip(port: int, payload: bytes, timeout: float = 10.0) -> bool:
    """One short connection: send, half-close, read the echo to EOF (no thread: it all fits
    in the socket buffers)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    return got == payload


def closed_port() -> int:
    """A loopback port nobody listens on (connect() is refused)."""
    return free_port()


def conn_id_of(log: str, service: str, local_port: int) -> str | None:
    """The log id of the connection the tunnel accepted from our ``local_port``."""
    m = re.search(
        rf"LOG\d\[([^\]]+)\]: Service \[{re.escape(service)}\] accepted connection from "
        rf"(?:127\.0\.0\.1|\[?::ffff:127\.0\.0\.1\]?):{local_port}$",
        log,
        re.M,
    )
    return m.group(1) if m else None


def lines_of(log: str, conn_id: str, max_level: int = 7) -> list[str]:
    out = []
    for m in re.finditer(rf"^.*LOG(\d)\[{re.escape(conn_id)}\]: (.*)$", log, re.M):
        if int(m.group(1)) <= max_level:
            out.append(f"LOG{m.group(1)}: {m.group(2)}")
    return out


def app_state(s: socket.socket) -> str:
    """Without waiting: 'served' (its 1-byte echo came back), 'eof', 'reset' or 'waiting'."""
    s.setblocking(False)
    try:
        data = s.recv(1)
    except BlockingIOError:
        return "waiting"
    except ConnectionResetError:
        return "reset"
    finally:
        s.setblocking(True)
    return "served" if data else "eof"


def settle_states(
    socks: list[socket.socket],
    enough: Callable[[list[str]], bool],
    quiet: float = 1.0,
    timeout: float = 30.0,
    close_done: bool = False,
    initial: list[str] | None = None,
) -> list[str]:
    """Poll every client's :func:`app_state` until ``enough(states)`` holds and no state has
    changed for ``quiet`` seconds, or ``timeout`` passes; return the states.  'served', 'eof' and
    'reset' are final (the echoed byte is read once); 'waiting' ones are polled again.
    ``close_done``: close each client as soon as its state is final (frees the tunnel's fds).
    ``initial``: states already known (a client reset before its connect() returned)."""
    states = list(initial) if initial is not None else ["waiting"] * len(socks)
    deadline = time.monotonic() + timeout
    changed = time.monotonic()
    while True:
        for i, s in enumerate(socks):
            if states[i] == "waiting":
                states[i] = app_state(s)
                if states[i] != "waiting":
                    changed = time.monotonic()
                    if close_done:
                        s.close()
        now = time.monotonic()
        if (enough(states) and now - changed >= quiet) or now > deadline:
            return states
        time.sleep(0.05)


def settle_value(read: Callable[[], int], quiet: float = 1.0, timeout: float = 30.0) -> int:
    """Poll ``read()`` until it has not changed for ``quiet`` seconds (or ``timeout``); return it."""
    deadline = time.monotonic() + timeout
    last, since = read(), time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        time.sleep(0.05)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
    return last


def rst_close(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def wait_closed(sock: socket.socket, timeout: float) -> str:
    """Read until the peer ends the connection: 'eof', 'reset' or 'open' (still open)."""
    sock.settimeout(timeout)
    deadline = time.monotonic() + timeout
    try:
        while True:
            if time.monotonic() > deadline:
                return "open"
            if not sock.recv(65536):
                return "eof"
    except ConnectionResetError:
        return "reset"
    except TimeoutError:
        return "open"


def client_hello(max_version: Any = None) -> bytes:
    """A real ClientHello (optionally TLS 1.0 only), made by an SSLObject nobody answers."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if max_version is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = max_version
        ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    obj = ctx.wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(), server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        obj.do_handshake()
    return out.read()


def tls_echo_once(port: int, ca: Path, data: bytes, timeout: float = 15.0) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as s,
    ):
        s.sendall(data)
        out = b""
        while len(out) < len(data):
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        with contextlib.suppress(OSError, ssl.SSLError, ValueError):
            s.unwrap()
        return out


def key_fragments(pem: bytes) -> list[str]:
    """Slices of a PEM private key's base64 body: none may ever appear in a log."""
    m = re.search(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----\n(.+?)-----END", pem, re.S)
    assert m, "no private key in the PEM"
    lines = [ln for ln in m.group(1).decode().split("\n") if len(ln) >= 40]
    return [ln[8:40] for ln in lines]
