"""Start-up warnings: rules that look at a built service once the mode is known.

Run by :func:`start_warnings` at ``check``, start-up and every reload; each rule returns
warnings (or notices) that do not refuse a configuration.  Imports errors and settings;
ocsp and cryptography lazily.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass

from tunnel.errors import Problem, Severity
from tunnel.settings import ServiceSettings

PROTOCOL_OPTIONS = (
    "protocolAuthentication",
    "protocolHost",
    "protocolUsername",
    "protocolPassword",
    "protocolHeader",
)


@dataclass(frozen=True)
class Started:
    """What a start-up rule sees: a built service, whether its TLS policy verifies, the mode."""

    svc: ServiceSettings
    verify_chain: bool
    verify_peer: bool
    secure: bool


def _warning(text: str, severity: Severity = Severity.WARNING) -> Problem:
    return Problem(text, severity=severity)


def unauthenticated_client(s: Started) -> list[Problem]:
    """stunnel's warning for a client that does not check its upstream."""
    svc = s.svc
    if not svc.client or s.verify_chain or s.verify_peer or svc.PSKsecrets:
        return []
    out = [_warning(f"Service [{svc.name}] needs authentication to prevent MITM attacks")]
    if s.secure:
        out.append(
            _warning(f"Service [{svc.name}]: upstream certificate verification is OFF (verifyChain = no)")
        )
    return out


def plaintext_listener_exposed(s: Started) -> list[Problem]:
    """A client-mode plaintext listener reachable beyond loopback (stunnel's `accept = 2525`)."""
    if not s.svc.client:
        return []
    return [
        _warning(
            f"Service [{s.svc.name}]: plaintext listener {ep.display()} is not on loopback; "
            "anyone who can reach it can use the tunnel (use accept = 127.0.0.1:PORT)"
        )
        for ep in s.svc.accept
        if ep.path is None and not _is_loopback(ep.host)
    ]


def certificate_dates(s: Started) -> list[Problem]:
    """`check` and start-up say when a service's own certificate is expired or about to."""
    svc = s.svc
    if not svc.cert:
        return []
    from cryptography import x509  # only for a service with a certificate

    try:
        with open(svc.cert, "rb") as fh:
            data = fh.read()
        certs = x509.load_pem_x509_certificates(data) if b"-----BEGIN CERT" in data else []
    except (OSError, ValueError):
        return []
    if not certs:
        return []
    import datetime  # with cryptography, which loads it anyway

    leaf, path, out = certs[0], svc.cert, []
    now = datetime.datetime.now(datetime.UTC)
    after, before = leaf.not_valid_after_utc, leaf.not_valid_before_utc
    if after < now:
        out.append(_warning(f"Service [{svc.name}]: certificate {path} expired on {after:%Y-%m-%d}"))
    elif after - now < datetime.timedelta(days=14):
        out.append(_warning(f"Service [{svc.name}]: certificate {path} expires on {after:%Y-%m-%d}"))
    if before > now:
        out.append(
            _warning(f"Service [{svc.name}]: certificate {path} is not valid before {before:%Y-%m-%d}")
        )
    return out


def key_files_private(s: Started) -> list[Problem]:
    """stunnel's warning (same text, same rule) for a private key that others may read."""
    svc = s.svc
    paths = ([svc.key or svc.cert] if svc.cert else []) + ([svc.PSKsecrets] if svc.PSKsecrets else [])
    out = []
    for path in paths:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue
        if mode & 0o007:
            out.append(_warning(f"Insecure file permissions on {path}"))
    return out


def ocsp_needs_chain(s: Started) -> list[Problem]:
    """OCSP checks a verified chain; OCSPflag's notes say what each flag does here."""
    svc = s.svc
    if (svc.OCSP or svc.OCSPaia) and not s.verify_chain:
        return [_warning(f"Service [{svc.name}]: OCSP has no effect without verifyChain = yes")]
    if not svc.OCSPflag:
        return []
    from tunnel import ocsp  # cryptography: only for a service that asks for OCSP

    return [
        _warning(f"Service [{svc.name}]: {note}", Severity.WARNING if "forged" in note else Severity.NOTICE)
        for note in ocsp.flag_notes(svc.OCSPflag)
    ]


def idle_options(s: Started) -> list[Problem]:
    """Options accepted as stunnel accepts them that do nothing in this service."""
    svc, out = s.svc, []
    if svc.PSKidentity and not (svc.client and svc.PSKsecrets):
        why = "in server mode (the client chooses)" if not svc.client else "without PSKsecrets"
        out.append(_warning(f"Service [{svc.name}]: PSKidentity has no effect {why}"))
    if not svc.protocol:
        idle = [n for n in PROTOCOL_OPTIONS if getattr(svc, n)]
        if idle:
            verb = "has" if len(idle) == 1 else "have"
            out.append(_warning(f"Service [{svc.name}]: {', '.join(idle)} {verb} no effect without protocol"))
    elif svc.protocol.lower() == "smtp" and (svc.protocolAuthentication or "").lower() == "basic":
        out.append(
            _warning(
                f"Service [{svc.name}]: protocolAuthentication = basic is not an SMTP method; "
                "plain is used, as stunnel does"
            )
        )
    if svc.retry and not (svc.exec and svc.connect):
        out.append(_warning(f"Service [{svc.name}]: retry has no effect without exec and connect"))
    if svc.stack != 65536:
        out.append(
            _warning(f"Service [{svc.name}]: stack has no effect (pytunnel runs no thread per connection)")
        )
    return out


START_RULES: list[Callable[[Started], list[Problem]]] = [
    unauthenticated_client,
    plaintext_listener_exposed,
    certificate_dates,
    key_files_private,
    ocsp_needs_chain,
    idle_options,
]


def start_warnings(s: Started) -> list[Problem]:
    """The warnings (and notices) of one built service, in the order stunnel's users see them."""
    return [p for rule in START_RULES for p in rule(s)]


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host or "0.0.0.0").is_loopback  # noqa: S104
    except ValueError:
        return False
