"""Peer checks: what a service verifies, and the checks made on the peer's certificate
after the handshake (OpenSSL verified the chain during it; see tunnel/tls.py).

* :func:`policy_for`: stunnel's ``verify*``/``requireCert``/``check*`` options, after the
  legacy ``verify`` level, the order of the lines and ``pytunnel run``'s defaults.
* :func:`check_peer`: ``requireCert``, ``verifyPeer`` (the leaf must be pinned: one of the
  certificates in CAfile/CApath, :func:`pinned_certs`) and ``checkHost``/``checkIP``/
  ``checkEmail`` and pytunnel's ``checkURI`` (tunnel/uris.py): any one match is enough, as
  in stunnel.
* :func:`client_dn`, :func:`subject_line`, :func:`peer_subject`: the peer's names as stunnel
  logs them and puts them in the environment of ``exec``.

Imports settings (the options), reasons and uris (leaves), nothing else of tunnel.
"""

from __future__ import annotations

import functools
import ipaddress
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tunnel.reasons import HandshakeFailure
from tunnel.settings import ServiceSettings, written_after
from tunnel.uris import match_uri

if TYPE_CHECKING:
    # cryptography is imported where a certificate is parsed, not at start-up: a client
    # that only verifies with OpenSSL never loads it before it accepts a connection
    from cryptography import x509

_MISSING = object()

#: (certificate, hosts, IPs) -> the verdict of the name match, per TlsConfig
NamesCache = dict[tuple[bytes, tuple[str, ...], tuple[str, ...]], str | None]


@dataclass(frozen=True)
class Policy:
    """What a service verifies, after the legacy ``verify`` level and mode defaults."""

    request_cert: bool
    require_cert: bool
    verify_chain: bool
    verify_peer: bool
    check_hosts: tuple[str, ...]
    check_ips: tuple[str, ...]
    check_emails: tuple[str, ...]
    default_name_check: bool  # secure mode: check the name we connect to
    check_uris: tuple[str, ...] = ()  # checkURI (pytunnel): URI SANs, e.g. SPIFFE IDs

    def refusal(self, problem: str) -> HandshakeFailure:
        """The metric reason of a refused peer: checkURI's own when URIs were checked."""
        if self.check_uris and "mismatch" in problem:
            return HandshakeFailure.URI_MISMATCH
        return HandshakeFailure.VERIFY_FAILED


def policy_for(svc: ServiceSettings, secure: bool) -> Policy:
    level = svc.verify
    chain = bool(svc.verifyChain) or level in (1, 2, 3)
    peer = bool(svc.verifyPeer) or level in (3, 4)
    request = level is not None or chain or peer or svc.requireCert
    # verifyChain/verifyPeer/verify >= 2 make a client certificate required, as they do in
    # stunnel when they are read: a requireCert = no written after them keeps it optional
    # (verified when one is sent), one written before them does not
    makers = [
        name
        for name, on in (
            ("verifyChain", svc.verifyChain),
            ("verifyPeer", svc.verifyPeer),
            ("verify", (level or 0) >= 2),
        )
        if on
    ]
    if "requireCert" in svc.model_fields_set and all(written_after(svc, "requireCert", m) for m in makers):
        require = bool(svc.requireCert)
    else:
        require = bool(svc.requireCert) or bool(makers)
    default_check = False
    if (
        secure
        and svc.client
        and svc.verifyChain is None
        and svc.verifyPeer is None
        and level is None
        and not svc.PSKsecrets  # the key authenticates the server
    ):
        chain = request = require = True
        default_check = not (svc.checkHost or svc.checkIP or svc.checkEmail or svc.checkURI)
    return Policy(
        request_cert=request,
        require_cert=require,
        verify_chain=chain,
        verify_peer=peer,
        check_hosts=tuple(svc.checkHost),
        check_ips=tuple(svc.checkIP),
        check_emails=tuple(svc.checkEmail),
        default_name_check=default_check,
        check_uris=tuple(svc.checkURI),
    )


