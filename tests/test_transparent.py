"""``transparent = source|destination|both`` for real, in network namespaces.

Three namespaces per test module (unique names, removed in teardown even after a failure)::

    client C  10.61.1.2 / fd61:1::2  --  router R  10.61.1.1 / fd61:1::1   (the tunnel runs here)
                                          router R  10.61.2.1 / fd61:2::1  --  server S  10.61.2.2 / fd61:2::2

R forwards nothing (forwarding stays off), so every byte between C and S goes through the
tunnel.  R has the TPROXY-style routing of docs/transparent.md: an nft ``socket transparent``
rule marks packets that belong to a transparent socket, and ``ip rule fwmark 1 lookup 100`` +
``local 0.0.0.0/0 dev lo table 100`` delivers them locally (the replies of a ``source``
upstream, and TPROXY-diverted clients).  Each scenario runs under pytunnel and under Debian's
stunnel4 with the same configuration file; stunnel4 is skipped, saying why, only where 5.68
cannot do it.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme
from conftest import (
    BOUND,
    ROOT,
    Tunnel,
    cannot_run_here,
    need_root,
    need_stunnel,
    need_tool,
    pytunnel_cmd,
    stunnel4_lacks,
)

from tunnel import conf
from tunnel.errors import ConfigError
from tunnel.settings import Settings

T = TypeVar("T")

pytestmark = pytest.mark.timeout(120)

C4, R4C, R4S, S4 = "10.61.1.2", "10.61.1.1", "10.61.2.1", "10.61.2.2"
C6, R6C, R6S, S6 = "fd61:1::2", "fd61:1::1", "fd61:2::1", "fd61:2::2"
ADDRS = {4: (C4, R4C, S4), 6: (C6, R6C, S6)}
FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}
PLAIN_PORT = 7000  # S: plain echo server
TLS_PORT = 8443  # S: TLS echo server (and the "arbitrary" destination clients ask for)
MARK_TABLE = "pytunnel_transparent"  # R: the socket-transparent marking (module-wide)
RULES_TABLE = "pytunnel_test"  # R: the per-test REDIRECT / TPROXY rules
STUNNEL_NO_TPROXY = (
    "TPROXY on its listener: it sets IP_TRANSPARENT only on its outgoing sockets (src/client.c "
    "connect_init), never on its listening ones, so a TPROXY rule cannot deliver connections to it"
)


# ------------------------------------------------------------------ prerequisites


def _need_tools() -> None:
    if sys.platform != "linux":
        cannot_run_here(f"transparent proxying is Linux-only; this is {sys.platform}")
    need_root("network namespaces, veth pairs and IP_TRANSPARENT")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("sysctl", "procps")):
        need_tool(tool, package)


def run(*args: str, ns: str | None = None, stdin: str | None = None) -> str:
    cmd = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    out = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()}")
    return out.stdout


# ------------------------------------------------------------------ entering a namespace

_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run ``fn`` in a thread that joined namespace ``ns``: the sockets it creates live there
    (a socket keeps its namespace for life, whichever thread uses it later)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns {ns}: {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]  # type: ignore[no-any-return]


# ------------------------------------------------------------------ servers in S


class PeerServer:
    """An echo server (plain, or TLS from the start) that remembers each client's address."""

    def __init__(self, ns: str, host: str, port: int, tls: ssl.SSLContext | None = None) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        def make() -> socket.socket:
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
            s.listen(64)
            return s

        self.sock = in_netns(ns, make)
        self.tls = tls
        self.peers: list[tuple[str, int]] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append((str(peer[0]), int(peer[1])))
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(20)
        try:
            stream: socket.socket = conn
            if self.tls is not None:
                stream = self.tls.wrap_socket(conn, server_side=True)
            while True:
                data = stream.recv(65536)
                if not data:
                    break
                stream.sendall(data)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()


# ------------------------------------------------------------------ the network


