"""Client-driven OCSP checks after the handshake: stunnel's ``OCSP``, ``OCSPaia``,
``OCSPflag``, ``OCSPnonce``, ``OCSPrequire`` and ``TIMEOUTocsp``.

Theory of operation
===================

Python's ``ssl`` module has no OCSP API, so stunnel's check (``src/ocsp.c``, run from the
verify callback during the handshake) happens here, once per connection, after a
successful handshake and before any byte is relayed.  The caller passes the verified
chain (:func:`verified_chain`: leaf first, trust anchor last); a rejection closes the
connection.  What stunnel does, and so what we do:

* Only when ``OCSP = URL`` or ``OCSPaia = yes`` is set, and only with ``verifyChain``.
* Every certificate of the chain is checked except the last one (the root).  If the
  chain does not end in a self-issued certificate, the root is looked up in the trusted
  certificates and appended first, as ``ocsp_params_append_root_ca`` does.
* The leaf asks the configured ``OCSP`` URL first.  If that gives no definitive answer
  (good or revoked) and ``OCSPaia = yes``, the URLs of the certificate's AIA extension
  are asked in order until one answers definitively.  Intermediates only use AIA.  A
  certificate for which no URL applies is accepted without a request.
* ``revoked`` always rejects.  Anything else that is not ``good`` -- no responder
  reachable, an HTTP or DER error, a bad signature, a wrong nonce, a stale response,
  ``unknown`` -- is inconclusive: it rejects with ``OCSPrequire = yes`` (the default)
  and is accepted with ``OCSPrequire = no``.
* The response is verified like ``OCSP_basic_verify``: the signer is looked up by
  responder ID among the chain and then the certificates inside the response; its
  signature is checked; its certificate must chain (through the response and chain
  certificates) to a trust anchor; and it must be either the issuer of the checked
  certificate, or a delegated responder issued by that issuer with the OCSPSigning
  extended key usage.  ``OCSPflag`` relaxes these steps exactly as in OpenSSL (see
  :data:`FLAG_NOTES`).  ``thisUpdate``/``nextUpdate`` get one minute of leeway.
* ``TIMEOUTocsp`` bounds each responder exchange as a whole (connect, request and
  answer).  stunnel applies it to the connect only and then waits ``TIMEOUTbusy``
  (300 s) for the answer; a connection held that long by a dead responder is worse.
* Definitive, verified answers are cached per (policy, issuer, serial) until the
  response's ``nextUpdate`` (or :data:`DEFAULT_TTL` without one), so resumed and
  parallel connections do not each ask the responder; concurrent identical lookups
  share one request.  stunnel has no client-side cache; it asks on every handshake.

Nothing here raises: every failure becomes a one-line reason string.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import os
import re
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from functools import cached_property

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID, ExtendedKeyUsageOID, SignatureAlgorithmOID

Log = Callable[[int, str], None]  # (syslog level 0..7, text), e.g. Connection.log

MAX_RESPONSE = 1 << 20  # bytes of HTTP body we accept from a responder
MAX_HEADER_LINES = 100
LEEWAY = datetime.timedelta(seconds=60)  # stunnel's OCSP_check_validity leeway
DEFAULT_TTL = 60.0  # cache seconds for a response without nextUpdate
MAX_CHAIN = 10  # responder certificate path length limit

# OCSPflag names: the OpenSSL OCSP_* flags stunnel accepts (case-insensitive)
VERIFY_FLAGS = {
    "NOINTERN": "do not look for the responder certificate among the certificates in the response",
    "NOSIGS": "do not check the response signature",
    "NOCHAIN": "do not use the response and peer certificates to build the responder certificate's chain",
    "NOVERIFY": "do not verify the responder certificate at all (any signer is accepted)",
    "NOEXPLICIT": "do not accept a responder through explicit OCSP-signing trust of its root "
    "(pytunnel never does: PEM CA files carry no such trust settings)",
    "NOCHECKS": "do not check that the responder is the issuer or a delegated OCSP signer of the issuer",
    "TRUSTOTHER": "a responder certificate found in the peer's chain needs no further verification",
}
NOOP_FLAGS = {
    "NOCERTS": "only affects signing OCSP requests, which stunnel never signs",
    "RESPID_KEY": "only affects how a responder identifies itself when signing responses",
    "NOTIME": "only affects signing responses (no producedAt); response verification ignores it",
    "NOCASIGN": "OpenSSL's response verification ignores it",
    "NODELEGATED": "OpenSSL's response verification ignores it",
}
FLAG_NOTES = {**VERIFY_FLAGS, **NOOP_FLAGS}
_RISKY_FLAGS = {"NOVERIFY", "NOSIGS", "NOCHECKS"}

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
_STATUS_LINE = re.compile(r"HTTP/1\.[01] (\d{3})(?: (.*))?")


# ---------------------------------------------------------------- configuration


def check_flags(names: Iterable[str]) -> str | None:
    """Validate ``OCSPflag`` values: ``None`` when all are known, else one sentence.

    Every flag stunnel accepts is accepted.  The ones OpenSSL's response verification
    ignores (signing-only flags) are no-ops for stunnel too, so they are no-ops here;
    :func:`flag_notes` says so for the log."""
    bad = [n for n in names if n.upper() not in FLAG_NOTES]
    if not bad:
        return None
    shown = ", ".join(repr(n) for n in bad)
    return (
        f'OCSPflag = {shown}: unknown OCSP flag (stunnel\'s "Illegal OCSP flag"); '
        f"expected one of {', '.join(FLAG_NOTES)}"
    )


def flag_notes(names: Iterable[str]) -> list[str]:
    """Lines worth logging at start-up for the given (valid) flags: flags without effect,
    and flags that weaken verification."""
    notes = []
    for name in dict.fromkeys(n.upper() for n in names):
        if name in NOOP_FLAGS:
            notes.append(f"OCSPflag = {name} has no effect: it {NOOP_FLAGS[name]}")
        elif name in _RISKY_FLAGS:
            notes.append(f"OCSPflag = {name}: {VERIFY_FLAGS[name]}; OCSP answers can be forged")
    return notes


def check_url(url: str) -> str | None:
    """Validate an ``OCSP = URL`` value; stunnel itself only fails when it connects."""
    try:
        _parse_url(url)
    except ValueError as exc:
        return f"OCSP = {url}: {exc}"
    return None


@dataclass(frozen=True)
class OcspPolicy:
    """One service's OCSP settings, built once per (re)load."""

    url: str | None = None  # OCSP = URL: asked first for the leaf
    aia: bool = False  # OCSPaia = yes: ask the URLs in each certificate's AIA extension
    flags: frozenset[str] = frozenset()  # OCSPflag names (any case)
    nonce: bool = False  # OCSPnonce = yes: send a nonce, require it echoed
    require: bool = True  # OCSPrequire: an inconclusive answer rejects
    timeout: float = 5.0  # TIMEOUTocsp, seconds per responder exchange
    trust: tuple[x509.Certificate, ...] = ()  # CAfile certificates: root lookup and responder trust

    def __post_init__(self) -> None:
        object.__setattr__(self, "flags", frozenset(f.upper() for f in self.flags))
        object.__setattr__(self, "trust", tuple(self.trust))

    @property
    def enabled(self) -> bool:
        return bool(self.url) or self.aia

    @cached_property
    def cache_key(self) -> tuple[object, ...]:
        """The policy's part of a cache key: what verifying an answer depends on (not
        require or timeout).  The certificate, its issuer and the URLs are added per lookup."""
        anchors = tuple(sorted(c.fingerprint(hashes.SHA256()) for c in self.trust))
        return (self.flags, self.nonce, anchors)


