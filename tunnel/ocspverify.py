"""What one OCSP response means: parsed, its signer found and verified the way
``OCSP_basic_verify`` does it (``OCSPflag`` relaxing the steps as in OpenSSL), its
validity window checked, and turned into an :class:`Answer`; plus the certificate helpers
the chain walk (tunnel/ocsp.py) shares.

A leaf: it imports nothing from tunnel.  Nothing here raises on a bad response: every
failure becomes an UNKNOWN answer with a one-line reason.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, SignatureAlgorithmOID

Log = Callable[[int, str], None]  # (syslog level 0..7, text), e.g. Connection.log

LEEWAY = datetime.timedelta(seconds=60)  # stunnel's OCSP_check_validity leeway
MAX_CHAIN = 10  # responder certificate path length limit

_REASON_CODES = {
    x509.ReasonFlags.unspecified: 0,
    x509.ReasonFlags.key_compromise: 1,
    x509.ReasonFlags.ca_compromise: 2,
    x509.ReasonFlags.affiliation_changed: 3,
    x509.ReasonFlags.superseded: 4,
    x509.ReasonFlags.cessation_of_operation: 5,
    x509.ReasonFlags.certificate_hold: 6,
    x509.ReasonFlags.remove_from_crl: 8,
    x509.ReasonFlags.privilege_withdrawn: 9,
    x509.ReasonFlags.aa_compromise: 10,
}
_RESPONSE_STATUS_NAMES = {
    ocsp.OCSPResponseStatus.MALFORMED_REQUEST: "malformedRequest",
    ocsp.OCSPResponseStatus.INTERNAL_ERROR: "internalError",
    ocsp.OCSPResponseStatus.TRY_LATER: "tryLater",
    ocsp.OCSPResponseStatus.SIG_REQUIRED: "sigRequired",
    ocsp.OCSPResponseStatus.UNAUTHORIZED: "unauthorized",
}
_RSA_SIGS = {
    SignatureAlgorithmOID.RSA_WITH_SHA1,
    SignatureAlgorithmOID.RSA_WITH_SHA224,
    SignatureAlgorithmOID.RSA_WITH_SHA256,
    SignatureAlgorithmOID.RSA_WITH_SHA384,
    SignatureAlgorithmOID.RSA_WITH_SHA512,
    SignatureAlgorithmOID.RSA_WITH_SHA3_224,
    SignatureAlgorithmOID.RSA_WITH_SHA3_256,
    SignatureAlgorithmOID.RSA_WITH_SHA3_384,
    SignatureAlgorithmOID.RSA_WITH_SHA3_512,
}
_ECDSA_SIGS = {
    SignatureAlgorithmOID.ECDSA_WITH_SHA1,
    SignatureAlgorithmOID.ECDSA_WITH_SHA224,
    SignatureAlgorithmOID.ECDSA_WITH_SHA256,
    SignatureAlgorithmOID.ECDSA_WITH_SHA384,
    SignatureAlgorithmOID.ECDSA_WITH_SHA512,
    SignatureAlgorithmOID.ECDSA_WITH_SHA3_224,
    SignatureAlgorithmOID.ECDSA_WITH_SHA3_256,
    SignatureAlgorithmOID.ECDSA_WITH_SHA3_384,
    SignatureAlgorithmOID.ECDSA_WITH_SHA3_512,
}
_DSA_SIGS = {
    SignatureAlgorithmOID.DSA_WITH_SHA1,
    SignatureAlgorithmOID.DSA_WITH_SHA224,
    SignatureAlgorithmOID.DSA_WITH_SHA256,
    SignatureAlgorithmOID.DSA_WITH_SHA384,
    SignatureAlgorithmOID.DSA_WITH_SHA512,
}


# ---------------------------------------------------------------- answers


class Status(Enum):
    GOOD = "good"
    REVOKED = "revoked"
    UNKNOWN = "unknown"  # inconclusive, for whatever reason


@dataclass(frozen=True)
class Answer:
    status: Status
    reason: str = ""  # without the "OCSP: " prefix; empty for good
    ttl: float | None = None  # seconds a definitive answer may be cached; None: no nextUpdate


def inconclusive(say: Log, reason: str) -> Answer:
    """An answer that is neither good nor revoked: logged, and UNKNOWN with its reason."""
    say(3, f"OCSP: {reason}")
    return Answer(Status.UNKNOWN, reason)


# ---------------------------------------------------------------- one response


def validate(
    der: bytes,
    request: ocsp.OCSPRequest,
    nonce: bytes | None,
    cert: x509.Certificate,
    chain: list[x509.Certificate],
    anchors: list[x509.Certificate],
    flags: frozenset[str],
    say: Log,
) -> Answer:
    """One responder's DER answer about ``cert``, checked against the request that asked."""
    try:
        resp = ocsp.load_der_ocsp_response(der)
    except ValueError as exc:
        return inconclusive(say, f"bad response: not a DER-encoded OCSP response ({exc})")
    outcome = resp.response_status
    if outcome is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        return inconclusive(
            say, f"responder error: {outcome.value}: {_RESPONSE_STATUS_NAMES.get(outcome, outcome.name)}"
        )
    try:
        if nonce is not None:
            try:
                echoed = resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
            except x509.ExtensionNotFound:
                return inconclusive(say, "nonce missing from the response (OCSPnonce = yes)")
            if echoed != nonce:
                return inconclusive(say, "nonce mismatch")
        problem = _verify_response(resp, chain, anchors, flags)
        if problem:
            return inconclusive(say, problem)
        single = next(
            (
                s
                for s in resp.responses
                if s.serial_number == request.serial_number
                and s.issuer_name_hash == request.issuer_name_hash
                and s.issuer_key_hash == request.issuer_key_hash
                and isinstance(s.hash_algorithm, type(request.hash_algorithm))
            ),
            None,
        )
        if single is None:
            return inconclusive(say, "no status for this certificate in the response")
        this_update, next_update = single.this_update_utc, single.next_update_utc
        status = single.certificate_status
        reason = single.revocation_reason
        revoked_at = single.revocation_time_utc
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.DuplicateExtension) as exc:  # malformed inside
        return inconclusive(say, f"bad response: {exc}")
    say(6, f"OCSP: Status: {status.name.lower()}")
    say(6, f"OCSP: This update: {_local(this_update)}")
    if next_update is not None:
        say(6, f"OCSP: Next update: {_local(next_update)}")
    now = datetime.datetime.now(datetime.UTC)
    if this_update > now + LEEWAY:
        return inconclusive(say, "response not yet valid (thisUpdate in the future)")
    if next_update is not None and next_update < now - LEEWAY:
        return inconclusive(say, "response expired (nextUpdate in the past)")
    if next_update is not None and next_update < this_update:
        return inconclusive(say, "bad response: nextUpdate before thisUpdate")
    ttl = None if next_update is None else (next_update - now).total_seconds()
    if status is ocsp.OCSPCertStatus.GOOD:
        say(5, "OCSP: Certificate accepted")
        return Answer(Status.GOOD, ttl=ttl)
    if status is ocsp.OCSPCertStatus.REVOKED:
        why = "" if reason is None else f": {_REASON_CODES.get(reason, -1)}: {reason.value}"
        say(3, f"OCSP: Certificate revoked{why}")
        if revoked_at is not None:
            say(5, f"OCSP: Revoked at: {_local(revoked_at)}")
        return Answer(Status.REVOKED, f"certificate revoked{why}", ttl=ttl)
    say(4, "OCSP: Unknown verification status")
    return Answer(Status.UNKNOWN, "status unknown (the responder does not know this certificate)")