@dataclass
class Net:
    c: str
    r: str
    s: str
    certs: Path
    ca: trustme.CA
    plain: dict[int, PeerServer] = field(default_factory=dict)
    tls: dict[int, PeerServer] = field(default_factory=dict)
    #: client ports never repeat within the module: the router's conntrack keeps a closed
    #: connection's entry (and its REDIRECT binding of an earlier test) for minutes, and a
    #: reused (address, port) pair would follow that old binding
    ports: Iterator[int] = field(default_factory=lambda: itertools.count(21000))

    def reset(self) -> None:
        for servers in (self.plain, self.tls):
            for srv in servers.values():
                srv.peers.clear()

    def rules(self, body: str) -> None:
        """This test's nft rules on R (an inet table of their own, replaced each time)."""
        self.drop_rules()
        run("nft", "-f", "-", ns=self.r, stdin=f"table inet {RULES_TABLE} {{\n{body}\n}}\n")

    def drop_rules(self) -> None:
        with contextlib.suppress(RuntimeError):
            run("nft", "delete", "table", "inet", RULES_TABLE, ns=self.r)

    def connect(self, family: int, host: str, port: int) -> socket.socket:
        """A TCP connection from C (from a port not used before)."""
        s = in_netns(self.c, lambda: socket.socket(FAMILIES[family], socket.SOCK_STREAM))
        s.settimeout(8)
        try:
            s.bind((ADDRS[family][0], next(self.ports)))
            s.connect((host, port))
        except OSError:
            s.close()
            raise
        return s

    def client_tls(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.certs / "ca.pem"))
        return ctx


