"""Side-by-side benchmark: the same generated stunnel.conf under two command templates.

    python bench/run.py                 # full run (~10 minutes with the default --reps 3)
    python bench/run.py --quick         # seconds-long smoke: the harness works, bytes match
    python bench/run.py --only rtt,server --reps 1     # a subset (handy for profiling)
    python bench/run.py --a 'stunnel4 {conf}' --b 'pytunnel run {conf}' --json out.json

Topologies (loopback, ports chosen at run time):
  client: load -> tunnel under test (client = yes) -> reference TLS server (stunnel4) -> backend
  server: load -> reference TLS client (stunnel4) -> tunnel under test (cert/key) -> backend
The backend (one uvloop process: a SHA-256 sink, a 1-byte probe answer and a 64-byte echo) and
the reference peers run in their own processes; the load generator is this process.  There are
two reference peers per topology (the client-mode tunnel gets two services, one per reference
server) so that the idle-connection ramp is spread over them: stunnel4 caps its clients at
125/256 of RLIMIT_NOFILE.  Every run starts fresh processes (backend included), the systems in
A B B A A B ... order; every figure is reported as B / A; every bulk transfer is checked with SHA-256
and every echo byte-for-byte, so a fast wrong tunnel cannot win.  CPU seconds come from /proc
for each process tree (tunnel, reference peers, backend), from getrusage for the load generator,
and the rest of the machine's busy time (/proc/stat) is shown as "other".

Metric groups for --only: startup, bulk, conn, rtt, idle, churn; add client or server to restrict
the topology (e.g. --only idle,server).  "startup" also starts a one-service client
configuration (verifyChain, CAfile) --startups times per run: the median time to `Accepting new
connections`, the CPU used by then (load-insensitive) and the RSS at rest half a second later.
"churn" (client topology) runs short connections and reports the RSS growth between two marks.
"""

from __future__ import annotations

import argparse
import compileall
import hashlib
import json
import os
import re
import resource
import selectors
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BOUND = re.compile(r"Service \[([^\]]+)\] \(FD=\d+\) bound to .+:(\d+)$", re.M)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
GROUPS = ("startup", "bulk", "conn", "rtt", "idle", "churn")
TOPOLOGIES = ("client", "server")
PARTS = ("tunnel", "reference", "backend", "load", "other")
REFS = 2  # reference peers per topology (see the module docstring)
CHUNK = 256 << 10  # bulk write size
GIVE_UP = 100  # consecutive failed idle connects after which the rest of the ramp counts as failed
EMPTY_REPLY = f"0 {hashlib.sha256().hexdigest()}".encode()  # the sink's answer to a stream without data

# ---------------------------------------------------------------------------- processes


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its descendants (children of any of its threads)."""
    out = [pid]
    children: list[str] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            children += (task / "children").read_text().split()
        except OSError:
            continue
    for child in children:
        out += tree_pids(int(child))
    return out


def tree_tids(pid: int) -> list[int]:
    tids: list[int] = []
    for p in tree_pids(pid):
        try:
            tids += [int(t.name) for t in Path(f"/proc/{p}/task").iterdir()]
        except OSError:
            continue
    return tids


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime, all threads
    return total


def cpu_ns(pid: int) -> int:
    """CPU time of ``pid``'s process tree in nanoseconds, every thread (schedstat: the 10 ms
    ticks of /proc/PID/stat are too coarse for a start-up of ~100 ms)."""
    total = 0
    for p in tree_pids(pid):
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                total += int(Path(f"/proc/{p}/task/{t}/schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total


def rss_kib(pid: int) -> int:
    total = 0
    for p in tree_pids(pid):
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE // 1024
        except OSError:
            continue
    return total


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all CPUs; idle and iowait excluded)."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / CLK_TCK


def self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def raise_nofile(want: int) -> tuple[int, int]:
    """Raise RLIMIT_NOFILE as far as allowed (children inherit it); returns (soft, hard)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(want, hard), max(want, hard)))
    except (ValueError, OSError):  # raising the hard limit needs CAP_SYS_RESOURCE
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


@contextmanager
def pinned(pids: list[int], cpu: int) -> Iterator[None]:
    """Every thread of every process tree in ``pids``, and this thread, on one CPU."""
    mine = os.sched_getaffinity(0)
    saved: dict[int, set[int]] = {}
    for pid in pids:
        for tid in tree_tids(pid):
            try:
                saved[tid] = os.sched_getaffinity(tid)
                os.sched_setaffinity(tid, {cpu})
            except OSError:
                continue
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, mine)
        for pid in pids:
            for tid in tree_tids(pid):
                try:
                    os.sched_setaffinity(tid, saved.get(tid, mine))
                except OSError:
                    continue