# ---------------------------------------------------------------- results and cache


class Status(Enum):
    GOOD = "good"
    REVOKED = "revoked"
    UNKNOWN = "unknown"  # inconclusive, for whatever reason


@dataclass(frozen=True)
class Answer:
    status: Status
    reason: str = ""  # without the "OCSP: " prefix; empty for good
    ttl: float | None = None  # seconds a definitive answer may be cached; None: no nextUpdate


CacheKey = tuple[object, ...]


class ResponseCache:
    """Verified definitive answers until they expire, plus in-flight lookups to share."""

    def __init__(self, max_entries: int = 4096, default_ttl: float = DEFAULT_TTL) -> None:
        self.max_entries = max_entries
        self.default_ttl = default_ttl
        self._entries: dict[CacheKey, tuple[float, Answer]] = {}
        self._inflight: dict[CacheKey, asyncio.Task[Answer]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:  # an empty cache is still a cache (``cache or CACHE``)
        return True

    def clear(self) -> None:
        self._entries.clear()

    def get(self, key: CacheKey) -> Answer | None:
        hit = self._entries.get(key)
        if hit is None:
            return None
        if hit[0] <= time.monotonic():
            del self._entries[key]
            return None
        return hit[1]

    def put(self, key: CacheKey, answer: Answer) -> None:
        if answer.status is Status.UNKNOWN:
            return
        ttl = self.default_ttl if answer.ttl is None else answer.ttl
        if ttl <= 0:
            return
        now = time.monotonic()
        if len(self._entries) >= self.max_entries:
            for k in [k for k, (deadline, _) in self._entries.items() if deadline <= now]:
                del self._entries[k]
            while len(self._entries) >= self.max_entries:
                del self._entries[next(iter(self._entries))]
        self._entries.pop(key, None)
        self._entries[key] = (now + ttl, answer)

    async def lookup(self, key: CacheKey, fetch: Callable[[], Awaitable[Answer]]) -> tuple[Answer, str]:
        """(answer, how): ``cached``, ``shared`` (joined a lookup in progress) or ``fetched``."""
        hit = self.get(key)
        if hit is not None:
            return hit, "cached"
        loop = asyncio.get_running_loop()
        task = self._inflight.get(key)
        how = "shared"
        if task is None or task.done() or task.get_loop() is not loop:
            how = "fetched"

            async def run() -> Answer:
                answer = await fetch()
                self.put(key, answer)
                return answer

            task = loop.create_task(run())
            self._inflight[key] = task

            def forget(done: asyncio.Task[Answer], key: CacheKey = key) -> None:
                if self._inflight.get(key) is done:
                    del self._inflight[key]

            task.add_done_callback(forget)
        # shield: one connection giving up must not cancel the lookup others wait for
        return await asyncio.shield(task), how


CACHE = ResponseCache()


# ---------------------------------------------------------------- the check


async def check_chain(
    chain_der: Sequence[bytes],
    policy: OcspPolicy,
    trusted: Sequence[x509.Certificate] = (),
    *,
    log: Log | None = None,
    cache: ResponseCache | None = None,
) -> str | None:
    """Check the verified peer chain (leaf first).  ``None`` accepts; otherwise the
    one-line reason to reject the connection, e.g. ``OCSP: certificate revoked ...``.

    ``trusted`` adds trust anchors to ``policy.trust`` (e.g. certificates from CApath).
    The last certificate of ``chain_der`` is trusted as the anchor the handshake
    verified the chain to, so pass only a chain the handshake verified."""
    if not policy.enabled:
        return None
    say: Log = log or _quiet
    try:
        return await _check_chain(chain_der, policy, trusted, say, CACHE if cache is None else cache)
    except Exception as exc:  # the contract: a reason, never an exception
        say(3, f"OCSP: internal error: {exc!r}")
        return f"OCSP: internal error: {exc!r}"


def _quiet(level: int, text: str) -> None:
    pass


async def _check_chain(
    chain_der: Sequence[bytes],
    policy: OcspPolicy,
    trusted: Sequence[x509.Certificate],
    say: Log,
    cache: ResponseCache,
) -> str | None:
    try:
        chain = [x509.load_der_x509_certificate(bytes(der)) for der in chain_der]
    except ValueError as exc:
        return f"OCSP: cannot parse the peer certificate chain: {exc}"
    if not chain:
        say(3, "OCSP: Empty verification chain")
        return "OCSP: empty verification chain"
    anchors = [*policy.trust, *trusted]
    top = chain[-1]
    if not _self_issued(top) and top not in anchors:  # ocsp_params_append_root_ca
        root = _find_issuer(top, anchors)
        if root is None:
            say(6, "OCSP: The root CA certificate was not found")
        else:
            chain.append(root)
    anchors.append(chain[-1])  # the anchor the handshake verified the chain to
    key_extra: tuple[object, ...] = tuple(sorted(c.fingerprint(hashes.SHA256()) for c in trusted))
    say(7, "OCSP: Ignoring the root certificate")

    async def one(depth: int) -> Answer | None:
        try:
            return await _check_depth(depth, chain, anchors, policy, key_extra, say, cache)
        except Exception as exc:
            return Answer(Status.UNKNOWN, f"internal error: {exc!r}")

    answers = await asyncio.gather(*(one(d) for d in range(len(chain) - 1)))
    revoked: str | None = None
    inconclusive: str | None = None
    for depth in reversed(range(len(answers))):  # stunnel's order: the root end first
        answer = answers[depth]
        if answer is None:  # no URL applied: stunnel accepts without a request
            continue
        where = f"depth={depth}: {_oneline(chain[depth].subject)}"
        if answer.status is Status.GOOD:
            say(5, "OCSP: Accepted (good)")
        elif answer.status is Status.REVOKED:
            say(3, "OCSP: Rejected (revoked)")
            say(4, f"Rejected by OCSP at {where}")
            revoked = revoked or f"OCSP: {answer.reason} ({where})"
        elif policy.require:
            say(3, "OCSP: Rejected (OCSPrequire = yes)")
            say(4, f"Rejected by OCSP at {where}")
            inconclusive = inconclusive or f"OCSP: {answer.reason} ({where})"
        else:
            say(5, "OCSP: Accepted (OCSPrequire = no)")
    return revoked or inconclusive


async def _check_depth(
    depth: int,
    chain: list[x509.Certificate],
    anchors: list[x509.Certificate],
    policy: OcspPolicy,
    key_extra: tuple[object, ...],
    say: Log,
    cache: ResponseCache,
) -> Answer | None:
    cert, issuer = chain[depth], chain[depth + 1]
    urls: list[tuple[str, str]] = []
    if depth == 0 and policy.url:
        urls.append(("configured", policy.url))
    if policy.aia:
        aia = _aia_urls(cert)
        if not aia:
            say(6, "OCSP: No AIA responder URL")
        urls.extend(("AIA", u) for u in aia)
    if not urls:
        return None
    key: CacheKey = (
        policy.cache_key,
        key_extra,
        policy.url if depth == 0 else None,
        policy.aia,
        issuer.fingerprint(hashes.SHA256()),
        cert.serial_number,
    )

    async def fetch() -> Answer:
        reasons: list[str] = []
        for kind, url in urls:
            say(5, f'OCSP: Connecting the {kind} responder "{url}"')
            answer = await _query(url, cert, issuer, chain, anchors, policy, say)
            if answer.status is not Status.UNKNOWN:
                return answer
            reasons.append(answer.reason)
        return Answer(Status.UNKNOWN, "; ".join(dict.fromkeys(reasons)))

    answer, how = await cache.lookup(key, fetch)
    if how == "cached":
        say(7, f"OCSP: Use the cached OCSP response ({answer.status.value})")
    elif how == "shared":
        say(7, f"OCSP: Used the answer of a lookup in progress ({answer.status.value})")
    return answer


def _inconclusive(say: Log, reason: str) -> Answer:
    """An answer that is neither good nor revoked: logged, and UNKNOWN with its reason."""
    say(3, f"OCSP: {reason}")
    return Answer(Status.UNKNOWN, reason)


async def _query(
    url: str,
    cert: x509.Certificate,
    issuer: x509.Certificate,
    chain: list[x509.Certificate],
    anchors: list[x509.Certificate],
    policy: OcspPolicy,
    say: Log,
) -> Answer:
    """One request to one responder, validated: GOOD, REVOKED or UNKNOWN with a reason."""

    try:
        host, port, path, host_header = _parse_url(url)
    except ValueError as exc:
        return _inconclusive(say, f"bad responder URL {url!r}: {exc}")
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())
    nonce = os.urandom(16) if policy.nonce else None
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    request = builder.build()
    body = request.public_bytes(serialization.Encoding.DER)
    try:
        async with asyncio.timeout(policy.timeout):
            der = await _http_post(host, port, path, host_header, body, say)
    except TimeoutError:
        return _inconclusive(
            say, f"responder timed out: {url}: no answer within {policy.timeout:g} s (TIMEOUTocsp)"
        )
    except _HttpError as exc:
        return _inconclusive(say, f"bad HTTP response from {url}: {exc}")
    except OSError as exc:
        return _inconclusive(say, f"responder unreachable: {url}: {exc.strerror or exc}")
    say(7, "OCSP: Response received")
    return _validate(der, request, nonce, cert, chain, anchors, policy, say)


