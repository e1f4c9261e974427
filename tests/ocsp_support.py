"""The throwaway PKI and the real ``openssl ocsp`` responders the OCSP tests share
(tests/test_ocsp.py, test_ocsp_tunnel.py, test_stapling.py): a root, intermediates, leaves
good, revoked and unknown to the responders, each leaf's AIA naming its responder."""

from __future__ import annotations

import datetime
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, NameOID

OPENSSL = shutil.which("openssl")

NOW = datetime.datetime.now(datetime.UTC)
Key = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


# ------------------------------------------------------------------ the PKI


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "pytunnel test"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _issue(
    cn: str,
    key: Key,
    issuer: x509.Certificate | None,
    issuer_key: Key | None,
    *,
    ca: bool = False,
    serial: int | None = None,
    aia: str | None = None,
    eku: list[x509.ObjectIdentifier] | None = None,
    san: str | None = None,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer.subject if issuer else _name(cn))
        .public_key(key.public_key())
        .serial_number(serial or x509.random_serial_number())
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    # the key identifiers Python 3.13's default context (VERIFY_X509_STRICT) insists on
    signer_key = (issuer_key or key).public_key()
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(signer_key),
        critical=False,
    )
    if ca:
        usage = dict.fromkeys(
            ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
             "key_agreement", "encipher_only", "decipher_only"), False,
        )  # fmt: skip
        builder = builder.add_extension(
            x509.KeyUsage(key_cert_sign=True, crl_sign=True, **usage), critical=True
        )
    if aia:
        desc = x509.AccessDescription(AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(aia))
        builder = builder.add_extension(x509.AuthorityInformationAccess([desc]), critical=False)
    if eku:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: Key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def pem_pair(pki: Pki, name: str, cert: x509.Certificate, key: Key) -> Path:
    """A PEM file with ``key`` and ``cert`` (a tunnel's ``cert``)."""
    path = pki.dir / f"{name}-pair.pem"
    path.write_bytes(_key_pem(key) + _pem(cert))
    path.chmod(0o600)
    return path


def _index_line(cert_serial: int, cn: str, revoked: str | None = None) -> str:
    """One OpenSSL CA database line: status, expiry, revocation[,reason], serial, file, DN."""
    expiry = (NOW + datetime.timedelta(days=30)).strftime("%y%m%d%H%M%SZ")
    when = ""
    if revoked is not None:
        when = (NOW - datetime.timedelta(hours=1)).strftime("%y%m%d%H%M%SZ") + (
            f",{revoked}" if revoked else ""
        )
    return f"{'R' if revoked is not None else 'V'}\t{expiry}\t{when}\t{cert_serial:X}\tunknown\t/O=pytunnel test/CN={cn}\n"


