"""ACME on a running pytunnel (pytunnel extension; stunnel has no ACME): the tls-alpn-01
window, ``--workers 2`` and SIGHUP reloads, against Debian's ``pebble`` (fixtures in
test_acme.py).

* During a pending validation only a client offering ``acme-tls/1`` sees the challenge
  certificate; a normal client sending the same server name is served the issued certificate
  and its own ALPN choice.  The window is driven directly: the challenge file an order
  publishes (``ACMEdir/SERVICE/tls-alpn-01/DOMAIN.pem``) is written by the test.
* With two workers, either worker answers a validation, one worker renews, and both serve
  the renewed certificate.
* A reload that adds an ACMEdomain gets a certificate covering it at once; one that moves
  ACMEdirectory orders from the new server; one that drops ACME stops the renewals.
"""

from __future__ import annotations

import re
import signal
import socket
import ssl
import time
from pathlib import Path

import pytest
from conftest import Certs, EchoServer, Tunnel, TunnelFactory, wait_until
from cryptography import x509
from test_acme import DOMAIN, Pebble, pebble, served_cert, short_pebble  # noqa: F401 - fixtures

from tunnel.acme import ID_PE_ACME_IDENTIFIER, alpn_challenge_cert

ACME_ID = x509.ObjectIdentifier(ID_PE_ACME_IDENTIFIER)


def body(p: Pebble, echo: EchoServer, state: Path, *, domains: tuple[str, ...] = (DOMAIN,), extra: str = "",
         directory: str | None = None, head: str = "") -> str:  # fmt: skip
    names = "".join(f"ACMEdomain = {d}\n" for d in domains)
    return (
        f"{head}[site]\naccept = 127.0.0.1:{p.tls_port}\nconnect = 127.0.0.1:{echo.port}\n"
        f"ACMEdirectory = {directory or p.directory}\n{names}ACMECAfile = {p.ca_file}\n"
        f"ACMEdir = {state}\n{extra}"
    )


def launch(tunnels: TunnelFactory, text: str, workers: int = 1) -> tuple[Tunnel, Path]:
    conf = tunnels.conf(text)
    env = {"PYTUNNEL_STATUS": "127.0.0.1:0", "PYTUNNEL_CERT_RELOAD_INTERVAL": "1"}
    if workers > 1:
        env["PYTUNNEL_WORKERS"] = str(workers)
    t = tunnels.start(conf, mode="run", extra_env=env)
    if workers > 1:
        t.wait_for(f"All {workers} workers accept connections", timeout=30)
    return t, conf


def handshake(
    port: int, name: str, offer: list[str] | None, tls12: bool = False
) -> tuple[x509.Certificate, str | None]:
    """A client that verifies nothing: the certificate it was shown and the ALPN chosen."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    if offer:
        ctx.set_alpn_protocols(offer)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=15) as raw,
        ctx.wrap_socket(raw, server_hostname=name) as s,
    ):
        der = s.getpeercert(binary_form=True)
        chosen = s.selected_alpn_protocol()
    assert der is not None
    return x509.load_der_x509_certificate(der), chosen


def is_challenge(cert: x509.Certificate) -> bool:
    try:
        return cert.extensions.get_extension_for_oid(ACME_ID).critical
    except x509.ExtensionNotFound:
        return False


def publish(state: Path, domain: str) -> Path:
    """What an order's tls-alpn-01 step writes while the ACME server validates."""
    folder = state / "site" / "tls-alpn-01"
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / f"{domain}.pem"
    path.write_bytes(alpn_challenge_cert(domain, "token.thumbprint"))
    path.chmod(0o600)
    return path