def _validate(
    der: bytes,
    request: ocsp.OCSPRequest,
    nonce: bytes | None,
    cert: x509.Certificate,
    chain: list[x509.Certificate],
    anchors: list[x509.Certificate],
    policy: OcspPolicy,
    say: Log,
) -> Answer:
    try:
        resp = ocsp.load_der_ocsp_response(der)
    except ValueError as exc:
        return _inconclusive(say, f"bad response: not a DER-encoded OCSP response ({exc})")
    outcome = resp.response_status
    if outcome is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        return _inconclusive(
            say, f"responder error: {outcome.value}: {_RESPONSE_STATUS_NAMES.get(outcome, outcome.name)}"
        )
    try:
        if nonce is not None:
            try:
                echoed = resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
            except x509.ExtensionNotFound:
                return _inconclusive(say, "nonce missing from the response (OCSPnonce = yes)")
            if echoed != nonce:
                return _inconclusive(say, "nonce mismatch")
        problem = _verify_response(resp, chain, anchors, policy.flags)
        if problem:
            return _inconclusive(say, problem)
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
            return _inconclusive(say, "no status for this certificate in the response")
        this_update, next_update = single.this_update_utc, single.next_update_utc
        status = single.certificate_status
        reason = single.revocation_reason
        revoked_at = single.revocation_time_utc
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.DuplicateExtension) as exc:  # malformed inside
        return _inconclusive(say, f"bad response: {exc}")
    say(6, f"OCSP: Status: {status.name.lower()}")
    say(6, f"OCSP: This update: {_local(this_update)}")
    if next_update is not None:
        say(6, f"OCSP: Next update: {_local(next_update)}")
    now = datetime.datetime.now(datetime.UTC)
    if this_update > now + LEEWAY:
        return _inconclusive(say, "response not yet valid (thisUpdate in the future)")
    if next_update is not None and next_update < now - LEEWAY:
        return _inconclusive(say, "response expired (nextUpdate in the past)")
    if next_update is not None and next_update < this_update:
        return _inconclusive(say, "bad response: nextUpdate before thisUpdate")
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


