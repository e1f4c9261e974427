"""ACME (pytunnel extension) against Debian's ``pebble`` with real challenge validation on
loopback: ``pebble-challtestsrv`` is the DNS server that points the test names at 127.0.0.1,
pebble validates tls-alpn-01 on the service's own accept port (its ``tlsPort``) or http-01
on ``ACMEhttp`` (its ``httpPort``), and the issued chain ends at pebble's generated root.

Scenarios: issue on first start, serve the issued certificate, reuse it on restart without
asking pebble, renew short-lived certificates in the background with the hot swap, survive a
pebble outage (renewal failures counted, the old certificate keeps serving), and give up with
exit status 3 when no certificate can be had.  stunnel has no ACME: pytunnel only.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from conftest import Certs, EchoServer, Tunnel, TunnelFactory, need_tool
from cryptography import x509
from identity_support import wait_metric
from loopback_support import free_port, wait_port

DOMAIN = "acme.test"


@dataclass
class Pebble:
    directory: str
    ca_file: Path  # trust for pebble's HTTPS API
    mgmt: int
    tls_port: int  # where pebble validates tls-alpn-01: the service's accept port
    http_port: int  # where pebble validates http-01: ACMEhttp
    proc: subprocess.Popen[bytes] | None
    argv: list[str]
    env: dict[str, str]
    log: Path

    def roots(self) -> bytes:
        """pebble's generated root (the issued chains end there)."""
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        with urllib.request.urlopen(f"https://127.0.0.1:{self.mgmt}/roots/0", context=ctx, timeout=10) as r:
            return bytes(r.read())

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def start(self) -> None:
        with open(self.log, "ab") as out:  # the child keeps its own descriptor
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        wait_port(int(self.directory.split(":")[2].split("/")[0]), self.proc, "pebble")


@pytest.fixture
def pebble(tmp_path: Path) -> Iterator[Pebble]:
    """pebble + pebble-challtestsrv on loopback; certificates valid for ``validity`` seconds."""
    yield from _pebble(tmp_path, validity=3600)


@pytest.fixture
def short_pebble(tmp_path: Path) -> Iterator[Pebble]:
    yield from _pebble(tmp_path, validity=24)


@pytest.fixture
def reusing_pebble(tmp_path: Path) -> Iterator[Pebble]:
    """A pebble that hands every new order the valid authorizations of earlier ones (as Let's
    Encrypt does for 30 days); the other fixtures set that to 0 %."""
    yield from _pebble(tmp_path, validity=3600, authz_reuse=100)


