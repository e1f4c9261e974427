"""Helpers for the identity tests (checkURI, ALPN, post-quantum groups, ACME): certificates
with URI SANs from a trustme CA, and /metrics scraping."""

from __future__ import annotations

import datetime
import re
import time
import urllib.request
from pathlib import Path
from typing import Protocol

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from prometheus_client.parser import text_string_to_metric_families

STATUS_LINE = r"Status server listening on http://([\d.]+):(\d+)"


def issue(ca: trustme.CA, path: Path, cn: str, dns: list[str] = (), uris: list[str] = ()) -> Path:  # type: ignore[assignment]
    """Key + certificate (+ the CA) in one PEM file, with the given DNS and URI SANs."""
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    sans += [x509.UniformResourceIdentifier(u) for u in uris]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    pem += cert.public_bytes(serialization.Encoding.PEM) + ca.cert_pem.bytes()
    path.write_bytes(pem)
    return path


def write_crl(ca: trustme.CA, revoked: trustme.LeafCert, path: Path) -> Path:
    """A CRL signed by ``ca`` (PEM at ``path``, valid from an hour ago for a day) that revokes
    the leaf certificate ``revoked``."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    serial = x509.load_pem_x509_certificate(revoked.cert_chain_pems[0].bytes()).serial_number
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - datetime.timedelta(hours=1))
        .next_update(now + datetime.timedelta(days=1))
        .add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    path.write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    return path


class Waits(Protocol):
    def wait_for(self, pattern: str, timeout: float = ...) -> re.Match[str]: ...


def scrape(t: Waits) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    m = t.wait_for(STATUS_LINE)
    with urllib.request.urlopen(f"http://{m.group(1)}:{m.group(2)}/metrics", timeout=5) as resp:
        body = resp.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def wait_metric(t: Waits, name: str, want: float, timeout: float = 15.0, **labels: str) -> float:
    """Poll /metrics until the sample reaches ``want`` (or the deadline: the last value)."""
    key = (name, tuple(sorted(labels.items())))
    deadline = time.monotonic() + timeout
    while True:
        got = scrape(t).get(key, 0.0)
        if got >= want or time.monotonic() > deadline:
            return got
        time.sleep(0.05)