# ---------------------------------------------------------------- response verification


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
            problems.append(f"{_oneline(c.subject)} is expired or not yet valid")
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
                problems.append(f"{_oneline(candidate.subject)} is not a CA")
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
    return f"no trusted issuer for {_oneline(cert.subject)}"


def _may_sign_certs(cert: x509.Certificate, anchor: bool) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        is_ca = bc.ca
    except x509.ExtensionNotFound:
        is_ca = anchor and _self_issued(cert)  # an old v1 root in the trust store
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


# ---------------------------------------------------------------- HTTP


class _HttpError(Exception):
    pass


def _parse_url(url: str) -> tuple[str, int, str, str]:
    """(host, port, path, Host header) of an ``http://`` responder URL."""
    parts = urllib.parse.urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme == "https":
        raise ValueError(
            "TLS not supported for OCSP (define a client-mode service for it and use its http URL)"
        )
    if scheme != "http":
        raise ValueError("expected an http:// URL")
    host = parts.hostname
    if not host:
        raise ValueError("no host in the URL")
    port = parts.port or 80  # raises ValueError for a bad port
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    netloc = parts.netloc.rpartition("@")[2]
    if any(c in path + netloc for c in "\r\n ") or not path.startswith("/"):
        raise ValueError("bad characters in the URL")
    return host, port, path, netloc


