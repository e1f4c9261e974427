"""ACME (RFC 8555): certificates that obtain and renew themselves, for server-mode services
with ``ACMEdirectory`` (a pytunnel extension).

Theory of operation
===================

* **Storage** (``ACMEdir``, default ``$STATE_DIRECTORY`` else ``/var/lib/pytunnel/acme``;
  directories 0700, keys 0600): ``ACMEdir/SERVICE/`` holds ``account.key`` (P-256), the
  account's URL (``account.json``) and ``cert.pem`` (key + full chain).  The service's
  ``cert`` is that file (:func:`prepare`), so the certificate watcher (tunnel/certwatch.py)
  swaps a renewed certificate in exactly as a hot-reloaded one: live connections keep theirs,
  and ``pytunnel_cert_not_after_seconds`` covers it.
* **First start** without a usable certificate: :func:`obtain` runs before the service binds
  and accepts TLS clients; the challenge is answered by a temporary responder
  (tunnel/acmeserve.py) on the service's own accept address (``tls-alpn-01``) or on
  ``ACMEhttp`` (``http-01``); past ``ACMEtimeout`` it gives up with one line and pytunnel exits
  with status 3.  A stored certificate still valid is used at once.
* **Renewal** at two thirds of the lifetime, or earlier when the server's renewal information
  (ARI) says so, in the background (tunnel/acmeserve.py); ``tls-alpn-01`` is then answered on
  the live port by a servername callback that hands validation handshakes (``acme-tls/1``) a
  challenge context.  Failures are logged, counted (``pytunnel_acme_renewals_total{result}``)
  and retried with back-off; the old certificate keeps serving.
* The protocol is certbot's ``acme`` library; its release has no TLS-ALPN-01 classes, so the
  RFC 8737 certificate is built here with ``cryptography`` (:func:`alpn_challenge_cert`) and
  the challenge is answered through the library's generic ``KeyAuthorizationChallengeResponse``
  (sent as ``{}``).

Imports settings (the options) and nothing else of tunnel; ``acme``/``josepy`` only when a
certificate is ordered.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunnel.settings import ServiceSettings

ACME_TLS_ALPN = "acme-tls/1"
ID_PE_ACME_IDENTIFIER = "1.3.6.1.5.5.7.1.31"  # RFC 8737
RENEW_FRACTION = 2 / 3


class AcmeError(Exception):
    """An order could not be completed; the message says where it stopped."""


def state_dir(svc: ServiceSettings) -> Path:
    base = svc.ACMEdir or os.environ.get("STATE_DIRECTORY", "").split(":")[0] or "/var/lib/pytunnel/acme"
    return Path(base) / svc.name


def private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def write_private(path: Path, data: bytes) -> None:
    """Write atomically, 0600 from the start (a reader never sees half a key)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def cert_path(svc: ServiceSettings) -> Path:
    return state_dir(svc) / "cert.pem"


def validity(path: Path) -> tuple[float, float] | None:
    """(notBefore, notAfter) of the stored certificate as Unix times, or None."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    return cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()


def renew_at(path: Path) -> float | None:
    """When the stored certificate is due for renewal (two thirds of its lifetime)."""
    span = validity(path)
    if span is None:
        return None
    return span[0] + (span[1] - span[0]) * RENEW_FRACTION


def usable(path: Path, now: float | None = None) -> bool:
    span = validity(path)
    return span is not None and span[1] > (now or time.time()) + 60


def stale(svc: ServiceSettings) -> str | None:
    """Why the stored certificate no longer fits the options (a reload or an edit added an
    ACMEdomain, or moved ACMEdirectory), or None: then it is renewed when due."""
    from cryptography import x509

    path = cert_path(svc)
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return "no certificate"
    have = {n.lower() for n in names.get_values_for_type(x509.DNSName)}
    missing = [d for d in svc.ACMEdomain if d.lower().rstrip(".") not in have]
    if missing:
        return f"it does not cover {', '.join(missing)}"
    try:
        issued_by = json.loads((path.parent / "cert.json").read_text()).get("directory")
    except (OSError, ValueError):
        issued_by = None  # from before pytunnel kept this: trust it
    if issued_by is not None and issued_by != svc.ACMEdirectory:
        return f"it was issued by {issued_by}"
    return None


def prepare(svc: ServiceSettings) -> ServiceSettings:
    """The service as the TLS builder sees it: ``cert`` is the stored ACME certificate."""
    return svc.model_copy(update={"cert": str(cert_path(svc)), "key": None})


def alpn_challenge_cert(domain: str, key_authorization: str) -> bytes:
    """RFC 8737's self-signed certificate (key + certificate, PEM): the domain as its only
    SAN and the critical acmeIdentifier extension holding SHA-256(key authorization)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    digest = hashlib.sha256(key_authorization.encode()).digest()
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "pytunnel ACME challenge")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(domain)]), critical=False)
        .add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier(ID_PE_ACME_IDENTIFIER), b"\x04\x20" + digest),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem + cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class Answers:
    """What the responders must answer while an order is validated (set by :func:`obtain`)."""

    tls_alpn: Callable[[str, bytes], None]  # domain -> RFC 8737 certificate (PEM with key)
    http: Callable[[str, str], None]  # token -> key authorization
    clear: Callable[[], None]


