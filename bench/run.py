"""Side-by-side benchmark: the same generated stunnel.conf under two command templates.

    python bench/run.py                 # full run (minutes)
    python bench/run.py --quick         # seconds-long smoke: the harness works, bytes match
    python bench/run.py --a 'stunnel4 {conf}' --b 'pytunnel run {conf}'

Topologies (loopback, ports chosen at run time):
  client: load -> tunnel under test (client = yes) -> reference TLS server (stunnel4) -> backend
  server: load -> reference TLS client (stunnel4) -> tunnel under test (cert/key) -> backend
The backend and the load generator run in their own processes.  Every figure is reported
as B / A from the same run, systems interleaved A B B A over the repetitions; every bulk
transfer is checked with SHA-256 so a fast wrong tunnel cannot win.  CPU seconds are read
from /proc for the tunnel's whole process tree.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BOUND = re.compile(r"Service \[([^\]]+)\] \(FD=\d+\) bound to .+:(\d+)$", re.M)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# ---------------------------------------------------------------------------- processes


def tree_pids(pid: int) -> list[int]:
    out = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for child in children:
        out += tree_pids(int(child))
    return out


def cpu_seconds(pid: int) -> float:
    total = 0.0
    for p in tree_pids(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime
    return total


def rss_kib(pid: int) -> int:
    total = 0
    for p in tree_pids(pid):
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * PAGE // 1024
        except OSError:
            continue
    return total


@dataclass
class Proc:
    popen: subprocess.Popen[bytes]
    log: Path
    ports: dict[str, int]
    started: float
    ready: float

    @property
    def pid(self) -> int:
        return self.popen.pid

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def start_tunnel(template: str, conf: Path, services: int, workdir: Path) -> Proc:
    cmd = [part.replace("{conf}", str(conf)) for part in shlex.split(template)]
    log = workdir / f"{conf.stem}.{abs(hash(template)) % 10000}.log"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    with open(log, "wb") as fh:
        popen = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        found = BOUND.findall(text)
        if len(found) >= services:
            ports = {name: int(port) for name, port in found}
            return Proc(popen, log, ports, t0, time.perf_counter())
        if popen.poll() is not None:
            raise SystemExit(f"{cmd} exited {popen.returncode}:\n{text}")
        time.sleep(0.005)
    popen.kill()
    raise SystemExit(f"{cmd} did not bind in time:\n{log.read_text()}")


# ---------------------------------------------------------------------------- backend


BACKEND = r"""
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(4096)
print(srv.getsockname()[1], flush=True)
def handle(c):
    # a sink that echoes a 1-byte greeting and, at EOF, the SHA-256 of what it got
    import hashlib
    h = hashlib.sha256(); n = 0
    try:
        while True:
            d = c.recv(1 << 20)
            if not d:
                break
            if n == 0 and d[:1] == b"?":
                c.sendall(b"!")   # a round-trip probe: answer at once, keep the connection
                d = d[1:]
                if not d:
                    continue
            h.update(d); n += len(d)
        c.sendall(f"{n} {h.hexdigest()}".encode())
    except OSError:
        pass
    finally:
        c.close()