def _verify_response(
    resp: ocsp.OCSPResponse,
    chain: list[x509.Certificate],
    anchors: list[x509.Certificate],
    flags: frozenset[str],
) -> str | None:
    """``OCSP_basic_verify`` with ``certs`` = the peer chain (+ root): None or a reason."""
    embedded = list(resp.certificates)
    signer = _find_responder(resp, chain)
    in_chain = signer is not None
    if signer is None and "NOINTERN" not in flags:
        signer = _find_responder(resp, embedded)
    if signer is None:
        return "signer certificate not found (responder ID matches no certificate)"
    no_verify = "NOVERIFY" in flags or (in_chain and "TRUSTOTHER" in flags)
    if "NOSIGS" not in flags:
        try:
            _verify_signature(signer.public_key(), resp)
        except InvalidSignature:
            return "bad response signature"
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            return f"bad response signature ({exc})"
    if no_verify:
        return None
    pool = [] if "NOCHAIN" in flags else [*embedded, *chain]
    now = datetime.datetime.now(datetime.UTC)
    path = _build_path(signer, pool, anchors, now)
    if isinstance(path, str):
        return f"responder certificate not trusted: {path}"
    if "NOCHECKS" in flags:
        return None
    singles = list(resp.responses)
    if not singles:
        return "bad response: no certificate status in the response"
    if len(path) > 1 and all(_matches_issuer(path[1], s) for s in singles):
        if _ocsp_signing(signer):
            return None
        return "responder not authorized: delegated responder certificate lacks OCSP signing usage"
    if all(_matches_issuer(signer, s) for s in singles):
        return None
    return "responder not authorized: neither the issuer nor a delegated responder of the issuer"


def _find_responder(resp: ocsp.OCSPResponse, certs: Iterable[x509.Certificate]) -> x509.Certificate | None:
    name, key_hash = resp.responder_name, resp.responder_key_hash
    for cert in certs:
        if name is not None and cert.subject == name:
            return cert
        if key_hash is not None and len(key_hash) == 20:
            with contextlib.suppress(ValueError, UnsupportedAlgorithm):
                if hashlib.sha1(_key_bits(cert)).digest() == key_hash:  # noqa: S324 - RFC 6960 KeyHash
                    return cert
    return None