def _account_key(directory: Path) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = directory / "account.key"
    if path.exists():
        return serialization.load_pem_private_key(path.read_bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private(path, pem)
    return key


def _client(svc: ServiceSettings, directory: Path) -> Any:
    """An ``acme`` ClientV2 with a registered account (registered now, or found again)."""
    from acme import client, errors, messages
    from josepy import jwa, jwk

    net = client.ClientNetwork(
        jwk.JWKEC(key=_account_key(directory)), alg=jwa.ES256, user_agent="pytunnel", timeout=30
    )
    if svc.ACMECAfile:
        net.verify_ssl = svc.ACMECAfile  # type: ignore[assignment]  # a private ACME server's CA (requests' verify=PATH)
    acme_dir = client.ClientV2.get_directory(str(svc.ACMEdirectory), net)
    cl = client.ClientV2(acme_dir, net)
    stored = directory / "account.json"
    try:
        known = json.loads(stored.read_text()).get(svc.ACMEdirectory)
    except (OSError, ValueError):
        known = None
    if known:
        net.account = messages.RegistrationResource(uri=known, body=messages.Registration())
        return cl
    reg = messages.NewRegistration.from_data(email=svc.ACMEemail, terms_of_service_agreed=True)
    try:
        regr = cl.new_account(reg)
    except errors.ConflictError as exc:  # the key has an account already
        regr = messages.RegistrationResource(uri=exc.location, body=messages.Registration())
        net.account = regr
    write_private(stored, json.dumps({svc.ACMEdirectory: regr.uri}).encode())
    return cl


def _answer(cl: Any, order: Any, svc: ServiceSettings, answers: Answers) -> None:
    """Publish and trigger the chosen challenge of each authorization still pending."""
    from acme import challenges, errors, messages

    key = cl.net.key
    for authz in order.authorizations:
        if authz.body.status == messages.STATUS_VALID:
            # the server reused an authorization validated for an earlier order (Let's
            # Encrypt does for 30 days; RFC 8555 7.1.4): its challenge must not be posted again
            continue
        domain = authz.body.identifier.value
        wanted = svc.ACMEchallenge
        challb = next(
            (c for c in authz.body.challenges if c.chall.to_partial_json().get("type") == wanted), None
        )
        if challb is None:
            raise AcmeError(f"the ACME server offers no {wanted} challenge for {domain}")
        token = challb.chall.to_partial_json()["token"]
        thumb = jose_b64(key.thumbprint())
        key_authz = f"{token}.{thumb}"
        if wanted == "http-01":
            answers.http(token, key_authz)
        else:
            answers.tls_alpn(domain, alpn_challenge_cert(domain, key_authz))
        try:
            # the generic response: its JSON is "{}" (RFC 8555 7.5.1); the library sends an empty
            # ChallengeResponse() as a POST-as-GET, which starts nothing
            response = challenges.KeyAuthorizationChallengeResponse(key_authorization=key_authz)
            cl.answer_challenge(challb, response)
        except errors.ClientError as exc:
            # the response was posted; some servers (pebble 2.4) send no Link rel="up" back,
            # which the library wants only to return the authorization (polled below anyway)
            if '"up" Link header missing' not in str(exc):
                raise


def jose_b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _new_order(svc: ServiceSettings, directory: Path, csr: bytes) -> tuple[Any, Any]:
    """A client and a new order; an account the server no longer knows is registered anew
    (the key stays: a server that forgot it, like a restarted pebble, sees a new account)."""
    from acme import messages

    for attempt in (1, 2):
        cl = _client(svc, directory)
        try:
            return cl, cl.new_order(csr)
        except messages.Error as exc:
            # the stored account URL refused: forgotten by the server, or not under this
            # directory's URL ("Key ID (kid) in JWS header missing expected URL prefix": the
            # same server by another name, as after a reload that changed ACMEdirectory)
            refused = exc.code == "accountDoesNotExist" or (
                exc.code == "malformed" and "Key ID" in str(exc.detail or "")
            )
            if attempt == 2 or not refused:
                raise
            (directory / "account.json").unlink(missing_ok=True)
    raise AssertionError("unreachable")


def obtain(svc: ServiceSettings, answers: Answers, deadline: float) -> Path:
    """Order a certificate for ACMEdomain, answer its challenges, store it; the stored path.
    Raises AcmeError (with the step) on any failure, also past ``deadline`` (monotonic)."""
    from acme import crypto_util
    from acme import errors as acme_errors
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory = state_dir(svc)
    private_dir(directory.parent)
    private_dir(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        cl, order = _new_order(svc, directory, crypto_util.make_csr(key_pem, list(svc.ACMEdomain)))
        _answer(cl, order, svc, answers)
        left = max(1.0, deadline - time.monotonic())
        until = datetime.datetime.now() + datetime.timedelta(seconds=left)
        order = cl.poll_and_finalize(order, until)
    except acme_errors.ValidationError as exc:
        problems = "; ".join(
            f"{a.body.identifier.value}: {c.error.detail if c.error else c.status}"
            for a in exc.failed_authzrs
            for c in a.body.challenges
            if c.error is not None
        )
        raise AcmeError(f"validation failed: {problems or exc}") from None
    except acme_errors.TimeoutError:
        raise AcmeError("the order was not ready before the deadline") from None
    except Exception as exc:  # noqa: BLE001 - requests, josepy, the server's problem documents
        raise AcmeError(f"{type(exc).__name__}: {exc}") from None
    finally:
        answers.clear()
    path = cert_path(svc)
    write_private(path, key_pem + order.fullchain_pem.encode())
    meta = {"directory": svc.ACMEdirectory, "domains": list(svc.ACMEdomain)}
    write_private(path.parent / "cert.json", json.dumps(meta).encode())
    return path


def ari_renew_at(svc: ServiceSettings, path: Path) -> float | None:
    """The server's suggested renewal time (ACME renewal information), where it has one."""
    try:
        cl = _client(svc, state_dir(svc))
        when, _next = cl.renewal_time(path.read_bytes())
    except Exception:  # noqa: BLE001 - ARI is advice: without it, two thirds of the lifetime
        return None
    return when.timestamp() if when is not None else None
