"""The Docker image, for real: a real engine, a real build of ./Dockerfile, real containers.

No registry is needed.  Where no engine answers (``docker info`` fails) and we are root, the
session starts a private ``dockerd`` in a temporary directory (its own data root, exec root
and socket; no iptables, no bridge: every container uses ``--network host``) and stops it
at the end.  The base image is a local stand-in for the default python:3.13-slim: Debian bookworm with
python3, python3-venv and ca-certificates made by ``mmdebstrap`` and ``docker import``ed
(with this machine's CA bundle and pip index settings, so pip can reach the index from
``docker build --network host``).  PYTUNNEL_DOCKER_BASE=python:3.13-slim uses a real base.

The image is built once per session; every scenario runs its own container on free
loopback ports (the status port too: containers share the host's network).

Knobs: PYTUNNEL_DOCKER_BASE (base image to build on instead of the stand-in),
PYTUNNEL_DOCKER_BASE_TAR (keep the stand-in's tarball there and reuse it next time),
PYTUNNEL_DOCKER_STORAGE (storage driver of the private dockerd; default: dockerd's choice,
then vfs), DEBIAN_MIRROR (mmdebstrap's mirror).
"""

from __future__ import annotations

import configparser
import contextlib
import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import BOUND, ROOT, Certs, EchoServer, cannot_run_here
from loopback_support import free_port
from test_origin import Recorder, _smtps, digest, message, send

import tunnel

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

BASE_TAG = "pytunnel-test-base:bookworm"
IMAGE_UID = 65532
TIMINGS: dict[str, float] = {}
FACTS: dict[str, str] = {}
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")


def say(text: str) -> None:
    print(f"[docker] {text}", flush=True)


def unavailable(reason: str) -> None:
    """No engine can be had here: skip, except in CI, where .ci/run installs docker.io and mmdebstrap."""
    say(f"cannot run: {reason}")
    cannot_run_here(f"{reason} (.ci/run installs docker.io and mmdebstrap)")


# ------------------------------------------------------------------ engine


class Engine:
    """A Docker engine the client reaches through ``env`` (DOCKER_HOST for a private one)."""

    def __init__(self, env: dict[str, str], workdir: Path | None = None) -> None:
        self.env = env
        self.workdir = workdir  # private dockerd's directory (None: someone else's engine)
        self.proc: subprocess.Popen[bytes] | None = None
        self.containers: list[str] = []

    def docker(
        self, *args: str, check: bool = True, timeout: float = 120
    ) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            ["docker", *args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"docker {shlex.join(args)} exited {r.returncode}:\n{r.stdout}{r.stderr}")
        return r

    def alive(self) -> bool:
        try:
            return self.docker("info", check=False, timeout=20).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def remove_containers(self, cids: list[str]) -> None:
        if cids:
            self.docker("rm", "-f", *cids, check=False, timeout=60)

    def close(self) -> None:
        self.remove_containers(self.containers)
        if self.proc is None or self.workdir is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        # whatever dockerd left mounted under its directory, then the directory
        with open("/proc/self/mounts") as fh:
            mounts = [line.split()[1] for line in fh if line.split()[1].startswith(str(self.workdir))]
        for mnt in sorted(mounts, reverse=True):
            subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
        shutil.rmtree(self.workdir, ignore_errors=True)


