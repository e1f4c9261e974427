"""stunnel's start-up lines for one service, at debug 6 and 7, in stunnel's words.

People diff stunnel's log against pytunnel's when they switch; :func:`service_lines` says
what is true of the service as pytunnel built it, in the order and words stunnel 5.68 uses
(``Initializing service [NAME]``, ``Ciphers: …``, ``TLS options: 0x…``, ``Session
resumption enabled``, the certificate and key lines, ``Configured trusted client CA: …``,
``No trusted certificates found``, the DH and ECDH lines).  Where pytunnel differs the line
says what pytunnel does (``TLS options`` is the options of pytunnel's own context).

Imports settings and tls (types only); the caller logs the lines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunnel.settings import ServiceSettings
from tunnel.values import SSL_OPTIONS

if TYPE_CHECKING:
    from tunnel.tls import TlsConfig

Line = tuple[int, str]


def service_lines(svc: ServiceSettings, tls: TlsConfig) -> list[Line]:
    """The lines stunnel logs while it initializes this service's TLS context."""
    ctx = tls.context
    plus = minus = 0
    for item in svc.options:
        if item.startswith("-"):
            minus |= SSL_OPTIONS[item[1:]]
        else:
            plus |= SSL_OPTIONS[item]
    lines: list[Line] = [(6, f"Initializing service [{svc.name}]")]
    if svc.ticketKeySecret and svc.ticketMacSecret:
        lines += [(6, "ticketKeySecret configured"), (6, "ticketMacSecret configured")]
    lines += [
        (6, f"OpenSSL security level is used: {svc.securityLevel}"),
        (7, f"Ciphers: {svc.ciphers}"),
        (7, f"TLSv1.3 ciphersuites: {svc.ciphersuites}"),
        (7, f"TLS options: {int(ctx.options):#x} (+{plus:#x}, -{minus:#x})"),
        (6, f"Session resumption {'enabled' if svc.sessionResume else 'disabled'}"),
    ]
    lines += _identity(svc)
    lines += _trust(svc, tls.policy.verify_chain)
    if svc.client:
        lines.append((6, "DH initialization skipped: client section"))
    elif not any(c.get("kea") in ("kx-dhe", "kx-dhe-psk") for c in ctx.get_ciphers()):
        lines.append((6, "DH initialization skipped: no DH ciphersuites"))
    else:  # pytunnel loads no DH parameters: OpenSSL then negotiates no DHE suite
        lines.append((6, "DH initialization skipped: pytunnel loads no DH parameters"))
    lines += [(7, "ECDH initialization"), (7, f"ECDH initialized with curves {svc.curves}")]
    return lines


def _identity(svc: ServiceSettings) -> list[Line]:
    if not svc.cert:
        return [(7, "No certificate or private key specified")]
    if _is_pkcs12(svc.cert):  # one file holds both: stunnel's PKCS#12 lines
        return [
            (6, f"Loading certificate and private key from file: {svc.cert}"),
            (6, f"Certificate and private key loaded from file: {svc.cert}"),
            (7, "Private key check succeeded"),
        ]
    key = svc.key or svc.cert
    return [
        (6, f"Loading certificate from file: {svc.cert}"),
        (6, f"Certificate loaded from file: {svc.cert}"),
        (6, f"Loading private key from file: {key}"),
        (6, f"Private key loaded from file: {key}"),
        (7, "Private key check succeeded"),
    ]


def _is_pkcs12(path: str) -> bool:
    """A ``cert`` file without PEM armour is read as PKCS#12 (tunnel/tls.py does the same)."""
    try:
        with open(path, "rb") as fh:
            return b"-----BEGIN" not in fh.read()
    except OSError:
        return False


def _trust(svc: ServiceSettings, system_store: bool) -> list[Line]:
    """The trusted CAs: a server names them to clients (its CAfile); a client without any
    (``verifyChain`` without CAfile/CApath loads the system store) gets stunnel's LOG3 line.
    A server without any verifies nobody: the line at LOG6, as stunnel 5.7x (5.68 says
    LOG3, which would make `pytunnel check` report a valid configuration as an error)."""
    if not svc.client and svc.CAfile:
        return [(6, f"Configured trusted client CA: {name}") for name in _subjects(svc.CAfile)]
    if not (svc.CAfile or svc.CApath or svc.CAstore or svc.PSKsecrets or system_store):
        return [(3 if svc.client else 6, "No trusted certificates found")]
    return []


def _subjects(path: str) -> list[str]:
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    from tunnel.verify import client_dn

    try:
        with open(path, "rb") as fh:
            certs = x509.load_pem_x509_certificates(fh.read())
    except (OSError, ValueError):
        return []
    return [dn[0] for c in certs if (dn := client_dn(c.public_bytes(Encoding.DER))) is not None]