def sans(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return sorted(ext.get_values_for_type(x509.DNSName))


@pytest.mark.parametrize("setup", ["one-process", "two-workers-with-alpn"])
def test_only_acme_tls_clients_see_the_challenge(
    tunnels: TunnelFactory,
    pebble: Pebble,  # noqa: F811 - the fixture
    echo: EchoServer,
    tmp_path: Path,
    setup: str,
) -> None:
    workers, alpn = (1, None) if setup == "one-process" else (2, "http/1.1")
    state = tmp_path / "state"
    extra = f"alpn = {alpn}\n" if alpn else ""
    t, _ = launch(tunnels, body(pebble, echo, state, extra=extra, head="logId = process\n"), workers)
    t.wait_for(r"ACME certificate (obtained|loaded)")
    roots = pebble.roots()
    issued = served_cert(pebble.tls_port, roots)
    port = pebble.tls_port
    challenge = publish(state, DOMAIN)  # the validation window is open

    for tls12 in (False, True):
        cert, chosen = handshake(port, DOMAIN, ["acme-tls/1"], tls12)
        assert is_challenge(cert) and sans(cert) == [DOMAIN] and chosen == "acme-tls/1"
    # a normal client with the pending name: the issued certificate, its own ALPN, its data
    assert served_cert(port, roots).serial_number == issued.serial_number
    cert, chosen = handshake(port, DOMAIN, ["h2", "http/1.1"])
    assert cert.serial_number == issued.serial_number and chosen == alpn
    # acme-tls/1 for a name that is not pending: no challenge
    cert, chosen = handshake(port, "other.test", ["acme-tls/1", "http/1.1"])
    assert not is_challenge(cert) and chosen == alpn
    if workers > 1:  # either worker answers: the file is shared
        for _ in range(30):
            assert is_challenge(handshake(port, DOMAIN, ["acme-tls/1"])[0])
        answered = set(re.findall(r"LOG5\[(\d+)\]: .*ACME: tls-alpn-01 validation answered", t.log))
        assert len(answered) == 2, t.log
    challenge.unlink()  # the window closes
    if alpn is None:
        cert, chosen = handshake(port, DOMAIN, ["acme-tls/1"])
        assert cert.serial_number == issued.serial_number and chosen is None
    else:
        with pytest.raises(ssl.SSLError, match="NO_APPLICATION_PROTOCOL|no application protocol"):
            handshake(port, DOMAIN, ["acme-tls/1"])
    assert "ACME: tls-alpn-01 validation answered" in t.log
    assert t.stop() == 0


@pytest.mark.parametrize("challenge", ["tls-alpn-01", "http-01"])
def test_two_workers_one_renews_both_swap(
    tunnels: TunnelFactory,
    short_pebble: Pebble,  # noqa: F811 - the fixture
    echo: EchoServer,
    tmp_path: Path,
    challenge: str,
) -> None:
    """24-second certificates with --workers 2: worker 0 alone orders (tls-alpn-01 reaches
    whichever worker the kernel picks; one ACMEhttp listener for http-01), and every worker
    serves the renewed certificate."""
    p = short_pebble
    extra = f"ACMEchallenge = http-01\nACMEhttp = 127.0.0.1:{p.http_port}\n" if challenge == "http-01" else ""
    t, _ = launch(
        tunnels, body(p, echo, tmp_path / "state", extra=extra, head="logId = process\n"), workers=2
    )
    t.wait_for(r"ACME certificate obtained")
    roots = p.roots()
    first = served_cert(p.tls_port, roots).serial_number
    t.wait_for(r"ACME certificate renewed", timeout=60)

    def all_renewed() -> bool:
        return all(served_cert(p.tls_port, roots).serial_number != first for _ in range(12))

    wait_until(all_renewed, 20, "both workers serve the renewed certificate")
    served = set(re.findall(r"LOG5\[(\d+)\]: Service \[site\] accepted connection", t.log))
    assert len(served) == 2, "both workers took connections"
    t.wait_for(r"ACME certificate renewed(.|\n)*ACME certificate renewed", timeout=60)
    # one process renews: renewals come 2/3 of a 24-second lifetime apart, never in pairs
    stamps = re.findall(r"^(\S+ \S+) LOG5\[ui\]: Service \[site\]: ACME certificate renewed", t.log, re.M)
    times = [time.mktime(time.strptime(s, "%Y.%m.%d %H:%M:%S")) for s in stamps]
    assert all(b - a >= 8 for a, b in zip(times, times[1:], strict=False)), t.log
    assert "ACME renewal failed" not in t.log, t.log
    assert t.stop() == 0


def test_reload_follows_the_acme_options(
    tunnels: TunnelFactory,
    pebble: Pebble,  # noqa: F811 - the fixture
    echo: EchoServer,
    certs: Certs,
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    t, conf = launch(tunnels, body(pebble, echo, state))
    t.wait_for(r"ACME certificate obtained")
    roots = pebble.roots()
    assert sans(served_cert(pebble.tls_port, roots)) == [DOMAIN]

    # a new ACMEdomain: ordered on the live port right after the reload
    www = f"www.{DOMAIN}"
    conf.write_text(
        conf.read_text().replace(f"ACMEdomain = {DOMAIN}\n", f"ACMEdomain = {DOMAIN}\nACMEdomain = {www}\n")
    )
    t.signal(signal.SIGHUP)
    t.wait_for(f"ordering a new certificate now: it does not cover {re.escape(www)}", timeout=20)
    t.wait_for(r"ACME certificate renewed", timeout=60)
    wait_until(lambda: sans(served_cert(pebble.tls_port, roots)) == sorted([DOMAIN, www]), 20, "the new SAN")
    ctx = ssl.create_default_context(cadata=roots.decode())  # verified for the new name
    with (
        socket.create_connection(("127.0.0.1", pebble.tls_port), timeout=15) as raw,
        ctx.wrap_socket(raw, server_hostname=www) as s,
    ):
        s.sendall(b"www")
        assert s.recv(10) == b"www"

    # another ACMEdirectory (the same pebble by another URL): a certificate from it
    other = pebble.directory.replace("127.0.0.1", "localhost")
    conf.write_text(
        conf.read_text().replace(f"ACMEdirectory = {pebble.directory}", f"ACMEdirectory = {other}")
    )
    t.signal(signal.SIGHUP)
    t.wait_for(f"it was issued by {re.escape(pebble.directory)}", timeout=20)
    wait_until(lambda: t.log.count("ACME certificate renewed") >= 2, 60, "the second order")

    # no ACME any more: the renewal task stops
    lines = [ln for ln in conf.read_text().splitlines() if not ln.startswith("ACME")]
    plain = state / "site" / "plain.pem"  # inside what the Landlock sandbox of `run` allows
    plain.write_bytes(Path(certs.server_pem).read_bytes())
    conf.write_text("\n".join(lines) + f"\ncert = {plain}\n")
    t.signal(signal.SIGHUP)
    t.wait_for(r"Service \[site\]: ACME renewal stopped \(the service's ACME options removed\)", timeout=20)
    assert "ACME renewal failed" not in t.log, t.log
    assert t.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_reload_turns_acme_on_for_a_listening_port(
    tunnels: TunnelFactory,
    pebble: Pebble,  # noqa: F811 - the fixture
    echo: EchoServer,
    certs: Certs,
    tmp_path: Path,
    workers: int,
) -> None:
    """A service that had a cert file turns ACME on by SIGHUP: the first certificate is
    ordered before the reload completes, validated on the port already listening (whichever
    worker the kernel picks), and then served; no placeholder is ever served."""
    head = "sandbox = no\n"  # the reload adds a state directory the start-up sandbox lacks
    t, conf = launch(
        tunnels,
        f"{head}[site]\naccept = 127.0.0.1:{pebble.tls_port}\nconnect = 127.0.0.1:{echo.port}\n"
        f"cert = {certs.server_pem}\n",
        workers,
    )
    roots = pebble.roots()
    conf.write_text(conf.read_text().split("[site]")[0] + body(pebble, echo, tmp_path / "state"))
    t.signal(signal.SIGHUP)
    t.wait_for(r"ACME certificate obtained", timeout=60)
    wait_until(lambda: t.log.count("Configuration successful") >= 1 + workers, 60, "every process reloaded")
    for _ in range(10):  # either worker
        assert "Pebble Intermediate CA" in served_cert(pebble.tls_port, roots).issuer.rfc4514_string()
    assert "ACME renewal failed" not in t.log and "Configuration failed" not in t.log, t.log
    # the validation reached the old (certificate file) service's context: closed, never relayed
    assert "ACME: tls-alpn-01 validation answered" in t.log, t.log
    assert t.stop() == 0


def test_acme_tls_1_is_reserved(tunnels: TunnelFactory, certs: Certs) -> None:
    conf = tunnels.conf(
        f"[site]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:1\ncert = {certs.server_pem}\n"
        "alpn = h2,acme-tls/1\n"
    )
    t = tunnels.start(conf, mode="run", wait=False)
    assert t.proc.wait(timeout=60) == 1
    assert "acme-tls/1 is reserved for ACME's tls-alpn-01 validation (RFC 8737)" in t.log, t.log