async def _http_post(host: str, port: int, path: str, host_header: str, body: bytes, say: Log) -> bytes:
    """POST an OCSP request over HTTP/1.0; the response body, at most MAX_RESPONSE bytes."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        say(7, f"OCSP: Connected {host}:{port}")
        head = (
            f"POST {path} HTTP/1.0\r\nHost: {host_header}\r\nUser-Agent: pytunnel\r\n"
            "Content-Type: application/ocsp-request\r\nAccept: application/ocsp-response\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode("ascii") + body)
        await writer.drain()
        return await _read_response(reader)
    finally:
        writer.close()


async def _read_response(reader: asyncio.StreamReader) -> bytes:
    try:
        status_line = await reader.readline()
        if not status_line:
            raise _HttpError("connection closed without a response")
        match = _STATUS_LINE.fullmatch(status_line.decode("latin-1").rstrip("\r\n"))
        if not match:
            raise _HttpError(f"not an HTTP status line: {_shorten(status_line)}")
        if match.group(1) != "200":
            raise _HttpError(f"HTTP status {match.group(1)} {(match.group(2) or '').strip()}".rstrip())
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADER_LINES):
            line = await reader.readline()
            if not line.endswith(b"\n"):
                raise _HttpError("connection closed in the headers")
            text = line.decode("latin-1").rstrip("\r\n")
            if not text:
                break
            name, colon, value = text.partition(":")
            if not colon or not name or name != name.strip():
                raise _HttpError(f"bad header line: {_shorten(line)}")
            name = name.lower()
            value = value.strip()
            if name in headers and headers[name] != value:
                if name in ("content-length", "transfer-encoding"):
                    raise _HttpError(f"conflicting {name} headers")
                value = f"{headers[name]}, {value}"
            headers[name] = value
        else:
            raise _HttpError(f"more than {MAX_HEADER_LINES} header lines")
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return await _read_chunked(reader)
        if "content-length" in headers:
            raw = headers["content-length"]
            if not raw.isdigit():
                raise _HttpError(f"bad Content-Length: {raw[:40]!r}")
            length = int(raw)
            if length > MAX_RESPONSE:
                raise _HttpError(f"response too large ({length} bytes; the limit is {MAX_RESPONSE})")
            try:
                return await reader.readexactly(length)
            except asyncio.IncompleteReadError as exc:
                raise _HttpError(f"truncated body ({len(exc.partial)} of {length} bytes)") from None
        data = bytearray()
        while chunk := await reader.read(65536):
            data += chunk
            if len(data) > MAX_RESPONSE:
                raise _HttpError(f"response too large (over {MAX_RESPONSE} bytes)")
        return bytes(data)
    except ValueError as exc:  # StreamReader's line limit (LimitOverrunError is a ValueError here)
        raise _HttpError(f"malformed response: {exc}") from None


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    data = bytearray()
    while True:
        line = await reader.readline()
        size_text = line.split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _HttpError(f"bad chunk size: {_shorten(line)}") from None
        if size < 0 or len(data) + size > MAX_RESPONSE:
            raise _HttpError(f"response too large (over {MAX_RESPONSE} bytes)")
        if size == 0:
            for _ in range(MAX_HEADER_LINES):  # trailers
                if (await reader.readline()).strip() == b"":
                    return bytes(data)
            raise _HttpError("too many trailer lines")
        try:
            data += await reader.readexactly(size)
            await reader.readexactly(2)
        except asyncio.IncompleteReadError:
            raise _HttpError("truncated chunked body") from None


def _shorten(raw: bytes) -> str:
    return repr(raw[:60].rstrip(b"\r\n")) + ("..." if len(raw) > 60 else "")


# ---------------------------------------------------------------- certificates


def verified_chain(
    sslobj: ssl.SSLObject | ssl.SSLSocket, trusted: Sequence[x509.Certificate] = ()
) -> list[bytes]:
    """The peer's verified chain as DER, leaf first, trust anchor last.

    Python 3.13 has a public ``get_verified_chain()`` (DER bytes); 3.10-3.12 have it on
    the private ``_sslobj`` (``_ssl.Certificate`` objects).  Without either, the leaf
    and its issuers found in ``trusted``."""
    getter = getattr(sslobj, "get_verified_chain", None)
    if getter is None:
        getter = getattr(getattr(sslobj, "_sslobj", None), "get_verified_chain", None)
    if getter is not None:
        try:
            items = getter()
        except (ssl.SSLError, ValueError, AttributeError):
            items = None
        if items:
            out: list[bytes] = []
            for item in items:
                if isinstance(item, bytes | bytearray):
                    out.append(bytes(item))
                else:
                    out.append(bytes(item.public_bytes(_ENCODING_DER)))
            return out
    leaf = sslobj.getpeercert(binary_form=True)
    if not leaf:
        return []
    chain = [leaf]
    try:
        cert = x509.load_der_x509_certificate(leaf)
    except ValueError:
        return chain
    for _ in range(MAX_CHAIN):
        if _self_issued(cert):
            break
        issuer = _find_issuer(cert, trusted)
        if issuer is None:
            break
        chain.append(issuer.public_bytes(serialization.Encoding.DER))
        cert = issuer
    return chain


_ENCODING_DER: int = getattr(getattr(ssl, "_ssl", None), "ENCODING_DER", 2)


def _find_issuer(cert: x509.Certificate, candidates: Iterable[x509.Certificate]) -> x509.Certificate | None:
    for candidate in candidates:
        if candidate.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(candidate)
        except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
            continue
        return candidate
    return None


def _self_issued(cert: x509.Certificate) -> bool:
    return cert.subject == cert.issuer


def _aia_urls(cert: x509.Certificate) -> list[str]:
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    return [
        d.access_location.value
        for d in aia
        if d.access_method == AuthorityInformationAccessOID.OCSP
        and isinstance(d.access_location, x509.UniformResourceIdentifier)
    ]


def _oneline(name: x509.Name) -> str:
    return ", ".join(f"{a.rfc4514_attribute_name}={a.value!s}" for a in name)


def _local(when: datetime.datetime) -> str:
    return when.astimezone().strftime("%Y.%m.%d %H:%M:%S")


__all__ = [
    "CACHE",
    "DEFAULT_TTL",
    "FLAG_NOTES",
    "MAX_RESPONSE",
    "NOOP_FLAGS",
    "VERIFY_FLAGS",
    "Answer",
    "OcspPolicy",
    "ResponseCache",
    "Status",
    "check_chain",
    "check_flags",
    "check_url",
    "flag_notes",
    "verified_chain",
]