def _verify_signature(key: object, resp: ocsp.OCSPResponse) -> None:
    """Raise InvalidSignature (or ValueError for an unusable algorithm)."""
    oid, sig, data = resp.signature_algorithm_oid, resp.signature, resp.tbs_response_bytes
    if isinstance(key, ed25519.Ed25519PublicKey) and oid == SignatureAlgorithmOID.ED25519:
        key.verify(sig, data)
        return
    if isinstance(key, ed448.Ed448PublicKey) and oid == SignatureAlgorithmOID.ED448:
        key.verify(sig, data)
        return
    algorithm = resp.signature_hash_algorithm
    if algorithm is None:
        raise ValueError("no hash algorithm")
    if isinstance(key, rsa.RSAPublicKey) and oid in _RSA_SIGS:
        key.verify(sig, data, padding.PKCS1v15(), algorithm)
    elif isinstance(key, rsa.RSAPublicKey) and oid == SignatureAlgorithmOID.RSASSA_PSS:
        key.verify(sig, data, padding.PSS(padding.MGF1(algorithm), padding.PSS.AUTO), algorithm)
    elif isinstance(key, ec.EllipticCurvePublicKey) and oid in _ECDSA_SIGS:
        key.verify(sig, data, ec.ECDSA(algorithm))
    elif isinstance(key, dsa.DSAPublicKey) and oid in _DSA_SIGS:
        key.verify(sig, data, algorithm)
    else:
        raise ValueError(f"signature algorithm {oid.dotted_string} does not fit the signer's key")


def _build_path(
    cert: x509.Certificate,
    pool: list[x509.Certificate],
    anchors: list[x509.Certificate],
    now: datetime.datetime,
) -> list[x509.Certificate] | str:
    """The responder certificate's path to a trust anchor, or why there is none."""
    problems: list[str] = []

    def valid(c: x509.Certificate) -> bool:
        if c.not_valid_before_utc > now or c.not_valid_after_utc < now:
            problems.append(f"{oneline(c.subject)} is expired or not yet valid")
            return False
        return True

    def walk(path: list[x509.Certificate]) -> list[x509.Certificate] | None:
        top = path[-1]
        if not valid(top):
            return None
        if top in anchors:
            return path
        if len(path) >= MAX_CHAIN:
            return None
        for candidate in [*anchors, *pool]:
            if candidate in path or candidate.subject != top.issuer:
                continue
            if not _may_sign_certs(candidate, candidate in anchors):
                problems.append(f"{oneline(candidate.subject)} is not a CA")
                continue
            try:
                top.verify_directly_issued_by(candidate)
            except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
                continue
            found = walk([*path, candidate])
            if found is not None:
                return found
        return None

    path = walk([cert])
    if path is not None:
        return path
    if problems:
        return problems[0]
    return f"no trusted issuer for {oneline(cert.subject)}"


def _may_sign_certs(cert: x509.Certificate, anchor: bool) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = bc.ca
    except x509.ExtensionNotFound:
        is_ca = anchor and self_issued(cert)  # an old v1 root in the trust store
    except ValueError:
        return False
    if not is_ca:
        return False
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    except ValueError:
        return False
    return ku.key_cert_sign


def _ocsp_signing(cert: x509.Certificate) -> bool:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    return ExtendedKeyUsageOID.OCSP_SIGNING in eku


def _matches_issuer(cert: x509.Certificate, single: ocsp.OCSPSingleResponse) -> bool:
    """Is ``cert`` the issuer named by the CertID of ``single`` (any CertID hash)?"""
    try:
        algorithm = single.hash_algorithm
        name_hash = hashes.Hash(algorithm)
        name_hash.update(cert.subject.public_bytes())
        key_hash = hashes.Hash(algorithm)
        key_hash.update(_key_bits(cert))
    except (ValueError, UnsupportedAlgorithm):
        return False
    return name_hash.finalize() == single.issuer_name_hash and key_hash.finalize() == single.issuer_key_hash


def _key_bits(cert: x509.Certificate) -> bytes:
    """The subjectPublicKey BIT STRING contents (what CertID/KeyHash hash)."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    start, _ = _der(spki, 0, 0x30)
    _, after_alg = _der(spki, start, 0x30)
    bits, end = _der(spki, after_alg, 0x03)
    return spki[bits + 1 : end]  # skip the unused-bits octet


def _der(data: bytes, pos: int, tag: int) -> tuple[int, int]:
    """(content start, content end) of the DER element at ``pos``, which must be ``tag``."""
    if pos + 2 > len(data) or data[pos] != tag:
        raise ValueError("bad DER")
    length, pos = data[pos + 1], pos + 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or pos + count > len(data):
            raise ValueError("bad DER length")
        length, pos = int.from_bytes(data[pos : pos + count], "big"), pos + count
    if pos + length > len(data):
        raise ValueError("truncated DER")
    return pos, pos + length


# ---------------------------------------------------------------- certificates


def find_issuer(cert: x509.Certificate, candidates: Iterable[x509.Certificate]) -> x509.Certificate | None:
    for candidate in candidates:
        if candidate.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(candidate)
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
            continue
        return candidate
    return None


def self_issued(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer


def oneline(name: x509.Name) -> str:
    return ", ".join(f"{a.rfc4514_attribute_name}={a.value!s}" for a in name)


def _local(when: datetime.datetime) -> str:
    return when.astimezone().strftime("%Y.%m.%d %H:%M:%S")