def start_private_dockerd() -> Engine:
    dockerd = shutil.which("dockerd")
    assert dockerd is not None
    workdir = Path(tempfile.mkdtemp(prefix="pytunnel-dockerd-"))
    sock = workdir / "docker.sock"
    env = dict(os.environ, DOCKER_HOST=f"unix://{sock}")
    env.pop("DOCKER_CONTEXT", None)
    engine = Engine(env, workdir)
    # dockerd picks its storage driver (overlay2 where overlay mounts work); vfs works everywhere
    for storage in dict.fromkeys([os.environ.get("PYTUNNEL_DOCKER_STORAGE", ""), "vfs"]):
        cmd = [
            dockerd,
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            f"--data-root={workdir / 'data'}",
            f"--exec-root={workdir / 'exec'}",
            f"--pidfile={workdir / 'docker.pid'}",
            f"--host=unix://{sock}",
        ]
        if storage:
            cmd.append(f"--storage-driver={storage}")
        log = open(workdir / "dockerd.log", "ab")  # noqa: SIM115 - dockerd keeps it
        t0 = time.monotonic()
        # its own session: a Ctrl-C of pytest does not reach dockerd before the teardown does
        engine.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = t0 + 60
        while time.monotonic() < deadline and engine.proc.poll() is None:
            if engine.alive():
                TIMINGS["dockerd start"] = time.monotonic() - t0
                info = engine.docker("info", "--format", "{{.Driver}} {{.ServerVersion}}").stdout.split()
                FACTS["storage driver"], FACTS["engine"] = info[0], f"dockerd {info[1]} (private)"
                say(f"private dockerd {info[1]} ({info[0]}) ready in {TIMINGS['dockerd start']:.1f}s")
                return engine
            time.sleep(0.2)
        if engine.proc.poll() is None:
            engine.proc.terminate()
            engine.proc.wait(30)
        say(f"dockerd (storage {storage or 'auto'}) did not come up; see {workdir / 'dockerd.log'}")
    tail = (workdir / "dockerd.log").read_text(errors="replace")[-3000:]
    engine.proc = None
    shutil.rmtree(workdir, ignore_errors=True)
    raise AssertionError(f"could not start a private dockerd:\n{tail}")


@pytest.fixture(scope="session")
def engine() -> Iterator[Engine]:
    if shutil.which("docker") is None:
        unavailable("the docker client is not installed (apt-get install docker.io)")
    eng = Engine(dict(os.environ))
    if eng.alive():
        FACTS["engine"] = "an engine that was already running"
        say("using the Docker engine that is already running")
    elif os.geteuid() != 0:
        unavailable("no Docker engine answers and a private dockerd needs root")
    elif shutil.which("dockerd") is None:
        unavailable("no Docker engine answers and dockerd is not installed (apt-get install docker.io)")
    else:
        eng = start_private_dockerd()
    try:
        yield eng
    finally:
        eng.close()
        say("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in TIMINGS.items()))
        say("facts: " + ", ".join(f"{k}: {v}" for k, v in FACTS.items()))


# ------------------------------------------------------------------ image


def host_ca_bundle() -> str:
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE")):
        if candidate and os.path.isfile(candidate):
            return candidate
    return "/etc/ssl/certs/ca-certificates.crt"


def pip_conf() -> str:
    """This machine's package-index settings that a container on the host network can use."""
    cp = configparser.ConfigParser()
    files = ["/etc/pip.conf", "/etc/xdg/pip/pip.conf", "~/.config/pip/pip.conf", "~/.pip/pip.conf"]
    files.append(os.environ.get("PIP_CONFIG_FILE", ""))
    cp.read([os.path.expanduser(f) for f in files if f])
    lines = ["[global]", "cert = /etc/ssl/certs/ca-certificates.crt"]
    for key in ("index-url", "extra-index-url", "trusted-host"):
        value = os.environ.get("PIP_" + key.upper().replace("-", "_")) or cp.get("global", key, fallback="")
        words = value.split()
        if key != "trusted-host":  # file:// indexes are this machine's disk, not the container's
            words = [w for w in words if w.startswith(("http://", "https://"))]
        if words:
            lines.append(f"{key} = {' '.join(words)}")
    return "\n".join(lines) + "\n"


def standin_base(engine: Engine) -> str:
    if engine.docker("image", "inspect", BASE_TAG, check=False).returncode == 0:
        return BASE_TAG
    keep = os.environ.get("PYTUNNEL_DOCKER_BASE_TAR")
    with tempfile.TemporaryDirectory(prefix="pytunnel-base-") as tmp:
        tar = Path(keep) if keep else Path(tmp) / "base.tar"
        if not tar.is_file():
            mmdebstrap = shutil.which("mmdebstrap")
            if mmdebstrap is None:
                unavailable("mmdebstrap is not installed (apt-get install mmdebstrap) to make the base image")
            assert mmdebstrap is not None
            conf = Path(tmp) / "pip.conf"
            conf.write_text(pip_conf())
            ca = shlex.quote(host_ca_bundle())
            cmd = [
                mmdebstrap,
                "--variant=apt",
                "--include=python3,python3-venv,ca-certificates",
                f'--customize-hook=cat {ca} > "$1/etc/ssl/certs/ca-certificates.crt"',
                f"--customize-hook=upload {conf} /etc/pip.conf",
                "bookworm",
                str(tar),
            ]
            if os.environ.get("DEBIAN_MIRROR"):
                cmd.append(os.environ["DEBIAN_MIRROR"])
            t0 = time.monotonic()
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=900)
            assert r.returncode == 0, f"mmdebstrap failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}"
            TIMINGS["mmdebstrap"] = time.monotonic() - t0
            say(f"mmdebstrap: {TIMINGS['mmdebstrap']:.1f}s")
        t0 = time.monotonic()
        engine.docker("import", str(tar), BASE_TAG, timeout=600)
        TIMINGS["docker import"] = time.monotonic() - t0
        say(f"docker import: {TIMINGS['docker import']:.1f}s")
    return BASE_TAG