while True:
    c, _ = srv.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"""


@contextmanager
def backend() -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    popen = subprocess.Popen([sys.executable, "-c", BACKEND], stdout=subprocess.PIPE)
    assert popen.stdout is not None
    port = int(popen.stdout.readline())
    try:
        yield port, popen
    finally:
        popen.kill()
        popen.wait()


# ---------------------------------------------------------------------------- configs


HEADER = "foreground = yes\nsyslog = no\npid =\ndebug = 6\n"


# ---------------------------------------------------------------------------- measurements


def bulk(port: int, size: int, streams: int) -> tuple[float, bool]:
    """MB/s through ``port`` and whether every stream's SHA-256 matched."""
    payload = os.urandom(1 << 20)
    want = hashlib.sha256()
    for _ in range(size // len(payload)):
        want.update(payload)
    expected = f"{(size // len(payload)) * len(payload)} {want.hexdigest()}".encode()
    ok = [False] * streams

    def one(i: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            for _ in range(size // len(payload)):
                s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            reply = b""
            while chunk := s.recv(256):
                reply += chunk
            ok[i] = reply == expected

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    dt = time.perf_counter() - t0
    return streams * (size // len(payload)) * len(payload) / dt / 1e6, all(ok)


def new_connections(port: int, count: int) -> float:
    t0 = time.perf_counter()
    for _ in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"x")
            s.shutdown(socket.SHUT_WR)
            s.recv(100)
    return count / (time.perf_counter() - t0)


def idle_rss(port: int, pid: int, low: int, high: int) -> float:
    """KiB of tunnel RSS per idle established connection (slope between low and high)."""
    socks: list[socket.socket] = []

    def open_to(n: int) -> None:
        while len(socks) < n:
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(b"?")
            s.recv(1)  # through the tunnel and back: the connection is fully established
            socks.append(s)

    try:
        open_to(low)
        time.sleep(0.3)
        r1 = rss_kib(pid)
        open_to(high)
        time.sleep(0.3)
        r2 = rss_kib(pid)
    finally:
        for s in socks:
            s.close()
    return (r2 - r1) / (high - low)


# ---------------------------------------------------------------------------- the run


@dataclass
class Result:
    metric: str
    unit: str
    a: list[float]
    b: list[float]
    better: str  # "higher" or "lower"

    def ratio(self) -> float:
        return statistics.median(self.b) / statistics.median(self.a)


def make_cert(workdir: Path) -> tuple[Path, Path]:
    import trustme

    ca = trustme.CA()
    path = workdir / "server.pem"
    ca.issue_cert("localhost", "127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(path))
    ca.cert_pem.write_to_path(str(workdir / "ca.pem"))
    return path, workdir / "ca.pem"


def run(args: argparse.Namespace) -> list[Result]:
    workdir = Path(tempfile.mkdtemp(prefix="pytunnel-bench-"))
    cert, ca = make_cert(workdir)
    # both systems verify the upstream (so `pytunnel run`'s secure default is compared fairly)
    verify = f"verifyChain = yes\nCAfile = {ca}\ncheckHost = localhost\n"
    quick = args.quick
    size = (8 if quick else 256) << 20
    reps = 1 if quick else args.reps
    conns = 30 if quick else 500
    results: dict[str, Result] = {}

    def record(metric: str, unit: str, system: str, value: float, better: str) -> None:
        res = results.setdefault(metric, Result(metric, unit, [], [], better))
        (res.a if system == "a" else res.b).append(value)

    with backend() as (bport, _):
        ref = start_tunnel(args.reference, write(workdir, "ref-server.conf",
            f"{HEADER}[refsrv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{bport}\ncert = {cert}\n"), 1, workdir)  # fmt: skip
        try:
            order = ["a", "b", "b", "a"] * reps
            for i, system in enumerate(order):
                template = args.a if system == "a" else args.b
                # client mode: load -> tunnel (client) -> reference TLS server -> backend
                conf = write(workdir, f"client-{i}.conf",
                    f"{HEADER}[cli]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{ref.ports['refsrv']}\n{verify}")  # fmt: skip
                t = start_tunnel(template, conf, 1, workdir)
                try:
                    record("start-up to bound", "ms", system, (t.ready - t.started) * 1000, "lower")
                    port = t.ports["cli"]
                    c0 = cpu_seconds(t.pid)
                    mbps, ok = bulk(port, size, 1)
                    if not ok:
                        raise SystemExit(f"client-mode bulk through {template!r}: bytes did not match")
                    record("client bulk 1 stream", "MB/s", system, mbps, "higher")
                    record(
                        "client CPU per GiB",
                        "s",
                        system,
                        (cpu_seconds(t.pid) - c0) / (size / (1 << 30)),
                        "lower",
                    )
                    if not quick:
                        mbps, ok = bulk(port, size // 16, 16)
                        assert ok
                        record("client bulk 16 streams", "MB/s", system, mbps, "higher")
                    record("client new conn/s", "conn/s", system, new_connections(port, conns), "higher")
                    record("client idle RSS per conn", "KiB", system,
                           idle_rss(port, t.pid, 50 if quick else 200, 150 if quick else 1200), "lower")  # fmt: skip
                finally:
                    t.stop()
                # server mode: load -> reference TLS client -> tunnel (server) -> backend
                conf = write(workdir, f"server-{i}.conf",
                    f"{HEADER}[srv]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{bport}\ncert = {cert}\n")  # fmt: skip
                t = start_tunnel(template, conf, 1, workdir)
                try:
                    refc = start_tunnel(args.reference, write(workdir, f"ref-client-{i}.conf",
                        f"{HEADER}[refcli]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{t.ports['srv']}\n"),
                        1, workdir)  # fmt: skip
                    try:
                        port = refc.ports["refcli"]
                        c0 = cpu_seconds(t.pid)
                        mbps, ok = bulk(port, size, 1)
                        if not ok:
                            raise SystemExit(f"server-mode bulk through {template!r}: bytes did not match")
                        record("server bulk 1 stream", "MB/s", system, mbps, "higher")
                        record(
                            "server CPU per GiB",
                            "s",
                            system,
                            (cpu_seconds(t.pid) - c0) / (size / (1 << 30)),
                            "lower",
                        )
                        record("server new conn/s", "conn/s", system, new_connections(port, conns), "higher")
                    finally:
                        refc.stop()
                finally:
                    t.stop()
        finally:
            ref.stop()
    shutil.rmtree(workdir, ignore_errors=True)
    return list(results.values())


def write(workdir: Path, name: str, text: str) -> Path:
    path = workdir / name
    path.write_text(text)
    return path


def report(results: list[Result], args: argparse.Namespace) -> str:
    lines = [
        f"A = `{args.a}`, B = `{args.b}`; median (min-max) over {len(results[0].a)} run(s) each, ABBA order",
        "",
        "| metric | A | B | B / A | better |",
        "|---|---|---|---|---|",
    ]

    def fmt(xs: list[float], unit: str) -> str:
        return f"{statistics.median(xs):.1f} ({min(xs):.1f}-{max(xs):.1f}) {unit}"

    for r in results:
        lines.append(
            f"| {r.metric} | {fmt(r.a, r.unit)} | {fmt(r.b, r.unit)} | {r.ratio():.2f} | {r.better} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    stunnel = shutil.which("stunnel4") or shutil.which("stunnel") or "stunnel4"
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--a", default=f"{stunnel} {{conf}}", help="command template A (default: stunnel4)")
    parser.add_argument("--b", default=f"{sys.executable} -m tunnel run {{conf}}", help="command template B")
    parser.add_argument("--reference", default=f"{stunnel} {{conf}}", help="the reference TLS peer")
    parser.add_argument(
        "--reps", type=int, default=3, help="ABBA repetitions (each runs A twice and B twice)"
    )
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run; asserts no speed")
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args(argv)
    results = run(args)
    print(report(results, args))
    if args.json:
        args.json.write_text(json.dumps([r.__dict__ for r in results], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