def _pebble(tmp_path: Path, validity: int, authz_reuse: int = 0) -> Iterator[Pebble]:
    binary, challtest = need_tool("pebble"), need_tool("pebble-challtestsrv", "pebble")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "pebble-ca.pem"))
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "pebble-cert.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "pebble-key.pem"))
    api, mgmt, dns, cmgmt = free_port(), free_port(), free_port(), free_port()
    tls_port, http_port = free_port(), free_port()
    config = {
        "pebble": {
            "listenAddress": f"127.0.0.1:{api}",
            "managementListenAddress": f"127.0.0.1:{mgmt}",
            "certificate": str(tmp_path / "pebble-cert.pem"),
            "privateKey": str(tmp_path / "pebble-key.pem"),
            "httpPort": http_port,
            "tlsPort": tls_port,
            "ocspResponderURL": "",
            "externalAccountBindingRequired": False,
            "certificateValidityPeriod": validity,
        }
    }
    (tmp_path / "pebble.json").write_text(json.dumps(config))
    log = tmp_path / "pebble.log"
    dns_proc = subprocess.Popen(
        [challtest, "-dns01", f"127.0.0.1:{dns}", "-http01", "", "-https01", "", "-tlsalpn01", "",
         "-management", f"127.0.0.1:{cmgmt}", "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""],
        stdout=open(tmp_path / "challtestsrv.log", "wb"), stderr=subprocess.STDOUT,  # noqa: SIM115
    )  # fmt: skip
    env = dict(
        os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0", PEBBLE_AUTHZREUSE=str(authz_reuse)
    )
    argv = [binary, "-config", str(tmp_path / "pebble.json"), "-dnsserver", f"127.0.0.1:{dns}"]
    p = Pebble(
        f"https://127.0.0.1:{api}/dir",
        tmp_path / "pebble-ca.pem",
        mgmt,
        tls_port,
        http_port,
        None,
        argv,
        env,
        log,
    )
    try:
        wait_port(cmgmt, dns_proc, "pebble-challtestsrv")
        p.start()
        yield p
    finally:
        p.stop()
        dns_proc.terminate()
        dns_proc.wait(timeout=10)


def acme_conf(tunnels: TunnelFactory, p: Pebble, echo: EchoServer, state: Path, extra: str = "") -> Path:
    return tunnels.conf(
        f"[site]\naccept = 127.0.0.1:{p.tls_port}\nconnect = 127.0.0.1:{echo.port}\n"
        f"ACMEdirectory = {p.directory}\nACMEdomain = {DOMAIN}\nACMEemail = ops@example.org\n"
        f"ACMECAfile = {p.ca_file}\nACMEdir = {state}\n{extra}"
    )


def served_cert(port: int, roots: bytes, data: bytes = b"acme") -> x509.Certificate:
    """Connect as a client that trusts pebble's root only, for DOMAIN: the leaf it was shown."""
    ctx = ssl.create_default_context(cadata=roots.decode())
    raw = socket.create_connection(("127.0.0.1", port), timeout=15)
    with ctx.wrap_socket(raw, server_hostname=DOMAIN) as s:
        s.sendall(data)
        assert s.recv(100) == data
        der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def start(tunnels: TunnelFactory, conf: Path, mode: str = "run") -> Tunnel:
    return tunnels.start(
        conf, mode=mode, extra_env={"PYTUNNEL_STATUS": "127.0.0.1:0", "PYTUNNEL_CERT_RELOAD_INTERVAL": "1"}
    )


@pytest.mark.parametrize("mode", ["run", "compat"])
def test_issue_serve_and_restart_with_the_stored_certificate(
    tunnels: TunnelFactory, pebble: Pebble, echo: EchoServer, tmp_path: Path, mode: str
) -> None:
    state = tmp_path / "acme-state"
    conf = acme_conf(tunnels, pebble, echo, state)
    t = start(tunnels, conf, mode)
    t.wait_for(r"ACME certificate obtained in [\d.]+ s")
    roots = pebble.roots()
    cert = served_cert(pebble.tls_port, roots)
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    ) == [DOMAIN]
    assert "Pebble Intermediate CA" in cert.issuer.rfc4514_string()
    assert wait_metric(t, "pytunnel_acme_renewals_total", 1, service="site", result="success") == 1
    assert (
        wait_metric(
            t, "pytunnel_cert_not_after_seconds", 1, service="site", cert=str(state / "site" / "cert.pem")
        )
        > time.time()
    )
    assert (state / "site").stat().st_mode & 0o777 == 0o700
    for name in ("cert.pem", "account.key"):
        assert (state / "site" / name).stat().st_mode & 0o777 == 0o600
    assert t.stop() == 0
    pebble.stop()  # a stored, still valid certificate needs no ACME server
    again = start(tunnels, conf, mode)
    again.wait_for(r"ACME certificate loaded from ")
    assert served_cert(pebble.tls_port, roots).serial_number == cert.serial_number


def test_http_01(tunnels: TunnelFactory, pebble: Pebble, echo: EchoServer, tmp_path: Path) -> None:
    conf = acme_conf(
        tunnels,
        pebble,
        echo,
        tmp_path / "state",
        f"ACMEchallenge = http-01\nACMEhttp = 127.0.0.1:{pebble.http_port}\n",
    )
    t = start(tunnels, conf)
    t.wait_for(r"ACME certificate obtained")
    served_cert(pebble.tls_port, pebble.roots())


def test_renewal_hot_swaps_and_survives_an_outage(
    tunnels: TunnelFactory, short_pebble: Pebble, echo: EchoServer, tmp_path: Path
) -> None:
    """24-second certificates: renewed at two thirds (16 s) on the live port; a connection
    held open across the swap keeps working; while pebble is down the renewal fails, is
    counted and retried, and the old certificate keeps serving."""
    p = short_pebble
    t = start(tunnels, acme_conf(tunnels, p, echo, tmp_path / "state"))
    t.wait_for(r"ACME certificate obtained")
    roots = p.roots()
    first = served_cert(p.tls_port, roots)
    ctx = ssl.create_default_context(cadata=roots.decode())
    held = ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", p.tls_port), timeout=30), server_hostname=DOMAIN
    )
    held.sendall(b"before")
    assert held.recv(100) == b"before"
    t.wait_for(r"ACME certificate renewed", timeout=40)
    deadline = time.monotonic() + 15
    while served_cert(p.tls_port, roots).serial_number == first.serial_number:  # the watcher swaps
        assert time.monotonic() < deadline, t.log
        time.sleep(0.2)
    held.sendall(b"after the swap")
    assert held.recv(100) == b"after the swap"
    held.close()
    p.stop()
    t.wait_for(r"ACME renewal failed \(retry in", timeout=60)
    assert wait_metric(t, "pytunnel_acme_renewals_total", 1, service="site", result="failure") >= 1
    served_cert(p.tls_port, roots)  # the old certificate still serves
    p.start()
    renewed = t.log.count("ACME certificate renewed")
    deadline = time.monotonic() + 60
    while t.log.count("ACME certificate renewed") == renewed:
        assert time.monotonic() < deadline, t.log
        time.sleep(0.2)


