"""TLS-PSK (``PSKsecrets``, ``PSKidentity``): stunnel's file format, and real handshakes
against stunnel4 both ways.  The handshakes need Python >= 3.13 (``set_psk_*_callback``):
pytunnel runs under ``.venv313`` (built by .ci/run) when the suite runs on 3.11."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import (
    Certs,
    EchoServer,
    TunnelFactory,
    need_py313,
    need_stunnel,
    pytunnel_cmd,
    roundtrip,
)

from tunnel.tls import TlsConfigError, read_psk_secrets

HEX_KEY = "00112233445566778899aabbccddeeff"  # 32 hex digits: a 16-byte key
TEXT_KEY = "correct horse battery staple"  # taken as its 28 bytes


def secrets(tmp_path: Path, body: str, name: str = "psk.txt") -> Path:
    path = tmp_path / name
    path.write_text(body)
    path.chmod(0o600)
    return path


# ------------------------------------------------------------------ the file format


def test_reader_decodes_hex_keys_and_keeps_order(tmp_path: Path) -> None:
    path = secrets(tmp_path, f"\nalice:{HEX_KEY}\nbob:{TEXT_KEY}\nalice:{'f' * 40}\nodd:{HEX_KEY}a\n")
    keys = read_psk_secrets(str(path))
    assert list(keys) == ["alice", "bob", "odd"]
    assert keys["alice"] == bytes.fromhex(HEX_KEY)  # the first line of a repeated identity wins
    assert keys["bob"] == TEXT_KEY.encode()
    assert keys["odd"] == f"{HEX_KEY}a".encode()  # an odd number of hex digits is text


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("nocolon\n", "line 1: Not in identity:key format"),
        (f"alice:{HEX_KEY}\nbob:short\n", "line 2: Key shorter than 16 bytes"),
        ("alice:0123456789abcdef\n", "line 1: Key shorter than 16 bytes"),  # hex: 8 bytes
        (f"alice:{'z' * 513}\n", "line 1: Key longer than 512 bytes"),
        (f"{'a' * 256}:{HEX_KEY}\n", "line 1: Identity longer than 256 characters"),
        ("\n\n", "holds no IDENTITY:KEY line"),
    ],
)
def test_reader_rejects_what_stunnel_rejects(
    tmp_path: Path, tunnels: TunnelFactory, body: str, message: str
) -> None:
    path = secrets(tmp_path, body)
    with pytest.raises(TlsConfigError, match=message):
        read_psk_secrets(str(path))
    if message.startswith("holds"):
        return  # stunnel 5.68 accepts an empty file (and then fails every handshake)
    conf = tunnels.conf(f"[x]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\nPSKsecrets = {path}\n")
    out = subprocess.run([need_stunnel(), str(conf)], capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert f"PSKsecrets {message}" in out.stderr + out.stdout


def test_stunnel_and_pytunnel_take_the_same_file(tmp_path: Path, tunnels: TunnelFactory) -> None:
    """Edge cases stunnel accepts (text key of 16 characters that look almost hex, spaces,
    CRLF line ends): pytunnel accepts them too."""
    path = secrets(tmp_path, f"ali ce : 0123456789abcdeX\r\nbob:{TEXT_KEY}\r\n")
    keys = read_psk_secrets(str(path))
    assert keys["ali ce "] == b" 0123456789abcdeX"
    conf = tunnels.conf(f"[x]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\nPSKsecrets = {path}\n")
    t = tunnels.start(conf, impl="stunnel4")
    assert "PSK identities: 2 retrieved" in t.log
    t.stop()


def test_config_check_names_the_python_it_needs(tmp_path: Path) -> None:
    path = secrets(tmp_path, f"alice:{HEX_KEY}\n")
    conf = tmp_path / "s.conf"
    conf.write_text(f"[x]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\nPSKsecrets = {path}\n")
    out = subprocess.run(pytunnel_cmd("check", str(conf)), capture_output=True, text=True, timeout=60)
    if sys.version_info < (3, 13):
        assert out.returncode == 1, out.stderr
        assert f"{conf}:4" in out.stderr
        assert "PSKsecrets" in out.stderr and "needs Python 3.13 or newer" in out.stderr
        assert f"this is Python {sys.version.split()[0]}" in out.stderr
    else:
        assert out.returncode == 0, out.stderr
    py = need_py313()  # and the same file passes on a Python that has TLS-PSK
    out = subprocess.run(
        pytunnel_cmd("check", str(conf), python=py), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr  # a server needs no certificate with PSKsecrets
    assert "TLS:PSK,SNI" in out.stderr


def test_unknown_psk_identity_is_a_config_error(tmp_path: Path) -> None:
    py = need_py313()
    path = secrets(tmp_path, f"alice:{HEX_KEY}\n")
    conf = tmp_path / "c.conf"
    conf.write_text(
        f"[x]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:9\n"
        f"PSKsecrets = {path}\nPSKidentity = carol\n"
    )
    out = subprocess.run(
        pytunnel_cmd("check", str(conf), python=py), capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1
    assert "No key found for the specified PSK identity 'carol'" in out.stderr
    assert f"{conf}" in out.stderr


# ------------------------------------------------------------------ handshakes


def pair(
    tunnels: TunnelFactory,
    echo: EchoServer,
    client_impl: str,
    server_impl: str,
    client_psk: Path,
    server_psk: Path,
    client_extra: str = "",
    server_extra: str = "",
) -> tuple[int, object, object]:
    py = need_py313()
    server_conf = tunnels.conf(
        f"[psk-server]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\n"
        f"PSKsecrets = {server_psk}\n{server_extra}"
    )
    server = tunnels.start(
        server_conf, impl=server_impl, python=py, extra_env={"PYTUNNEL_CERT_RELOAD_INTERVAL": "1"}
    )
    client_conf = tunnels.conf(
        f"[psk-client]\nclient = yes\naccept = 127.0.0.1:0\n"
        f"connect = 127.0.0.1:{server.port('psk-server')}\nPSKsecrets = {client_psk}\n{client_extra}"
    )
    client = tunnels.start(client_conf, impl=client_impl, python=py)
    return client.port("psk-client"), client, server


PAIRS = [("pytunnel", "stunnel4"), ("stunnel4", "pytunnel"), ("pytunnel", "pytunnel")]


@pytest.mark.parametrize(("client_impl", "server_impl"), PAIRS)
@pytest.mark.parametrize("version", ["TLSv1.3", "TLSv1.2"])
def test_psk_handshake_with_stunnel4_both_ways(
    tmp_path: Path, tunnels: TunnelFactory, echo: EchoServer, client_impl: str, server_impl: str, version: str
) -> None:
    need_stunnel()
    server_psk = secrets(tmp_path, f"alice:{HEX_KEY}\nbob:{TEXT_KEY}\n", "server.txt")
    client_psk = secrets(tmp_path, f"bob:{TEXT_KEY}\n", "client.txt")
    port, client, server = pair(
        tunnels, echo, client_impl, server_impl, client_psk, server_psk,
        client_extra=f"sslVersionMax = {version}\n",
    )  # fmt: skip
    payload = os.urandom(200_000)
    assert roundtrip(port, payload) == payload
    client.wait_for(r'PSK client configured for identity "bob"')  # type: ignore[attr-defined]
    server.wait_for(r'Key configured for PSK identity "bob"')  # type: ignore[attr-defined]
    if server_impl == "pytunnel":
        server.wait_for(rf"Connection closed: {len(payload)} byte\(s\) sent to TLS")  # type: ignore[attr-defined]
    if client_impl == "pytunnel":
        client.wait_for(r"TLS connected: new session negotiated")  # type: ignore[attr-defined]
    if "stunnel4" in (client_impl, server_impl):
        peer = server if server_impl == "stunnel4" else client
        suite = peer.wait_for(rf"{version} ciphersuite: (\S+)").group(1)  # type: ignore[attr-defined]
        assert "PSK" in suite or version == "TLSv1.3"


@pytest.mark.parametrize(("client_impl", "server_impl"), PAIRS)
def test_psk_identity_selects_the_key(
    tmp_path: Path, tunnels: TunnelFactory, echo: EchoServer, client_impl: str, server_impl: str
) -> None:
    """PSKidentity picks a line other than the first; both ends agree on the hex-decoded key."""
    need_stunnel()
    both = secrets(tmp_path, f"bob:{TEXT_KEY}\nalice:{HEX_KEY}\n")
    port, client, server = pair(
        tunnels, echo, client_impl, server_impl, both, both, client_extra="PSKidentity = alice\n"
    )
    assert roundtrip(port, b"x" * 1000) == b"x" * 1000
    server.wait_for(r'Key configured for PSK identity "alice"')  # type: ignore[attr-defined]


@pytest.mark.parametrize(("client_impl", "server_impl"), PAIRS)
@pytest.mark.parametrize("fault", ["unknown identity", "wrong key"])
def test_bad_psk_fails_that_connection_only(
    tmp_path: Path,
    tunnels: TunnelFactory,
    echo: EchoServer,
    client_impl: str,
    server_impl: str,
    fault: str,
) -> None:
    need_stunnel()
    py = need_py313()
    server_psk = secrets(tmp_path, f"alice:{HEX_KEY}\n", "server.txt")
    bad = f"carol:{HEX_KEY}\n" if fault == "unknown identity" else f"alice:{'ee' * 16}\n"
    bad_psk = secrets(tmp_path, bad, "bad.txt")
    port, bad_client, server = pair(tunnels, echo, client_impl, server_impl, bad_psk, server_psk)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"hello")
        try:
            got = s.recv(100)
        except ConnectionResetError:
            got = b""
    assert got == b""
    if server_impl == "pytunnel":
        line = server.wait_for(r"LOG3\[\d+\]: SSL_accept: .*")  # type: ignore[attr-defined]
        if fault == "unknown identity":
            server.wait_for(r"PSK identity not found \(session resumption\?\)")  # type: ignore[attr-defined]
        assert "Traceback" not in server.log  # type: ignore[attr-defined]
        assert len(line.group(0).splitlines()) == 1
    # the server goes on serving a client with the right key
    good_psk = secrets(tmp_path, f"alice:{HEX_KEY}\n", "good.txt")
    good_conf = tunnels.conf(
        f"[good]\nclient = yes\naccept = 127.0.0.1:0\n"
        f"connect = 127.0.0.1:{server.port('psk-server')}\nPSKsecrets = {good_psk}\n"  # type: ignore[attr-defined]
    )
    good = tunnels.start(good_conf, impl=client_impl, python=py)
    assert roundtrip(good.port("good"), b"still serving") == b"still serving"


def test_server_with_cert_and_psk_serves_both_kinds_of_client(
    tmp_path: Path, tunnels: TunnelFactory, echo: EchoServer, certs: Certs
) -> None:
    """A server with a certificate and PSKsecrets: PSK clients use the key, certificate
    clients (no PSKsecrets) verify the certificate, as with stunnel."""
    py = need_py313()
    psk = secrets(tmp_path, f"alice:{HEX_KEY}\n")
    server_conf = tunnels.conf(
        f"[s]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\ncert = {certs.server_pem}\nPSKsecrets = {psk}\n"
    )
    server = tunnels.start(server_conf, python=py)
    port = server.port("s")
    client_conf = tunnels.conf(
        f"[k]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{port}\nPSKsecrets = {psk}\n"
        f"[c]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{port}\n"
        f"verifyChain = yes\nCAfile = {certs.ca_pem}\ncheckHost = localhost\n"
    )
    client = tunnels.start(client_conf, python=py)
    assert roundtrip(client.port("k"), b"by key") == b"by key"
    assert roundtrip(client.port("c"), b"by certificate") == b"by certificate"
    assert server.log.count('Key configured for PSK identity "alice"') == 1


def test_psk_client_in_secure_mode_needs_no_certificate(
    tmp_path: Path, tunnels: TunnelFactory, echo: EchoServer
) -> None:
    """`pytunnel run` verifies upstream certificates by default; a PSK service has none to
    verify (the key authenticates the server), so it must not demand one."""
    py = need_py313()
    psk = secrets(tmp_path, f"alice:{HEX_KEY}\n")
    server = tunnels.start(
        tunnels.conf(f"[s]\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{echo.port}\nPSKsecrets = {psk}\n"),
        python=py,
    )
    client = tunnels.start(
        tunnels.conf(
            f"[c]\nclient = yes\naccept = 127.0.0.1:0\nconnect = 127.0.0.1:{server.port('s')}\n"
            f"PSKsecrets = {psk}\n"
        ),
        mode="run",
        python=py,
    )
    assert roundtrip(client.port("c"), b"secure") == b"secure"
    assert "needs authentication to prevent MITM" not in client.log


def test_changed_psk_file_is_reloaded_without_a_restart(
    tmp_path: Path, tunnels: TunnelFactory, echo: EchoServer
) -> None:
    """PSKsecrets is watched like a certificate (--cert-reload-interval): a rotated key is
    used by new connections without SIGHUP."""
    need_py313()
    server_psk = secrets(tmp_path, f"alice:{HEX_KEY}\n", "server.txt")
    new_key = "0f" * 16
    client_psk = secrets(tmp_path, f"alice:{new_key}\n", "client.txt")
    port, _client, server = pair(tunnels, echo, "pytunnel", "pytunnel", client_psk, server_psk)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"x")
        try:
            got = s.recv(10)
        except ConnectionResetError:
            got = b""
        assert got == b""  # the old key on the server: refused
    server_psk.write_text(f"alice:{new_key}\n")
    server.wait_for(r"certificates reloaded", timeout=20)  # type: ignore[attr-defined]
    assert roundtrip(port, b"rotated") == b"rotated"