class Responder:
    """``openssl ocsp`` serving an index.txt on a free port (``-port 0``)."""

    def __init__(
        self, d: Path, name: str, ca: Path, rsigner: Path, rkey: Path, index: Path, *extra: str
    ) -> None:
        assert OPENSSL is not None
        self.log_path = d / f"{name}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [OPENSSL, "ocsp", "-index", str(index), "-CA", str(ca), "-rsigner", str(rsigner),
             "-rkey", str(rkey), "-port", "0", *extra],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            found = re.search(r"ACCEPT \S*:(\d+)", self.log_path.read_text(errors="replace"))
            if found:
                self.url = f"http://127.0.0.1:{found.group(1)}/"
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.close()
        raise RuntimeError(f"openssl ocsp did not start: {self.log_path.read_text(errors='replace')}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


@dataclass
class Pki:
    dir: Path
    root: x509.Certificate
    root_key: Key
    inter: x509.Certificate
    inter_revoked: x509.Certificate
    leaf_good: x509.Certificate
    leaf_revoked: x509.Certificate
    leaf_unknown: x509.Certificate
    leaf_dead_aia: x509.Certificate  # AIA points at a closed port
    leaf_no_aia: x509.Certificate
    leaf2: x509.Certificate  # issued by inter, AIA -> inter's responder
    leaf2_key: ec.EllipticCurvePrivateKey
    leaf3: x509.Certificate  # issued by inter_revoked, no AIA
    leaf_good_key: ec.EllipticCurvePrivateKey
    leaf_revoked_key: ec.EllipticCurvePrivateKey
    leaf_unknown_key: ec.EllipticCurvePrivateKey
    dead_url: str
    url: dict[str, str] = field(default_factory=dict)  # responder name -> URL


def build_pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pki]:
    """The PKI and its responders, for a module-scoped ``pki`` fixture (``yield from``)."""
    d = tmp_path_factory.mktemp("ocsp")
    # a bound but never listening socket: connecting to it is refused, for the whole module
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    dead_url = f"http://127.0.0.1:{dead.getsockname()[1]}/"

    root_key = _key()
    root = _issue("OCSP Test Root", root_key, None, None, ca=True)
    (d / "root.pem").write_bytes(_pem(root))
    (d / "root.key").write_bytes(_key_pem(root_key))
    serial = {
        n: x509.random_serial_number()
        for n in ("good", "revoked", "dead", "noaia", "inter", "inter_rev", "leaf2")
    }
    (d / "index-root.txt").write_text(
        _index_line(serial["good"], "good.example")
        + _index_line(serial["revoked"], "revoked.example", "keyCompromise")
        + _index_line(serial["dead"], "dead-aia.example")
        + _index_line(serial["noaia"], "no-aia.example")
        + _index_line(serial["inter"], "Intermediate")
        + _index_line(serial["inter_rev"], "Revoked Intermediate", "")
    )
    # responder certificates: delegated (RSA, OCSPSigning), no OCSPSigning, and a rogue self-signed one
    deleg_key = rsa.generate_private_key(65537, 2048)
    deleg = _issue("Delegated Responder", deleg_key, root, root_key, eku=[ExtendedKeyUsageOID.OCSP_SIGNING])
    noeku_key = _key()
    noeku = _issue("Responder Without OCSPSigning", noeku_key, root, root_key)
    rogue_key = _key()
    rogue = _issue("Rogue Responder", rogue_key, None, None, eku=[ExtendedKeyUsageOID.OCSP_SIGNING])
    for name, cert, key in (
        ("deleg", deleg, deleg_key),
        ("noeku", noeku, noeku_key),
        ("rogue", rogue, rogue_key),
    ):
        (d / f"{name}.pem").write_bytes(_pem(cert))
        (d / f"{name}.key").write_bytes(_key_pem(key))

    responders: list[Responder] = []

    def start(name: str, ca: str, signer: str, index: str, *extra: str) -> str:
        r = Responder(d, name, d / f"{ca}.pem", d / f"{signer}.pem", d / f"{signer}.key", d / index, *extra)
        responders.append(r)
        return r.url

    try:
        url = {
            "ca": start("ca", "root", "root", "index-root.txt", "-nmin", "60"),
            "deleg": start("deleg", "root", "deleg", "index-root.txt"),
            "noeku": start("noeku", "root", "noeku", "index-root.txt"),
            "rogue": start("rogue", "root", "rogue", "index-root.txt"),
        }
        inter_key, inter_rev_key = _key(), _key()
        inter = _issue(
            "Intermediate", inter_key, root, root_key, ca=True, serial=serial["inter"], aia=url["ca"]
        )
        inter_revoked = _issue(
            "Revoked Intermediate",
            inter_rev_key,
            root,
            root_key,
            ca=True,
            serial=serial["inter_rev"],
            aia=url["ca"],
        )
        (d / "inter.pem").write_bytes(_pem(inter))
        (d / "inter.key").write_bytes(_key_pem(inter_key))
        (d / "index-inter.txt").write_text(_index_line(serial["leaf2"], "leaf2.example"))
        url["inter"] = start("inter", "inter", "inter", "index-inter.txt")

        leaf_good_key, leaf2_key, leaf_revoked_key, leaf_unknown_key = _key(), _key(), _key(), _key()
        yield Pki(
            dir=d,
            root=root,
            root_key=root_key,
            inter=inter,
            inter_revoked=inter_revoked,
            leaf_good=_issue(
                "good.example",
                leaf_good_key,
                root,
                root_key,
                serial=serial["good"],
                aia=url["ca"],
                san="localhost",
            ),
            leaf_revoked=_issue(
                "revoked.example",
                leaf_revoked_key,
                root,
                root_key,
                serial=serial["revoked"],
                aia=url["ca"],
                san="localhost",
            ),
            leaf_unknown=_issue(
                "unknown.example", leaf_unknown_key, root, root_key, aia=url["ca"], san="localhost"
            ),
            leaf_dead_aia=_issue(
                "dead-aia.example", _key(), root, root_key, serial=serial["dead"], aia=dead_url
            ),
            leaf_no_aia=_issue("no-aia.example", _key(), root, root_key, serial=serial["noaia"]),
            leaf2=_issue(
                "leaf2.example", leaf2_key, inter, inter_key, serial=serial["leaf2"], aia=url["inter"]
            ),
            leaf2_key=leaf2_key,
            leaf3=_issue("leaf3.example", _key(), inter_revoked, inter_rev_key),
            leaf_good_key=leaf_good_key,
            leaf_revoked_key=leaf_revoked_key,
            leaf_unknown_key=leaf_unknown_key,
            dead_url=dead_url,
            url=url,
        )
    finally:
        for r in responders:
            r.close()
        dead.close()