def test_a_new_order_skips_authorizations_already_valid(
    tunnels: TunnelFactory, reusing_pebble: Pebble, echo: EchoServer, tmp_path: Path
) -> None:
    """A reload adds an ACMEdomain: the new order comes back with DOMAIN's authorization valid
    already; only the new name's challenge is answered (posting a valid one is an error)."""
    pebble = reusing_pebble
    conf = acme_conf(
        tunnels,
        pebble,
        echo,
        tmp_path / "state",
    )
    t = start(tunnels, conf)
    t.wait_for(r"ACME certificate obtained")
    www = f"www.{DOMAIN}"
    conf.write_text(
        conf.read_text().replace(f"ACMEdomain = {DOMAIN}\n", f"ACMEdomain = {DOMAIN}\nACMEdomain = {www}\n")
    )
    t.signal(signal.SIGHUP)
    t.wait_for(r"ACME certificate renewed", timeout=60)
    assert "ACME renewal failed" not in t.log, t.log
    roots = pebble.roots()

    def names() -> list[str]:
        served = served_cert(pebble.tls_port, roots)
        san = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        return sorted(san.get_values_for_type(x509.DNSName))

    deadline = time.monotonic() + 20  # the certificate watcher swaps the renewed file in
    while names() != sorted([DOMAIN, www]):
        assert time.monotonic() < deadline, t.log
        time.sleep(0.2)
    # pebble reused the first order's authorization: one challenge was posted for two names
    assert pebble.log.read_text().count("set VALID by completed challenge") == 2
    assert t.stop() == 0


def test_a_stored_account_under_another_url_is_registered_again(
    tunnels: TunnelFactory, pebble: Pebble, echo: EchoServer, tmp_path: Path
) -> None:
    """The account is stored by the URL the server gave; the same server reached by another
    name (ACMEdirectory changed from 127.0.0.1 to localhost) refuses that URL as the JWS key
    id. pytunnel registers the key again under the new name instead of failing the order."""
    state = tmp_path / "state"
    t = start(tunnels, acme_conf(tunnels, pebble, echo, state))
    t.wait_for(r"ACME certificate obtained")
    assert t.stop() == 0
    stored = state / "site" / "account.json"
    (url,) = json.loads(stored.read_text()).values()
    assert url.startswith("https://127.0.0.1:")
    by_name = pebble.directory.replace("127.0.0.1", "localhost")
    stored.write_text(json.dumps({by_name: url}))  # the old URL, now filed under the new name
    (state / "site" / "cert.pem").unlink()
    conf = acme_conf(tunnels, pebble, echo, state)
    conf.write_text(
        conf.read_text().replace(f"ACMEdirectory = {pebble.directory}", f"ACMEdirectory = {by_name}")
    )
    again = start(tunnels, conf)
    again.wait_for(r"ACME certificate obtained")
    assert json.loads(stored.read_text())[by_name].startswith("https://localhost:")
    assert again.stop() == 0


def test_no_certificate_exits_3(
    tunnels: TunnelFactory, pebble: Pebble, echo: EchoServer, tmp_path: Path
) -> None:
    pebble.stop()
    conf = acme_conf(tunnels, pebble, echo, tmp_path / "state", "ACMEtimeout = 5\n")
    t = tunnels.start(conf, mode="run", wait=False)
    assert t.proc.wait(timeout=60) == 3
    assert f"Service [site]: ACME: no certificate from {pebble.directory} within 5 s" in t.log, t.log


def test_options_are_checked(tunnels: TunnelFactory, certs: Certs) -> None:
    conf = tunnels.conf(
        "[site]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:1\nACMEdirectory = https://acme.example/dir\n"
        f"cert = {certs.server_pem}\nACMEchallenge = http-01\n"
    )
    t = tunnels.start(conf, mode="run", wait=False)
    assert t.proc.wait(timeout=60) == 1
    for text in ("cert/key must not be set", "needs at least one ACMEdomain", "http-01 needs ACMEhttp"):
        assert text in t.log, t.log


def test_acme_in_a_chroot_is_refused(tunnels: TunnelFactory, tmp_path: Path) -> None:
    """Renewals could not reach ACMEdir, ACMECAfile or the resolver from inside the jail."""
    conf = tunnels.conf(
        f"chroot = {tmp_path}\n[site]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:1\n"
        "ACMEdirectory = https://acme.example/dir\nACMEdomain = acme.test\n"
    )
    t = tunnels.start(conf, mode="run", wait=False)
    assert t.proc.wait(timeout=60) == 1
    assert f"Service [site]: ACMEdirectory cannot renew inside chroot = {tmp_path}" in t.log, t.log
    assert "ACMEdirectory = https://acme.example/dir" in t.log, t.log  # the line it names