def _topology(c: str, r: str, s: str) -> None:
    for ns in (c, r, s):
        run("ip", "netns", "add", ns)
        run("ip", "-n", ns, "link", "set", "lo", "up")
    run("ip", "link", "add", "vc", "netns", c, "type", "veth", "peer", "name", "vrc", "netns", r)
    run("ip", "link", "add", "vs", "netns", s, "type", "veth", "peer", "name", "vrs", "netns", r)
    for ns, dev, v4, v6 in (
        (c, "vc", C4, C6),
        (r, "vrc", R4C, R6C),
        (r, "vrs", R4S, R6S),
        (s, "vs", S4, S6),
    ):
        run("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
        run("ip", "-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
        run("ip", "-n", ns, "link", "set", dev, "up")
    for ns, gw4, gw6 in ((c, R4C, R6C), (s, R4S, R6S)):
        run("ip", "-n", ns, "route", "add", "default", "via", gw4)
        run("ip", "-n", ns, "-6", "route", "add", "default", "via", gw6)
    # R forwards nothing: whatever reaches S went through the tunnel
    run("sysctl", "-qw", "net.ipv4.ip_forward=0", "net.ipv6.conf.all.forwarding=0", ns=r)
    # R: the routing docs/transparent.md asks of the admin (the same commands)
    run("ip", "-n", r, "rule", "add", "fwmark", "1", "lookup", "100")
    run("ip", "-n", r, "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
    run("ip", "-n", r, "-6", "rule", "add", "fwmark", "1", "lookup", "100")
    run("ip", "-n", r, "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "100")
    run(
        "nft", "-f", "-", ns=r,
        stdin=f"""table inet {MARK_TABLE} {{
  chain prerouting {{
    type filter hook prerouting priority mangle; policy accept;
    meta l4proto tcp socket transparent 1 meta mark set 1 accept
  }}
}}
""",
    )  # fmt: skip


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    _need_tools()
    tag = f"ptx{os.getpid()}"
    c, r, s = f"{tag}-c", f"{tag}-r", f"{tag}-s"
    d = tmp_path_factory.mktemp("transparent-certs")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    ca.issue_cert("router.test", R4C, R6C, S4, S6).private_key_and_cert_chain_pem.write_to_path(
        str(d / "server.pem")
    )
    servers: list[PeerServer] = []
    try:
        try:
            _topology(c, r, s)
        except RuntimeError as exc:  # a set-up that did not work is a failure, with its error
            pytest.fail(f"setting up the namespaces, veth pairs and nft rules failed: {exc}", pytrace=False)
        server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_ctx.load_cert_chain(str(d / "server.pem"))
        network = Net(c=c, r=r, s=s, certs=d, ca=ca)
        for fam, (_cl, _rt, host) in ADDRS.items():
            network.plain[fam] = PeerServer(s, host, PLAIN_PORT)
            network.tls[fam] = PeerServer(s, host, TLS_PORT, server_ctx)
            servers += [network.plain[fam], network.tls[fam]]
        yield network
    finally:
        for srv in servers:
            srv.close()
        for ns in (c, r, s):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


# ------------------------------------------------------------------ tunnels on R


class RouterTunnels:
    """Start pytunnel or stunnel4 inside R (``ip netns exec``); killed at teardown."""

    def __init__(self, net: Net, tmp_path: Path) -> None:
        self.net = net
        self.tmp_path = tmp_path
        self.started: list[Tunnel] = []
        self.count = 0

    def conf(self, body: str) -> Path:
        self.count += 1
        path = self.tmp_path / f"transparent{self.count}.conf"
        path.write_text("foreground = yes\nsyslog = no\npid =\ndebug = 7\n" + body)
        return path

    def start(
        self, conf_path: Path, impl: str, prefix: tuple[str, ...] = (), run_mode: bool = False
    ) -> Tunnel:
        """impl: pytunnel | stunnel4; run_mode: `pytunnel run CONF` (verifies by default)."""
        if impl == "stunnel4":
            cmd = [need_stunnel(), str(conf_path)]
        else:
            cmd = pytunnel_cmd(*(["run"] if run_mode else []), str(conf_path))
        self.count += 1
        log_path = self.tmp_path / f"{impl}-{self.count}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        with open(log_path, "wb") as fh:  # the child keeps its own copy
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.net.r, *prefix, *cmd],
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
            )
        tunnel = Tunnel(proc=proc, log_path=log_path)
        self.started.append(tunnel)
        expected = conf_path.read_text().count("\naccept")
        tunnel.wait_for(r"Configuration successful")
        deadline = time.monotonic() + 10
        while len(BOUND.findall(tunnel.log)) < expected:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"{impl} did not bind (exit {proc.poll()}):\n{tunnel.log}")
            time.sleep(0.02)
        return tunnel

    def close(self) -> None:
        for t in self.started:
            if t.proc.poll() is None:
                t.proc.send_signal(signal.SIGKILL)
                t.proc.wait()


@pytest.fixture
def router(net: Net, tmp_path: Path) -> Iterator[RouterTunnels]:
    net.reset()
    net.drop_rules()
    factory = RouterTunnels(net, tmp_path)
    try:
        yield factory
    finally:
        factory.close()
        net.drop_rules()


def hostport(host: str, port: int) -> str:
    return f"{host}:{port}"  # stunnel splits at the last colon: fd61:2::2:7000 is [fd61:2::2]:7000


def exchange(s: socket.socket, payload: bytes) -> bytes:
    s.sendall(payload)
    out = b""
    while len(out) < len(payload):
        chunk = s.recv(65536)
        if not chunk:
            break
        out += chunk
    return out


def wait_peer(server: PeerServer, timeout: float = 5.0) -> tuple[str, int]:
    deadline = time.monotonic() + timeout
    while not server.peers:
        if time.monotonic() > deadline:
            raise AssertionError("the server saw no connection")
        time.sleep(0.01)
    return server.peers[-1]


def ended_by_tunnel(s: socket.socket) -> bool:
    """The tunnel closed (or reset) the client's connection without any data."""
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def connection_ended(net: Net, family: int, host: str, port: int) -> bool:
    """Connect from C and see the tunnel end the connection.  A reset that comes right after
    the handshake can beat connect() itself back to user space: ECONNRESET there counts too
    (a port nobody listens on gives ECONNREFUSED instead)."""
    try:
        s = net.connect(family, host, port)
    except ConnectionResetError:
        return True
    with s:
        return ended_by_tunnel(s)


# ------------------------------------------------------------------ configuration (no namespaces)


def _load(tmp_path: Path, body: str) -> Settings:
    path = tmp_path / "t.conf"
    path.write_text(body)
    return conf.load(str(path))


def _stunnel_verdict(tmp_path: Path, body: str) -> tuple[bool, str]:
    path = tmp_path / "stunnel.conf"
    path.write_text("foreground = yes\nsyslog = no\npid =\n" + body)
    proc = subprocess.Popen([need_stunnel(), str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    text = b""
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    try:
        while time.monotonic() < deadline:
            text += proc.stdout.read() or b""
            if b"Configuration successful" in text:
                return True, text.decode(errors="replace")
            if proc.poll() is not None:
                text += proc.stdout.read() or b""
                return b"Configuration successful" in text, text.decode(errors="replace")
            time.sleep(0.02)
        raise AssertionError(f"stunnel4 neither started nor failed:\n{text.decode(errors='replace')}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(5)


SECTION = "[t]\nclient = yes\naccept = 127.0.0.1:0\n"


@pytest.mark.parametrize(
    ("lines", "ok", "message"),
    [
        ("transparent = destination\n", True, None),
        ("transparent = both\n", True, None),
        ("transparent = source\nconnect = 127.0.0.1:9\n", True, None),
        ("transparent = yes\nconnect = 127.0.0.1:9\n", True, None),
        ("transparent = no\nconnect = 127.0.0.1:9\n", True, None),
        (
            "transparent = destination\nconnect = 127.0.0.1:9\n",
            False,
            "Each service must define two endpoints",
        ),
        ("transparent = source\n", False, "Each service must define two endpoints"),
        (
            "transparent = sideways\nconnect = 127.0.0.1:9\n",
            False,
            "Selected transparent proxy mode is not available",
        ),
    ],
)
def test_configuration_rules_match_stunnel(
    tmp_path: Path, impl: str, lines: str, ok: bool, message: str | None
) -> None:
    """stunnel counts transparent = destination|both as an endpoint: no connect beside it."""
    body = SECTION + lines
    if impl == "stunnel4":
        accepted, text = _stunnel_verdict(tmp_path, body)
    else:
        try:
            _load(tmp_path, body)
            accepted, text = True, ""
        except ConfigError as exc:
            accepted, text = False, "\n".join(p.render() for p in exc.problems)
    assert accepted == ok, text
    if message:
        assert message in text


def test_modes_and_legacy_values(tmp_path: Path) -> None:
    for value, mode in (("yes", "source"), ("no", "none"), ("None", "none"), ("BOTH", "both")):
        extra = "" if mode in ("both",) else "connect = 127.0.0.1:9\n"
        svc = _load(tmp_path, SECTION + f"transparent = {value}\n" + extra).services[0]
        assert svc.transparent == mode
    assert _load(tmp_path, SECTION + "connect = 127.0.0.1:9\n").services[0].transparent == "none"


def test_not_linux_is_a_configuration_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pytunnel only (stunnel's option parser has no such platform check on Linux builds)."""
    monkeypatch.setattr(sys, "platform", "freebsd14")
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, SECTION + "transparent = source\nconnect = 127.0.0.1:9\n")
    text = "\n".join(p.render() for p in err.value.problems)
    assert "only available on Linux" in text and "freebsd14" in text
    assert _load(tmp_path, SECTION + "transparent = none\nconnect = 127.0.0.1:9\n").services[0].name == "t"


# ------------------------------------------------------------------ source


@pytest.mark.parametrize("family", [4, 6])
def test_source_server_sees_the_client_address(
    net: Net, router: RouterTunnels, impl: str, family: int
) -> None:
    """Server mode: TLS from C, plain to S from C's own address and port."""
    client, rtr, server = ADDRS[family]
    body = (
        f"[src]\naccept = {hostport(rtr, 4430)}\nconnect = {hostport(server, PLAIN_PORT)}\n"
        f"cert = {net.certs / 'server.pem'}\ntransparent = source\n"
    )
    t = router.start(router.conf(body), impl)
    for _ in range(2):
        with net.client_tls().wrap_socket(net.connect(family, rtr, 4430), server_hostname=rtr) as s:
            assert exchange(s, b"hello from the client\n") == b"hello from the client\n"
            mine = s.getsockname()
        assert wait_peer(net.plain[family]) == (client, mine[1]), t.log
        net.reset()
    if impl == "pytunnel":
        assert "bind succeeded on the original port" in t.log
    t.stop()


def test_source_without_cap_net_admin(net: Net, router: RouterTunnels, impl: str) -> None:
    """Without CAP_NET_ADMIN IP_TRANSPARENT fails: the connection fails and says why; the
    tunnel keeps serving."""
    need_tool("setpriv", "util-linux")
    body = (
        f"[src]\naccept = {hostport(R4C, 4430)}\nconnect = {hostport(S4, PLAIN_PORT)}\n"
        f"cert = {net.certs / 'server.pem'}\ntransparent = source\n"
    )
    # the kernel allows IP_TRANSPARENT with CAP_NET_ADMIN or CAP_NET_RAW: drop both
    caps = "-net_admin,-net_raw"
    drop = ("setpriv", f"--inh-caps={caps}", f"--ambient-caps={caps}", f"--bounding-set={caps}")
    t = router.start(router.conf(body), impl, prefix=drop)
    for n in (1, 2):
        with net.client_tls().wrap_socket(net.connect(4, R4C, 4430), server_hostname=R4C) as s:
            assert ended_by_tunnel(s)
        t.wait_for(rf"(?s)(setsockopt IP_TRANSPARENT: Operation not permitted \(1\).*){{{n}}}")
    assert not net.plain[4].peers
    if impl == "pytunnel":
        assert "transparent = source needs CAP_NET_ADMIN" in t.log
        assert "every connection of this service will fail" in t.log  # said at start-up too
    t.stop()


# ------------------------------------------------------------------ destination


@pytest.mark.parametrize("family", [4, 6])
def test_destination_with_redirect(net: Net, router: RouterTunnels, impl: str, family: int) -> None:
    """Client mode: C asks for S's TLS port in plaintext; nft REDIRECT sends it to the tunnel,
    which TLS-connects to the original destination (SO_ORIGINAL_DST / IP6T_SO_ORIGINAL_DST)."""
    client, rtr, server = ADDRS[family]
    port = 4440 + family
    nfproto = "ipv4" if family == 4 else "ipv6"
    net.rules(
        f"""  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "vrc" meta nfproto {nfproto} tcp dport {TLS_PORT} redirect to :{port}
  }}"""
    )
    body = (
        f"[dst]\nclient = yes\naccept = {hostport(rtr, port)}\ntransparent = destination\n"
        f"verifyChain = yes\nCAfile = {net.certs / 'ca.pem'}\n"
    )
    t = router.start(router.conf(body), impl)
    with net.connect(family, server, TLS_PORT) as s:
        assert exchange(s, b"to wherever I meant\n") == b"to wherever I meant\n"
    peer = wait_peer(net.tls[family])
    assert peer[0] == (R4S if family == 4 else "fd61:2::1"), "the upstream leaves from the router"
    assert f"{server}:{TLS_PORT}" in t.log  # connected to the original destination
    t.stop()


@pytest.mark.parametrize(("name", "ok"), [(None, True), ("other.test", False)])
def test_destination_run_mode_checks_the_original_ip(
    net: Net, router: RouterTunnels, name: str | None, ok: bool
) -> None:
    """pytunnel only (stunnel has no `run` mode): `pytunnel run` verifies the server by default,
    against the original destination's IP address, or against checkHost when given."""
    net.rules(
        f"""  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "vrc" meta nfproto ipv4 tcp dport {TLS_PORT} redirect to :4443
  }}"""
    )
    body = (
        f"[dst]\nclient = yes\naccept = {hostport(R4C, 4443)}\ntransparent = destination\n"
        f"CAfile = {net.certs / 'ca.pem'}\n" + (f"checkHost = {name}\n" if name else "")
    )
    t = router.start(router.conf(body), "pytunnel", run_mode=True)
    if ok:
        with net.connect(4, S4, TLS_PORT) as s:
            assert exchange(s, b"verified\n") == b"verified\n"
    else:
        assert connection_ended(net, 4, S4, TLS_PORT)
        t.wait_for("CERT: Subject checks failed")
    t.stop()


def test_destination_without_redirect_fails_cleanly(net: Net, router: RouterTunnels, impl: str) -> None:
    """No rule sent the client here: there is no original destination (stunnel's error)."""
    body = f"[dst]\nclient = yes\naccept = {hostport(R4C, 4441)}\ntransparent = destination\n"
    t = router.start(router.conf(body), impl)
    for n in (1, 2):
        assert connection_ended(net, 4, R4C, 4441)
        t.wait_for(rf"(?s)(getsockopt SO_ORIGINAL_DST: No such file or directory \(2\).*){{{n}}}")
    t.stop()


def test_destination_not_redirected_with_conntrack_does_not_loop(
    net: Net, router: RouterTunnels, impl: str
) -> None:
    """With conntrack on (any nat rule), SO_ORIGINAL_DST of a direct connection is the
    listener itself: pytunnel refuses to connect to itself."""
    if impl == "stunnel4":
        stunnel4_lacks(
            "a guard against its own listening address: it takes that answer and connects to its "
            "own listener, again and again (observed: ~5000 connections in a second, then "
            "'INTERNAL ERROR: Uninitialized client session cache'): nothing to compare"
        )
    net.rules(
        """  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    iifname "vrc" tcp dport 1 redirect to :4441
  }"""
    )
    body = f"[dst]\nclient = yes\naccept = {hostport(R4C, 4441)}\ntransparent = destination\n"
    t = router.start(router.conf(body), impl)
    assert connection_ended(net, 4, R4C, 4441)
    t.wait_for("is this service's own listening address")
    assert t.log.count("accepted connection") == 1
    t.stop()


def _tproxy_rules(family: int, port: int) -> str:
    ip = "ip" if family == 4 else "ip6"
    nfproto = "ipv4" if family == 4 else "ipv6"
    return f"""  chain prerouting {{
    type filter hook prerouting priority mangle; policy accept;
    iifname "vrc" meta nfproto {nfproto} tcp dport {{ {PLAIN_PORT}, {TLS_PORT} }} tproxy {ip} to :{port} meta mark set 1 accept
  }}"""


@pytest.mark.parametrize("family", [4, 6])
def test_destination_with_tproxy(net: Net, router: RouterTunnels, impl: str, family: int) -> None:
    """Server mode: C speaks TLS to S's plain port; nft TPROXY hands the connection to the
    tunnel's (IP_TRANSPARENT) listener, whose accepted socket's local address is the
    original destination."""
    if impl == "stunnel4":
        stunnel4_lacks(STUNNEL_NO_TPROXY)
    _client, _rtr, server = ADDRS[family]
    port = 4450 + family
    net.rules(_tproxy_rules(family, port))
    listen = "0.0.0.0" if family == 4 else "::"
    body = (
        f"[dst]\naccept = {hostport(listen, port)}\ntransparent = destination\n"
        f"cert = {net.certs / 'server.pem'}\n"
    )
    t = router.start(router.conf(body), impl)
    with net.client_tls().wrap_socket(net.connect(family, server, PLAIN_PORT), server_hostname=server) as s:
        assert exchange(s, b"tproxied\n") == b"tproxied\n"
    assert wait_peer(net.plain[family])[0] == (R4S if family == 4 else R6S)
    assert "(TPROXY)" in t.log or "(SO_ORIGINAL_DST)" in t.log
    t.stop()


# ------------------------------------------------------------------ both


@pytest.mark.parametrize("family", [4, 6])
def test_both_with_tproxy(net: Net, router: RouterTunnels, impl: str, family: int) -> None:
    """Client mode: C's plaintext to S's TLS port is diverted by TPROXY; the tunnel
    TLS-connects to that original destination from C's own address and port."""
    if impl == "stunnel4":
        stunnel4_lacks(STUNNEL_NO_TPROXY)
    client, _rtr, server = ADDRS[family]
    port = 4460 + family
    net.rules(_tproxy_rules(family, port))
    listen = "0.0.0.0" if family == 4 else "::"
    body = f"[both]\nclient = yes\naccept = {hostport(listen, port)}\ntransparent = both\n"
    t = router.start(router.conf(body), impl)
    with net.connect(family, server, TLS_PORT) as s:
        assert exchange(s, b"fully transparent\n") == b"fully transparent\n"
        mine = s.getsockname()
    assert wait_peer(net.tls[family]) == (client, mine[1]), t.log
    t.stop()


@pytest.mark.parametrize("family", [4, 6])
def test_both_with_redirect(net: Net, router: RouterTunnels, impl: str, family: int) -> None:
    """Client mode with REDIRECT: the upstream from C's address to the original destination
    would have exactly the addresses of C's REDIRECTed connection, whose conntrack entry would
    capture it; pytunnel keeps C's address but takes an ephemeral port for it."""
    if impl == "stunnel4":
        stunnel4_lacks(
            "an ephemeral source port with REDIRECT: it binds the client's own port here too, so "
            "its upstream has the addresses of the client's REDIRECTed connection: conntrack treats "
            "it as that connection and the connect never completes (observed: 'TIMEOUTconnect exceeded')"
        )
    client, rtr, server = ADDRS[family]
    port = 4470 + family
    nfproto = "ipv4" if family == 4 else "ipv6"
    net.rules(
        f"""  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "vrc" meta nfproto {nfproto} tcp dport {TLS_PORT} redirect to :{port}
  }}"""
    )
    body = f"[both]\nclient = yes\naccept = {hostport(rtr, port)}\ntransparent = both\n"
    t = router.start(router.conf(body), impl)
    with net.connect(family, server, TLS_PORT) as s:
        assert exchange(s, b"redirected, both\n") == b"redirected, both\n"
        mine = s.getsockname()
    peer = wait_peer(net.tls[family])
    assert peer[0] == client and peer[1] != mine[1], t.log
    assert "bind succeeded on an ephemeral port" in t.log
    t.stop()