def check_peer(
    pol: Policy, pinned: frozenset[bytes], cache: NamesCache, der: bytes | None, expected_name: str | None
) -> str | None:
    """Return None when the peer passes, else the reason (OpenSSL-like wording)."""
    if der is None:
        if pol.require_cert:
            return "peer did not return a certificate"
        return None
    if pol.verify_peer and der not in pinned:
        return "certificate verify failed: peer certificate not found in CAfile/CApath"
    hosts = pol.check_hosts
    ips = pol.check_ips
    if pol.default_name_check and expected_name:
        if _is_ip(expected_name):
            ips = (expected_name,)
        else:
            hosts = (expected_name,)
    if not (hosts or ips or pol.check_emails or pol.check_uris):
        return None
    # Parsing the certificate costs more than a resumed handshake: remember the verdict
    # for the few (certificate, name) pairs a service sees.  The chain itself was
    # verified by OpenSSL on this very connection; only the name match is cached.
    key = (der, hosts, ips)
    verdict = cache.get(key, _MISSING)
    if verdict is _MISSING:
        verdict = _match_names(der, hosts, ips, pol.check_emails, pol.check_uris)
        if len(cache) >= 64:
            cache.clear()
        cache[key] = verdict
    return verdict  # type: ignore[return-value]


def _match_names(
    der: bytes, hosts: tuple[str, ...], ips: tuple[str, ...], emails: tuple[str, ...], uris: tuple[str, ...]
) -> str | None:
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    if hosts and any(match_host(cert, h) for h in hosts):
        return None
    if ips and any(match_ip(cert, ip) for ip in ips):
        return None
    if emails and any(match_email(cert, e) for e in emails):
        return None
    if uris and any(match_uri(cert, u) for u in uris):
        return None
    wanted = ", ".join([*hosts, *ips, *emails, *uris])
    named = (("Hostname", hosts), ("IP address", ips), ("Email address", emails), ("URI", uris))
    kinds = [k for k, v in named if v]
    what = kinds[0] if len(kinds) == 1 else "Hostname, IP address and email" if not uris else "Name and URI"
    return f"certificate verify failed: {what} mismatch (expected {wanted})"


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    from cryptography import x509

    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def _dns_match(pattern: str, host: str) -> bool:
    pattern, host = pattern.lower().rstrip("."), host.lower().rstrip(".")
    if pattern == host:
        return True
    if pattern.startswith("*.") and "." in host:
        # RFC 6125: the wildcard covers exactly one left-most label
        return host.split(".", 1)[1] == pattern[2:] and bool(host.split(".", 1)[0])
    return False


def match_host(cert: x509.Certificate, host: str) -> bool:
    from cryptography import x509

    san = _san(cert)
    names = san.get_values_for_type(x509.DNSName) if san else []
    if not names:  # no SAN DNS names: fall back to the subject CN, as OpenSSL does
        names = [str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    return any(_dns_match(n, host) for n in names)


def match_ip(cert: x509.Certificate, ip: str) -> bool:
    from cryptography import x509

    san = _san(cert)
    if not san:
        return False
    want = ipaddress.ip_address(ip)
    return any(addr == want for addr in san.get_values_for_type(x509.IPAddress))


def match_email(cert: x509.Certificate, email: str) -> bool:
    from cryptography import x509

    san = _san(cert)
    names = san.get_values_for_type(x509.RFC822Name) if san else []
    return any(n.lower() == email.lower() for n in names)


def client_dn(der: bytes | None) -> tuple[str, str] | None:
    """(subject, issuer) of a peer certificate as stunnel puts them in SSL_CLIENT_DN/_I_DN
    (``O=Org, OU=Unit, CN=name``: in certificate order)."""
    from cryptography import x509

    if not der:
        return None
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return None

    def oneline(name: x509.Name) -> str:
        return ", ".join(f"{a.rfc4514_attribute_name}={a.value!s}" for a in name)

    return oneline(cert.subject), oneline(cert.issuer)


@functools.lru_cache(maxsize=256)
def subject_line(der: bytes) -> str:
    """A certificate's subject as stunnel logs it (``O=Org, OU=Unit, CN=name``)."""
    dn = client_dn(der)
    return dn[0] if dn else "?"


def peer_subject(der: bytes | None) -> str:
    from cryptography import x509

    if not der:
        return ""
    try:
        return x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except ValueError:
        return ""


def pinned_certs(svc: ServiceSettings) -> frozenset[bytes]:
    """verifyPeer's certificates: every one in CAfile and in CApath's files, as DER."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    out: set[bytes] = set()
    files: list[str] = []
    if svc.CAfile:
        files.append(svc.CAfile)
    if svc.CApath and os.path.isdir(svc.CApath):
        files += [
            os.path.join(svc.CApath, n)
            for n in sorted(os.listdir(svc.CApath))
            if os.path.isfile(os.path.join(svc.CApath, n))
        ]
    for path in files:
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        try:
            for cert in x509.load_pem_x509_certificates(data):
                out.add(cert.public_bytes(Encoding.DER))
        except ValueError:
            continue
    return frozenset(out)