@pytest.fixture(scope="session")
def image(engine: Engine) -> Iterator[str]:
    base = os.environ.get("PYTUNNEL_DOCKER_BASE") or standin_base(engine)
    tag = f"pytunnel-test:{os.getpid()}"
    cmd = ["build", "--network", "host", "--build-arg", f"BASE={base}", "-t", tag]
    for var in PROXY_VARS:
        if os.environ.get(var):
            cmd += ["--build-arg", f"{var}={os.environ[var]}"]
    t0 = time.monotonic()
    r = engine.docker(*cmd, str(ROOT), check=False, timeout=900)
    assert r.returncode == 0, f"docker build failed:\n{r.stdout[-5000:]}{r.stderr[-5000:]}"
    TIMINGS["docker build"] = time.monotonic() - t0
    size = int(engine.docker("image", "inspect", "--format", "{{.Size}}", tag).stdout)
    FACTS["base"], FACTS["image size"] = base, f"{size} bytes ({size / 1e6:.1f} MB)"
    say(f"docker build on {base}: {TIMINGS['docker build']:.1f}s, image {size / 1e6:.1f} MB")
    yield tag
    engine.docker("rmi", "-f", tag, check=False)


# ------------------------------------------------------------------ containers


@dataclass
class Container:
    engine: Engine
    cid: str

    def logs(self) -> str:
        r = self.engine.docker("logs", self.cid, check=False)
        return r.stdout + r.stderr

    def inspect(self, fmt: str) -> str:
        return self.engine.docker("inspect", "--format", fmt, self.cid).stdout.strip()

    def wait_for(self, pattern: str, timeout: float = 30.0) -> re.Match[str]:
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        while True:
            logs = self.logs()
            m = rx.search(logs)
            if m:
                return m
            if self.inspect("{{.State.Running}}") != "true":
                code = self.inspect("{{.State.ExitCode}}")
                raise AssertionError(f"container exited {code} before /{pattern}/:\n{logs}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for /{pattern}/:\n{logs}")
            time.sleep(0.1)

    def wait_bound(self, services: int = 1) -> dict[str, int]:
        deadline = time.monotonic() + 30
        while len(BOUND.findall(self.logs())) < services:
            if time.monotonic() > deadline or self.inspect("{{.State.Running}}") != "true":
                raise AssertionError(f"no `bound to` line:\n{self.logs()}")
            time.sleep(0.1)
        return {svc: int(port) for svc, _host, port in BOUND.findall(self.logs())}

    def exec(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.engine.docker("exec", self.cid, *args, check=False)


class Runner:
    """Starts containers of the image on the host network; removes them after the test."""

    def __init__(self, engine: Engine, image: str) -> None:
        self.engine = engine
        self.image = image
        self.mine: list[str] = []

    def run(
        self, *args: str, env: dict[str, str] | None = None, mounts: dict[Path, str] | None = None
    ) -> Container:
        opts = ["run", "-d", "--network", "host"]
        for k, v in (env or {}).items():
            opts += ["-e", f"{k}={v}"]
        for src, dst in (mounts or {}).items():
            opts += ["-v", f"{src}:{dst}:ro"]
        cid = self.engine.docker(*opts, self.image, *args).stdout.strip()
        self.mine.append(cid)
        self.engine.containers.append(cid)
        return Container(self.engine, cid)

    def close(self) -> None:
        self.engine.remove_containers(self.mine)


@pytest.fixture
def runner(engine: Engine, image: str) -> Iterator[Runner]:
    r = Runner(engine, image)
    yield r
    r.close()


@pytest.fixture(autouse=True)
def timed(request: pytest.FixtureRequest) -> Iterator[None]:
    t0 = time.monotonic()
    yield
    TIMINGS[request.node.name] = time.monotonic() - t0


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory to mount into a container: readable by its UID 65532 (0755, files 0644)."""
    d = Path(tempfile.mkdtemp(prefix="pytunnel-mount-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def put(directory: Path, name: str, content: str | bytes | Path) -> Path:
    path = directory / name
    if isinstance(content, Path):
        content = content.read_bytes()
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    path.chmod(0o644)
    return path


def server_conf(port: int, backend: int) -> str:
    """Server mode: TLS on the accept port, plaintext to the echo backend."""
    return (
        "foreground = yes\nsyslog = no\npid =\ndebug = 6\n"
        "[echo-tls]\n"
        f"accept = 127.0.0.1:{port}\n"
        f"connect = 127.0.0.1:{backend}\n"
        "cert = /etc/pytunnel/server.pem\n"
    )


def conf_dir(directory: Path, certs: Certs, port: int, backend: int) -> Path:
    put(directory, "stunnel.conf", server_conf(port, backend))
    put(directory, "server.pem", certs.server_pem)
    return directory


def tls_connect(certs: Certs, port: int) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(certs.ca_pem))
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    return ctx.wrap_socket(raw, server_hostname="localhost")


def tls_echo(certs: Certs, port: int, data: bytes) -> bytes:
    with tls_connect(certs, port) as s:
        s.sendall(data)
        out = bytearray()
        while len(out) < len(data):
            chunk = s.recv(262144)
            if not chunk:
                break
            out.extend(chunk)
        return bytes(out)


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# ------------------------------------------------------------------ scenarios


def test_image_metadata(engine: Engine, image: str) -> None:
    """Non-root user, exec-form entrypoint, health check, no EXPOSE, OCI labels, no build tools."""
    cfg = json.loads(engine.docker("image", "inspect", "--format", "{{json .Config}}", image).stdout)
    assert cfg["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    assert cfg["Entrypoint"] == ["pytunnel"]
    assert cfg["Cmd"] == ["run"]
    assert not cfg.get("ExposedPorts")
    assert cfg["Healthcheck"]["Test"] == ["CMD", "pytunnel", "healthcheck"]
    assert "PYTUNNEL_STATUS=127.0.0.1:9102" in cfg["Env"]
    labels = cfg["Labels"]
    assert labels["org.opencontainers.image.title"] == "pytunnel"
    assert labels["org.opencontainers.image.licenses"] == "MIT"
    assert labels["org.opencontainers.image.version"] == tunnel.__version__, "ARG VERSION in the Dockerfile"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert labels["org.opencontainers.image.description"]
    probe = (
        "import os, shutil; "
        "print([t for t in ('gcc', 'cc', 'make', 'curl', 'wget') if shutil.which(t)], "
        "os.path.exists('/opt/pytunnel/bin/pip'))"
    )
    r = engine.docker(
        "run", "--rm", "--network", "none", "--entrypoint", "/opt/pytunnel/bin/python", image, "-c", probe
    )
    assert r.stdout.strip() == "[] False", r.stdout
    # no arguments and no STUNNEL_* variables: `pytunnel run` says what it needs
    r = engine.docker("run", "--rm", "--network", "none", image, check=False)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "STUNNEL_SERVICE, STUNNEL_ACCEPT and STUNNEL_CONNECT" in r.stderr
    r = engine.docker("run", "--rm", "--network", "none", image, "version")
    assert f"pytunnel {tunnel.__version__}" in r.stdout


def test_env_only_print_config(engine: Engine, image: str) -> None:
    r = engine.docker(
        "run", "--rm", "--network", "none",
        "-e", "STUNNEL_SERVICE=smtp", "-e", "STUNNEL_CLIENT=yes",
        "-e", "STUNNEL_ACCEPT=127.0.0.1:2525", "-e", "STUNNEL_CONNECT=smtp.gmail.com:465",
        image, "run", "--print-config",
    )  # fmt: skip
    text = r.stdout
    assert "[smtp]" in text and "client = yes" in text, text
    assert "accept = 127.0.0.1:2525" in text and "connect = smtp.gmail.com:465" in text, text
    # the base's CA store is there, so client mode verifies against it by default
    assert "CAfile = /etc/ssl/certs/ca-certificates.crt" in text, text


def test_origin_scenario_env_only(runner: Runner, certs: Certs, shared_dir: Path) -> None:
    """Plaintext SMTP with AUTH PLAIN -> the container (client mode, env only) -> implicit TLS."""
    put(shared_dir, "ca.pem", certs.ca_pem)
    accept, status = free_port(), free_port()
    with contextlib.contextmanager(_smtps)(certs.server_pem) as (smtps_port, rec):
        c = runner.run(
            env={
                "STUNNEL_SERVICE": "smtp",
                "STUNNEL_CLIENT": "yes",
                "STUNNEL_ACCEPT": f"127.0.0.1:{accept}",
                "STUNNEL_CONNECT": f"localhost:{smtps_port}",
                "STUNNEL_CAFILE": "/certs/ca.pem",
                "PYTUNNEL_STATUS": f"127.0.0.1:{status}",
            },
            mounts={shared_dir: "/certs"},
        )
        assert c.wait_bound() == {"smtp": accept}
        msgs = [message("docker-small"), message("docker-big", 512 * 1024)]
        for msg in msgs:
            send(accept, msg)
        assert [digest(m) for m in rec.messages] == [digest(m) for m in msgs]
        assert isinstance(rec, Recorder)
        c.wait_for(r"TLS connected")
        c.wait_for(r"(?s)(Connection closed: .*){2}")  # both counted before the scrape
        code, metrics = http_get(status, "/metrics")
        assert code == 200, metrics
        assert re.search(r'pytunnel_connections_total\{[^}]*service="smtp"[^}]*\} 2(\.0)?$', metrics, re.M), (
            metrics
        )


def test_mounted_stunnel_conf_server_mode(
    runner: Runner, certs: Certs, echo: EchoServer, shared_dir: Path
) -> None:
    """`docker run IMAGE /etc/pytunnel/stunnel.conf`: stunnel's command line, TLS echo round trip."""
    port = free_port()
    conf_dir(shared_dir, certs, port, echo.port)
    c = runner.run(
        "/etc/pytunnel/stunnel.conf",
        env={"PYTUNNEL_STATUS": f"127.0.0.1:{free_port()}"},
        mounts={shared_dir: "/etc/pytunnel"},
    )
    assert c.wait_bound() == {"echo-tls": port}
    data = os.urandom(300_000)
    assert tls_echo(certs, port, data) == data
    c.wait_for(r"Connection closed: \d+ byte\(s\) sent to TLS, \d+ byte\(s\) sent to socket")


def test_health_status_turns_healthy(
    runner: Runner, certs: Certs, echo: EchoServer, shared_dir: Path
) -> None:
    """The image's own HEALTHCHECK (`pytunnel healthcheck` against PYTUNNEL_STATUS) reports healthy."""
    put(shared_dir, "server.pem", certs.server_pem)
    port, status = free_port(), free_port()
    c = runner.run(
        env={
            "STUNNEL_SERVICE": "echo",
            "STUNNEL_ACCEPT": f"127.0.0.1:{port}",
            "STUNNEL_CONNECT": f"127.0.0.1:{echo.port}",
            "STUNNEL_CRT": "/certs/server.pem",
            "PYTUNNEL_STATUS": f"127.0.0.1:{status}",
        },
        mounts={shared_dir: "/certs"},
    )
    c.wait_bound()
    t0 = time.monotonic()
    health = ""
    while time.monotonic() - t0 < 60:
        health = c.inspect("{{.State.Health.Status}}")
        if health in ("healthy", "unhealthy"):
            break
        time.sleep(0.5)
    detail = c.inspect("{{json .State.Health}}")
    assert health == "healthy", f"{health}: {detail}\n{c.logs()}"
    TIMINGS["healthy after"] = time.monotonic() - t0
    assert "healthy: http://127.0.0.1:" in detail
    assert http_get(status, "/livez")[0] == 200
    assert http_get(status, "/readyz")[0] == 200


def test_runs_as_uid_65532_and_pid_1(
    runner: Runner, certs: Certs, echo: EchoServer, shared_dir: Path
) -> None:
    port = free_port()
    conf_dir(shared_dir, certs, port, echo.port)
    c = runner.run(
        "/etc/pytunnel/stunnel.conf",
        env={"PYTUNNEL_STATUS": f"127.0.0.1:{free_port()}"},
        mounts={shared_dir: "/etc/pytunnel"},
    )
    c.wait_bound()
    c.wait_for(r"Running as PID 1: installing explicit TERM/INT handlers")
    probe = (
        "import os; st = open('/proc/1/status').read(); "
        "print(open('/proc/1/cmdline').read().replace(chr(0), ' ')); "
        "print([l for l in st.splitlines() if l.startswith(('Uid:', 'Gid:'))]); print(os.getuid())"
    )
    r = c.exec("/opt/pytunnel/bin/python", "-c", probe)
    assert r.returncode == 0, r.stdout + r.stderr
    cmdline, ids, exec_uid = r.stdout.splitlines()
    assert "/opt/pytunnel/bin/pytunnel /etc/pytunnel/stunnel.conf" in cmdline, cmdline
    assert ids == str(
        [
            f"Uid:\t{IMAGE_UID}\t{IMAGE_UID}\t{IMAGE_UID}\t{IMAGE_UID}",
            f"Gid:\t{IMAGE_UID}\t{IMAGE_UID}\t{IMAGE_UID}\t{IMAGE_UID}",
        ]
    )
    assert exec_uid == str(IMAGE_UID)


def test_docker_stop_drains_in_flight_stream(
    runner: Runner, engine: Engine, certs: Certs, echo: EchoServer, shared_dir: Path
) -> None:
    """`docker stop --time 10` mid-transfer: the stream completes intact, exit 0 within the grace period."""
    port = free_port()
    conf_dir(shared_dir, certs, port, echo.port)
    c = runner.run(
        "/etc/pytunnel/stunnel.conf",
        env={"PYTUNNEL_STATUS": f"127.0.0.1:{free_port()}", "PYTUNNEL_DRAIN_TIMEOUT": "8"},
        mounts={shared_dir: "/etc/pytunnel"},
    )
    c.wait_bound()
    payload = os.urandom(4 * 1024 * 1024)
    chunk = 128 * 1024
    received = bytearray()
    stopped: dict[str, float] = {}
    stop_result: list[subprocess.CompletedProcess[str]] = []

    def stopper() -> None:
        stopped["at"] = time.monotonic()
        stop_result.append(engine.docker("stop", "--time", "10", c.cid, check=False, timeout=60))
        stopped["done"] = time.monotonic()

    def read_for(s: ssl.SSLSocket, seconds: float) -> None:
        """Collect what has come back for ``seconds`` (one thread uses the TLS socket: an
        SSLSocket must not be read and written from two threads at once)."""
        end = time.monotonic() + seconds
        while len(received) < len(payload) and time.monotonic() < end:
            s.settimeout(max(0.001, end - time.monotonic()))
            try:
                data = s.recv(262144)
            except (TimeoutError, ssl.SSLWantReadError):
                return
            if not data:
                return
            received.extend(data)

    st = threading.Thread(target=stopper, daemon=True)
    with tls_connect(certs, port) as s:
        for i, off in enumerate(range(0, len(payload), chunk)):
            s.settimeout(30)
            s.sendall(payload[off : off + chunk])
            if i == 3:
                st.start()
                c.wait_for(r"Received signal 15; terminating", timeout=10)
                stopped["signalled"] = time.monotonic()
            read_for(s, 0.05)
        stopped["sent"] = time.monotonic()
        deadline = time.monotonic() + 30
        while len(received) < len(payload) and time.monotonic() < deadline:
            read_for(s, 1.0)
    st.join(30)
    logs = c.logs()
    assert len(received) == len(payload), f"{len(received)} of {len(payload)} bytes back\n{logs}"
    assert hashlib.sha256(received).hexdigest() == hashlib.sha256(payload).hexdigest()
    assert stopped["sent"] - stopped["signalled"] > 1.0, "the stream should outlive the signal by a while"
    assert stop_result and stop_result[0].returncode == 0, stop_result
    assert stopped["done"] - stopped["at"] < 10, "killed at the end of the grace period?"
    TIMINGS["docker stop took"] = stopped["done"] - stopped["at"]
    assert c.inspect("{{.State.ExitCode}}") == "0", logs
    assert c.inspect("{{.State.OOMKilled}}") == "false"
    for line in (
        "Received signal 15; terminating",
        "Stopped accepting new connections",
        "Draining 1 connection(s) for up to 8 seconds",
        "All connections finished",
        "Terminated",
    ):
        assert line in logs, f"{line!r} missing:\n{logs}"


def test_run_flags_with_mounted_conf(
    runner: Runner, certs: Certs, echo: EchoServer, shared_dir: Path
) -> None:
    """`docker run IMAGE run --status HOST:PORT /etc/pytunnel/stunnel.conf`: pytunnel run's flags."""
    port, status = free_port(), free_port()
    conf_dir(shared_dir, certs, port, echo.port)
    c = runner.run(
        "run", "--status", f"127.0.0.1:{status}", "--drain-timeout", "2", "/etc/pytunnel/stunnel.conf",
        mounts={shared_dir: "/etc/pytunnel"},
    )  # fmt: skip
    assert c.wait_bound() == {"echo-tls": port}
    c.wait_for(rf"Status server listening on http://127\.0\.0\.1:{status}")
    data = os.urandom(100_000)
    assert tls_echo(certs, port, data) == data
    c.wait_for(r"Connection closed: \d+ byte\(s\) sent to TLS")  # counted when it ends
    code, metrics = http_get(status, "/metrics")
    assert code == 200
    assert re.search(r'pytunnel_connections_total\{[^}]*service="echo-tls"', metrics), metrics
    assert re.search(r'pytunnel_bytes_total\{[^}]*service="echo-tls"', metrics), metrics
    r = c.exec("pytunnel", "healthcheck", "--status", f"127.0.0.1:{status}")
    assert r.returncode == 0, r.stdout + r.stderr