VERBOSE = False


def log(text: str) -> None:
    """Progress on stderr with --verbose."""
    if VERBOSE:
        print(f"{time.strftime('%H:%M:%S')} {text}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def probe(port: int, timeout: float = 5.0) -> bool:
    """A connection through ``port`` that gets the backend's answer to one byte."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"?")
            return s.recv(1) == b"!"
    except OSError:
        return False


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    log: Path
    ports: dict[str, int]
    started: float
    bound: float  # when all its services were logged as bound
    first: float  # when a connection through the probe port got its first echoed byte (= bound if none)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def count(self, text: str) -> int:
        return self.log.read_text(errors="replace").count(text)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def launch(template: str, conf: Path, services: int, probe_port: int | None = None) -> Proc:
    """Start ``template`` on ``conf``; return once every service is bound and, with ``probe_port``,
    a connection through that port has been answered (start-up to the first accepted connection).

    A thread watches the log for the `bound to` lines (every millisecond) while this one probes."""
    cmd = [part.replace("{conf}", str(conf)) for part in shlex.split(template)]
    log = conf.with_suffix(".log")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    bound: list[float] = []
    ports: dict[str, int] = {}
    done = threading.Event()
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        popen = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def watch() -> None:
        while not done.is_set() and popen.poll() is None:
            found = BOUND.findall(log.read_text(errors="replace"))
            if len(found) >= services:
                bound.append(time.perf_counter())
                ports.update((name, int(port)) for name, port in found)
                return
            time.sleep(0.001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    first: float | None = None
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline:
            if probe_port is not None and first is None and probe(probe_port):
                first = time.perf_counter()
            if bound and (probe_port is None or first is not None):
                watcher.join()
                return Proc(popen, log, ports, t0, bound[0], bound[0] if first is None else first)
            if popen.poll() is not None:
                raise SystemExit(f"{cmd} exited {popen.returncode}:\n{log.read_text(errors='replace')}")
            time.sleep(0.002)
        popen.kill()
        popen.wait()
        raise SystemExit(f"{cmd} did not start in time:\n{log.read_text(errors='replace')}")
    finally:
        done.set()


# ---------------------------------------------------------------------------- backend


BACKEND = r"""
from __future__ import annotations
import asyncio, hashlib
try:
    import uvloop
except ImportError:
    uvloop = None

class Backend(asyncio.Protocol):
    # The first byte picks the mode: '?' answers '!' at once (a round-trip probe) then sinks;
    # 'E' echoes everything after it; anything else sinks.  A sink answers EOF with the byte
    # count and SHA-256 of what it got (after a '?').
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.transport = transport
        self.mode = b""
        self.hash = hashlib.sha256()
        self.n = 0

    def data_received(self, data: bytes) -> None:
        if not self.mode:
            self.mode = data[:1] if data[:1] in (b"?", b"E") else b"s"
            if self.mode == b"?":
                self.transport.write(b"!")
            if self.mode != b"s":
                data = data[1:]
        if self.mode == b"E":
            if data:
                self.transport.write(data)
        else:
            self.hash.update(data)
            self.n += len(data)

    def eof_received(self) -> bool:
        if self.mode != b"E":
            self.transport.write(f"{self.n} {self.hash.hexdigest()}".encode())
        self.transport.close()
        return True

async def main() -> None:
    server = await asyncio.get_running_loop().create_server(Backend, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()

(uvloop.run if uvloop else asyncio.run)(main())
"""


@contextmanager
def backend() -> Iterator[tuple[int, int]]:
    """(port, pid) of a fresh backend."""
    popen = subprocess.Popen([sys.executable, "-c", BACKEND], stdout=subprocess.PIPE)
    assert popen.stdout is not None
    port = int(popen.stdout.readline())
    try:
        yield port, popen.pid
    finally:
        popen.kill()
        popen.wait()


# ---------------------------------------------------------------------------- configs


HEADER = "foreground = yes\nsyslog = no\npid =\ndebug = 6\n"


def write(workdir: Path, name: str, text: str) -> Path:
    path = workdir / name
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------- measurements


@dataclass
class Parts:
    """The processes whose CPU is accounted for (besides the load generator, this process)."""

    tunnel: int
    refs: list[int]
    backend: int

    def snapshot(self) -> dict[str, float]:
        return {
            "wall": time.perf_counter(),
            "tunnel": cpu_seconds(self.tunnel),
            "reference": sum(cpu_seconds(r) for r in self.refs),
            "backend": cpu_seconds(self.backend),
            "load": self_cpu(),
            "machine": machine_busy(),
        }


def usage(s0: dict[str, float], s1: dict[str, float]) -> dict[str, float]:
    """Cores busy between two snapshots, per part; "other" is the rest of the machine."""
    wall = max(s1["wall"] - s0["wall"], 1e-9)
    out = {k: (s1[k] - s0[k]) / wall for k in PARTS[:-1]}
    out["other"] = max(0.0, (s1["machine"] - s0["machine"]) / wall - sum(out.values()))
    return out


_PAYLOAD = os.urandom(CHUNK)


def bulk(port: int, per_stream: int, streams: int, parts: Parts) -> tuple[float, float, dict[str, float]]:
    """(MB/s, tunnel CPU s/GiB, cores busy) for ``streams`` parallel uploads of ``per_stream`` bytes.

    Every stream is established end to end first; the clock and the CPU counters start when all
    are; each stream's SHA-256 is checked."""
    chunks = max(1, per_stream // CHUNK)
    want = hashlib.sha256()
    for _ in range(chunks):
        want.update(_PAYLOAD)
    expected = f"{chunks * CHUNK} {want.hexdigest()}".encode()
    barrier = threading.Barrier(streams + 1, timeout=120)
    problems: list[str] = []

    def one() -> None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=120) as s:
                s.sendall(b"?")
                if s.recv(1) != b"!":
                    raise ConnectionError("no answer to the probe byte")
                barrier.wait()
                for _ in range(chunks):
                    s.sendall(_PAYLOAD)
                s.shutdown(socket.SHUT_WR)
                reply = b""
                while chunk := s.recv(256):
                    reply += chunk
                if reply != expected:
                    problems.append(f"got {reply[:80]!r}, want {expected!r}")
        except (OSError, threading.BrokenBarrierError) as exc:
            problems.append(repr(exc))
            barrier.abort()

    threads = [threading.Thread(target=one) for _ in range(streams)]
    for t in threads:
        t.start()
    with suppress(threading.BrokenBarrierError):
        barrier.wait()
    s0 = parts.snapshot()
    for t in threads:
        t.join()
    s1 = parts.snapshot()
    if problems:
        raise SystemExit(f"bulk through port {port}: {len(problems)} stream(s) failed: {problems[:3]}")
    total = streams * chunks * CHUNK
    dt = s1["wall"] - s0["wall"]
    return total / dt / 1e6, (s1["tunnel"] - s0["tunnel"]) / (total / (1 << 30)), usage(s0, s1)


def new_connections(port: int, count: int) -> float:
    """Sequential connections per second, each carrying one byte and its checked answer."""
    t0 = time.perf_counter()
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"x")
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(256):
                reply += chunk
            if not reply.startswith(b"1 "):
                raise SystemExit(f"new connection through port {port}: got {reply!r}")
    return count / (time.perf_counter() - t0)


def churn(port: int, marks: tuple[int, int], pid: int) -> float:
    """RSS growth (MiB) of ``pid``'s tree from the first to the second mark of short connections
    (4 sequential openers, each connection carrying one checked byte)."""

    def some(count: int) -> None:
        with ThreadPoolExecutor(4) as pool:
            for rate in pool.map(lambda n: new_connections(port, n), [count // 4] * 4):
                assert rate > 0

    some(marks[0])
    time.sleep(0.2)
    rss0 = rss_kib(pid)
    some(marks[1] - marks[0])
    time.sleep(0.2)
    return (rss_kib(pid) - rss0) / 1024


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def startups(
    template: str, conf: Path, count: int
) -> tuple[list[float], list[float], list[float], dict[str, float]]:
    """Start ``template`` on ``conf`` ``count`` times: wall ms to `Accepting new connections`, CPU ms
    of its process tree at that moment, RSS MiB at rest (0.5 s later); and the cores busy
    meanwhile (the tunnels' whole lives, reaped, as "tunnel"; the rest of the machine as "other")."""
    snap0 = (time.perf_counter(), children_cpu(), self_cpu(), machine_busy())
    cmd = [part.replace("{conf}", str(conf)) for part in shlex.split(template)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    walls: list[float] = []
    cpus: list[float] = []
    rss: list[float] = []
    for _ in range(count):
        t0 = time.perf_counter()
        popen = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
        assert popen.stdout is not None
        out = b""
        with selectors.DefaultSelector() as sel:
            sel.register(popen.stdout, selectors.EVENT_READ)
            while b"Accepting new connections" not in out:
                if not sel.select(30) or not (chunk := os.read(popen.stdout.fileno(), 65536)):
                    popen.kill()
                    raise SystemExit(f"{cmd} did not start:\n{out.decode(errors='replace')}")
                out += chunk
        walls.append((time.perf_counter() - t0) * 1000)
        cpus.append(cpu_ns(popen.pid) / 1e6 or cpu_seconds(popen.pid) * 1000)  # no schedstat: ticks
        time.sleep(0.5)
        rss.append(rss_kib(popen.pid) / 1024)
        popen.send_signal(signal.SIGTERM)
        popen.communicate(timeout=10)
    wall, tunnel, load, machine = (
        b - a
        for a, b in zip(snap0, (time.perf_counter(), children_cpu(), self_cpu(), machine_busy()), strict=True)
    )
    cores = {"tunnel": tunnel / wall, "reference": 0.0, "backend": 0.0, "load": load / wall}
    cores["other"] = max(0.0, machine / wall - cores["tunnel"] - cores["load"])
    return walls, cpus, rss, cores


def round_trips(port: int, iterations: int, warmup: int) -> list[float]:
    """Microseconds per 64-byte ping-pong over one connection (after ``warmup`` of them)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.sendall(b"E")
        buf = bytearray(64)
        view = memoryview(buf)

        def once(msg: bytes) -> None:
            s.sendall(msg)
            got = 0
            while got < 64:
                n = s.recv_into(view[got:])
                if not n:
                    raise SystemExit(f"echo through port {port}: connection closed")
                got += n
            if buf != msg:
                raise SystemExit(f"echo through port {port}: bytes differ")

        msgs = [os.urandom(64) for _ in range(16)]
        for i in range(warmup):
            once(msgs[i % 16])
        times: list[float] = []
        clock = time.perf_counter_ns
        for i in range(iterations):
            msg = msgs[i % 16]
            t = clock()
            once(msg)
            times.append((clock() - t) / 1000)
    return times


def percentile(xs: list[float], q: float) -> float:
    ordered = sorted(xs)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Idle:
    marks: dict[int, tuple[int, int]]  # connection attempts -> (connections held, tunnel RSS KiB)
    opening: dict[int, float]  # connection attempts -> seconds spent opening up to there
    failed: int  # connects that failed, were reset or got no answer (and skipped after GIVE_UP)
    dead: int  # held connections that did not answer at the end
    usage: dict[str, float]


def idle(ports: list[int], parts: Parts, marks: list[int], openers: int, settle: float) -> Idle:
    """Open idle connections (spread over ``ports``, ``openers`` in parallel, each answered end to
    end) up to each number of attempts in ``marks`` and read the tunnel's RSS there; finally check
    that every held connection still works (half-close, expect the sink's answer) and close them."""
    socks: list[socket.socket] = []
    lock = threading.Lock()
    state = {"next": 0, "failed": 0, "streak": 0}
    result: dict[int, tuple[int, int]] = {}

    def opener(limit: int) -> None:
        while True:
            with lock:
                if state["next"] >= limit:
                    return
                i = state["next"]
                state["next"] += 1
                if state["streak"] >= GIVE_UP:
                    state["failed"] += 1
                    continue
            ok = False
            try:
                s = socket.create_connection(("127.0.0.1", ports[i % len(ports)]), timeout=10)
                try:
                    s.sendall(b"?")
                    ok = s.recv(1) == b"!"
                except OSError:
                    pass
                if not ok:
                    s.close()
            except OSError:
                pass
            with lock:
                if ok:
                    socks.append(s)
                    state["streak"] = 0
                else:
                    state["failed"] += 1
                    state["streak"] += 1

    opening: dict[int, float] = {}
    spent = 0.0
    s0 = parts.snapshot()
    for mark in marks:
        t0 = time.perf_counter()
        threads = [threading.Thread(target=opener, args=(mark,)) for _ in range(openers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        spent += time.perf_counter() - t0
        opening[mark] = spent
        log(f"idle: {mark} attempts, {len(socks)} held, {state['failed']} failed")
        time.sleep(settle)
        result[mark] = (len(socks), rss_kib(parts.tunnel))
    s1 = parts.snapshot()
    dead = close_checked(socks)
    log(f"idle: closed, {dead} dead")
    return Idle(result, opening, state["failed"], dead, usage(s0, s1))


def close_checked(socks: list[socket.socket], timeout: float = 60) -> int:
    """Half-close every socket, expect the backend's answer to an empty stream; the number that fail."""
    sel = selectors.DefaultSelector()
    got: dict[socket.socket, bytes] = {}
    dead = 0
    for s in socks:
        try:
            s.setblocking(False)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            dead += 1
            s.close()
            continue
        got[s] = b""
        sel.register(s, selectors.EVENT_READ)
    pending = len(got)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(1.0):
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                data = sock.recv(256)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            if data:
                got[sock] += data
                continue
            sel.unregister(sock)
            pending -= 1
    for s, reply in got.items():
        if reply != EMPTY_REPLY:
            dead += 1
        s.close()
    sel.close()
    return dead


# ---------------------------------------------------------------------------- the run


@dataclass
class Result:
    metric: str
    unit: str
    a: list[float]
    b: list[float]
    better: str  # "higher", "lower" or "" (information)
    group: str = "main"  # "main", "cpu" (cores busy during a measurement) or "check"
    part: str = ""  # for "cpu": tunnel, reference, backend, load or other

    def ratio(self) -> float | None:
        a, b = statistics.median(self.a), statistics.median(self.b)
        return b / a if a else None


@dataclass
class Plan:
    """What to run and how big, resolved from the command line."""

    groups: set[str]
    topologies: set[str]
    reps: int
    size: int  # bytes per bulk measurement (split over the streams in the multi-stream one)
    streams: int
    conns: int
    rtt: int
    warmup: int
    idle: list[int]  # attempts at which RSS is read: [slope low, slope high, top]
    openers: int
    startups: int  # start-ups timed per run (median reported)
    churn: tuple[int, int]  # short client connections at which RSS is read
    cpu: int  # the CPU every process is pinned to for round trips
    strict: bool  # any error fails the run (--quick)


@dataclass
class Recorder:
    results: dict[tuple[str, str, str], Result] = field(default_factory=dict)

    def add(
        self,
        system: str,
        metric: str,
        unit: str,
        value: float,
        better: str,
        group: str = "main",
        part: str = "",
    ) -> None:
        res = self.results.setdefault(
            (group, metric, part), Result(metric, unit, [], [], better, group, part)
        )
        (res.a if system == "a" else res.b).append(value)

    def cpu(self, system: str, label: str, cores: dict[str, float]) -> None:
        for part in PARTS:
            self.add(system, label, "cores", cores[part], "", "cpu", part)


def make_cert(workdir: Path) -> tuple[Path, Path]:
    import trustme

    ca = trustme.CA()
    path = workdir / "server.pem"
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(path))
    ca.cert_pem.write_to_path(str(workdir / "ca.pem"))
    return path, workdir / "ca.pem"


def measure(
    plan: Plan,
    rec: Recorder,
    system: str,
    topo: str,
    tunnel: Proc,
    refs: list[Proc],
    ports: list[int],
    bpid: int,
) -> None:
    """Every selected measurement through a running tunnel; ``ports`` are the load's entry points."""
    parts = Parts(tunnel.pid, [r.pid for r in refs], bpid)
    port = ports[0]

    def add(metric: str, unit: str, value: float, better: str, group: str = "main") -> None:
        log(f"  {metric}: {fmt(value)} {unit}")
        rec.add(system, metric, unit, value, better, group)

    if "startup" in plan.groups:
        add(f"{topo} start-up to bound", "ms", (tunnel.bound - tunnel.started) * 1000, "lower")
        add(f"{topo} start-up to first connection", "ms", (tunnel.first - tunnel.started) * 1000, "lower")
        add(f"{topo} RSS after start-up", "MiB", rss_kib(tunnel.pid) / 1024, "lower")
    if "bulk" in plan.groups:
        for streams in (1, plan.streams):
            label = f"{topo} bulk {streams} stream{'s' * (streams > 1)}"
            mbps, per_gib, cores = bulk(port, plan.size // streams, streams, parts)
            add(label, "MB/s", mbps, "higher")
            add(f"{topo} CPU per GiB, {streams} stream{'s' * (streams > 1)}", "s", per_gib, "lower")
            rec.cpu(system, label, cores)
    if "conn" in plan.groups:
        reused0 = sum(r.count("previous session reused") for r in refs)
        new0 = sum(r.count("new session negotiated") for r in refs)
        s0 = parts.snapshot()
        rate = new_connections(port, plan.conns)
        s1 = parts.snapshot()
        time.sleep(0.1)  # let the reference peers' logs catch up
        reused = sum(r.count("previous session reused") for r in refs) - reused0
        new = sum(r.count("new session negotiated") for r in refs) - new0
        label = f"{topo} new conn/s (sequential, {'resumption on' if topo == 'client' else 'full handshake'})"
        add(label, "conn/s", rate, "higher")
        rec.cpu(system, label, usage(s0, s1))
        cpu_us = (s1["tunnel"] - s0["tunnel"]) / plan.conns * 1e6
        add(f"{topo} tunnel CPU per new conn (sequential)", "µs", cpu_us, "lower")
        if reused + new:
            add(f"{topo} new conn/s: handshakes resumed", "%", 100 * reused / (reused + new), "", "check")
    if "rtt" in plan.groups:
        with pinned([tunnel.pid, bpid, *(r.pid for r in refs)], plan.cpu):
            s0 = parts.snapshot()
            times = round_trips(port, plan.rtt, plan.warmup)
            s1 = parts.snapshot()
        add(f"{topo} 64 B round trip p50, pinned", "µs", statistics.median(times), "lower")
        add(f"{topo} 64 B round trip p99, pinned", "µs", percentile(times, 0.99), "lower")
        rec.cpu(system, f"{topo} 64 B round trips, pinned", usage(s0, s1))
    if "churn" in plan.groups and topo == "client":
        low, high = plan.churn
        add(
            f"{topo} RSS growth {low} -> {high} short conns",
            "MiB",
            churn(port, plan.churn, tunnel.pid),
            "lower",
        )
    if "idle" in plan.groups:
        low, high, top = plan.idle
        res = idle(ports, parts, plan.idle, plan.openers, 0.1 if plan.strict else 0.5)
        (held_low, rss_low), (held_high, rss_high) = res.marks[low], res.marks[high]
        held_top, rss_top = res.marks[top]
        errors = res.failed + res.dead
        rate = held_high / res.opening[high]
        add(f"{topo} new conn/s ({plan.openers} parallel, held open, to {high})", "conn/s", rate, "higher")
        if held_high > held_low:
            slope = (rss_high - rss_low) / (held_high - held_low)
            add(f"{topo} idle RSS per conn ({low}-{high})", "KiB", slope, "lower")
        add(f"{topo} RSS at {top} idle", "MiB", rss_top / 1024, "lower")
        add(f"{topo} errors at {top} idle", "conns", errors, "lower")
        add(f"{topo} idle connections held at {top}", "conns", held_top, "", "check")
        rec.cpu(system, f"{topo} idle ramp to {top}", res.usage)
        if errors and plan.strict:
            raise SystemExit(f"{topo} idle: {res.failed} connect(s) failed, {res.dead} died (of {top})")


def startup(plan: Plan, rec: Recorder, system: str, template: str, conf: Path, verify: str) -> None:
    """The start-up figures of one run: one client service verifying its upstream."""
    conf.write_text(f"{HEADER}[cli]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\n{verify}")
    walls, cpus, rss, cores = startups(template, conf, plan.startups)
    n = plan.startups
    rec.cpu(system, f"start-ups ({n})", cores)
    for metric, unit, xs in (
        (f"start-up to accepting, median of {n}", "ms", walls),
        (f"start-up CPU to accepting, median of {n}", "ms", cpus),
        (f"RSS at rest after start-up, median of {n}", "MiB", rss),
    ):
        log(f"  {metric}: {fmt(statistics.median(xs))} {unit}")
        rec.add(system, metric, unit, statistics.median(xs), "lower")


def run(plan: Plan, args: argparse.Namespace) -> list[Result]:
    workdir = Path(tempfile.mkdtemp(prefix="pytunnel-bench-"))
    cert, ca = make_cert(workdir)
    # both systems verify the upstream (so `pytunnel run`'s secure default is compared fairly)
    verify = f"verifyChain = yes\nCAfile = {ca}\ncheckHost = localhost\n"
    rec = Recorder()
    order = (["a", "b", "b", "a"] * plan.reps)[: 2 * plan.reps]  # A B B A A B ...
    try:
        for i, system in enumerate(order):
            template = args.a if system == "a" else args.b
            if "startup" in plan.groups and "client" in plan.topologies:
                startup(plan, rec, system, template, workdir / f"startup-{i}.conf", verify)
            for topo in TOPOLOGIES:
                if topo not in plan.topologies:
                    continue
                log(f"run {i + 1}/{len(order)}: {system.upper()} {topo}")
                with ExitStack() as stack:
                    bport, bpid = stack.enter_context(backend())

                    def start(
                        template: str, conf: Path, services: int, probe_port: int | None = None
                    ) -> Proc:
                        proc = launch(template, conf, services, probe_port)
                        stack.callback(proc.stop)
                        return proc

                    if topo == "client":
                        # load -> tunnel (client, two services) -> two reference TLS servers -> backend
                        ref = f"{HEADER}[refsrv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{bport}\ncert = {cert}\n"
                        refs = [
                            start(args.reference, write(workdir, f"refsrv-{i}-{k}.conf", ref), 1)
                            for k in range(REFS)
                        ]
                        ports = [free_port() for _ in range(REFS)]
                        conf = "".join(
                            f"[cli{k + 1}]\nclient = yes\naccept = 127.0.0.1:{ports[k]}\n"
                            f"connect = 127.0.0.1:{refs[k].ports['refsrv']}\n{verify}"
                            for k in range(REFS)
                        )
                        services = REFS
                    else:
                        # load -> two reference TLS clients (no resumption) -> tunnel (server) -> backend
                        port = free_port()
                        ref = (
                            f"{HEADER}[refcli]\nclient = yes\naccept = 127.0.0.1:0\n"
                            f"connect = 127.0.0.1:{port}\nsessionResume = no\n"
                        )
                        refs = [
                            start(args.reference, write(workdir, f"refcli-{i}-{k}.conf", ref), 1)
                            for k in range(REFS)
                        ]
                        ports = [r.ports["refcli"] for r in refs]
                        conf = (
                            f"[srv]\naccept = 127.0.0.1:{port}\nconnect = 127.0.0.1:{bport}\ncert = {cert}\n"
                        )
                        services = 1
                    conf_path = write(workdir, f"{topo}-{i}-{system}.conf", HEADER + conf)
                    tunnel = start(template, conf_path, services, ports[0])
                    measure(plan, rec, system, topo, tunnel, refs, ports, bpid)
    except BaseException:
        print(f"bench: configurations and logs kept in {workdir}", file=sys.stderr)
        raise
    shutil.rmtree(workdir, ignore_errors=True)
    return list(rec.results.values())


# ---------------------------------------------------------------------------- report


def fmt(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 1000 or x == int(x) else f"{x:.1f}" if abs(x) >= 10 else f"{x:.2f}"


def report(results: list[Result], args: argparse.Namespace, plan: Plan, nofile: tuple[int, int]) -> str:
    main = [r for r in results if r.group == "main"]
    runs = max((len(r.a) for r in results), default=0)
    lines = [
        f"A = `{args.a}`, B = `{args.b}`; median (min-max) over {runs} run(s) each in A B B A ... order; "
        f"{plan.size >> 20} MiB per bulk measurement, {plan.conns} sequential connections, "
        f"{plan.rtt} round trips on CPU {plan.cpu}, idle ramp {'/'.join(map(str, plan.idle))} "
        f"({plan.openers} openers); RLIMIT_NOFILE {nofile[0]}; {os.cpu_count()} CPUs",
        "",
        "| metric | A | B | B / A | better |",
        "|---|---|---|---|---|",
    ]

    def cell(xs: list[float], unit: str) -> str:
        if not xs:
            return "-"
        if len(xs) == 1:
            return f"{fmt(xs[0])} {unit}"
        return f"{fmt(statistics.median(xs))} ({fmt(min(xs))}-{fmt(max(xs))}) {unit}"

    for r in main:
        ratio = r.ratio() if r.a and r.b else None
        lines.append(
            f"| {r.metric} | {cell(r.a, r.unit)} | {cell(r.b, r.unit)} | "
            f"{'-' if ratio is None else f'{ratio:.2f}'} | {r.better} |"
        )
    checks = [r for r in results if r.group == "check"]
    if checks:
        lines += ["", "| check | A | B |", "|---|---|---|"]
        lines += [f"| {r.metric} | {cell(r.a, r.unit)} | {cell(r.b, r.unit)} |" for r in checks]
    cpu: dict[str, dict[str, Result]] = {}
    for r in results:
        if r.group == "cpu":
            cpu.setdefault(r.metric, {})[r.part] = r
    if cpu:
        lines += [
            "",
            "CPU busy during each measurement, median cores (tunnel / reference peers / backend / load "
            f"generator / rest of the machine), of {os.cpu_count()}:",
            "",
            "| measurement | A | B |",
            "|---|---|---|",
        ]
        warnings: list[str] = []
        for label, parts in cpu.items():
            cells = []
            for side in ("a", "b"):
                values = {p: getattr(parts[p], side) for p in PARTS}
                med = {p: statistics.median(xs) if xs else 0.0 for p, xs in values.items()}
                cells.append(" / ".join(f"{med[p]:.2f}" for p in PARTS))
                for p in ("reference", "backend", "load"):
                    if med[p] >= 0.9:
                        warnings.append(
                            f"{label} ({side.upper()}): {p} busy {med[p]:.2f} cores: may be the bottleneck"
                        )
                if med["other"] >= 0.5:
                    warnings.append(
                        f"{label} ({side.upper()}): other work on the machine took {med['other']:.2f} cores"
                    )
            lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
        if warnings:
            lines += ["", *(f"* {w}" for w in warnings)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    stunnel = shutil.which("stunnel4") or shutil.which("stunnel") or "stunnel4"
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--a", default=f"{stunnel} {{conf}}", help="command template A (default: stunnel4)")
    parser.add_argument("--b", default=f"{sys.executable} -m tunnel run {{conf}}", help="command template B")
    parser.add_argument("--reference", default=f"{stunnel} {{conf}}", help="the reference TLS peers")
    parser.add_argument(
        "--reps", type=int, help="runs of each system, in A B B A A B ... order (default 3, quick 1)"
    )
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run; asserts no speed")
    parser.add_argument(
        "--only", default="", help=f"comma-separated subset of {', '.join(GROUPS + TOPOLOGIES)}"
    )
    parser.add_argument("--size", type=int, help="MiB per bulk measurement (default 256, quick 8)")
    parser.add_argument("--streams", type=int, default=64, help="connections in the multi-stream bulk (64)")
    parser.add_argument("--conns", type=int, help="sequential new connections (default 500, quick 30)")
    parser.add_argument("--rtt", type=int, help="64-byte round trips timed (default 5000, quick 300)")
    parser.add_argument(
        "--idle", type=int, help="idle connections at the top of the ramp (default 10000, quick 200)"
    )
    parser.add_argument(
        "--idle-slope", help="LOW,HIGH idle connections for the RSS slope (default 1000,5000)"
    )
    parser.add_argument("--startups", type=int, help="start-ups timed per run (default 10, quick 3)")
    parser.add_argument(
        "--churn", help="LOW,HIGH short client connections for the RSS growth (default 2500,20000)"
    )
    parser.add_argument("--openers", type=int, default=16, help="parallel connects in the idle ramp (16)")
    parser.add_argument(
        "--cpu", type=int, default=0, help="the CPU every process is pinned to for round trips"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="progress and phase times on stderr")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args(argv)
    global VERBOSE
    VERBOSE = args.verbose

    only = {x.strip() for x in args.only.split(",") if x.strip()}
    if unknown := only - set(GROUPS) - set(TOPOLOGIES):
        parser.error(
            f"--only: unknown {', '.join(sorted(unknown))} (choose from {', '.join(GROUPS + TOPOLOGIES)})"
        )
    q = args.quick
    top = args.idle or (200 if q else 10000)
    if args.idle_slope:
        low, high = (int(x) for x in args.idle_slope.split(","))
    else:
        low, high = (top // 4, 3 * top // 4) if q else (min(1000, top // 4), min(5000, top // 2))
    if not 0 < low < high <= top:
        parser.error("need 0 < slope LOW < slope HIGH <= --idle")
    churn_marks = [int(x) for x in (args.churn or ("100,400" if q else "2500,20000")).split(",")]
    if len(churn_marks) != 2 or not 0 < churn_marks[0] < churn_marks[1]:
        parser.error("--churn: need 0 < LOW < HIGH")
    if args.cpu not in os.sched_getaffinity(0):
        parser.error(f"--cpu {args.cpu} is not available to this process")
    plan = Plan(
        groups=only & set(GROUPS) or set(GROUPS),
        topologies=only & set(TOPOLOGIES) or set(TOPOLOGIES),
        reps=args.reps or (1 if q else 3),
        size=(args.size or (8 if q else 256)) << 20,
        streams=args.streams,
        conns=args.conns or (30 if q else 500),
        rtt=args.rtt or (300 if q else 5000),
        warmup=50 if q else 500,
        idle=[low, high, top],
        openers=args.openers,
        startups=args.startups or (3 if q else 10),
        churn=(churn_marks[0], churn_marks[1]),
        cpu=args.cpu,
        strict=q,
    )
    # an installed package has its bytecode compiled: so must this tree (PYTHONDONTWRITEBYTECODE
    # would otherwise make every start-up compile pytunnel's modules, +40-50 ms)
    compileall.compile_dir(ROOT / "tunnel", quiet=1)
    nofile = raise_nofile(2 * top + 1000)
    t0 = time.monotonic()
    results = run(plan, args)
    print(report(results, args, plan, nofile))
    print(f"\nwall time {time.monotonic() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
