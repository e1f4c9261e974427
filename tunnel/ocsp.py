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
  response's ``nextUpdate`` (or ``ocspcache.DEFAULT_TTL`` without one), so resumed
  and parallel connections do not each ask the responder; concurrent identical lookups
  share one request.  stunnel has no client-side cache; it asks on every handshake.

Nothing here raises: every failure becomes a one-line reason string.

The rooms: this module holds the options (:class:`OcspPolicy`, ``OCSPflag``/``OCSP`` checks),
the chain walk (:func:`check_chain`, :func:`verified_chain`) and one query per responder;
``ocspverify`` what one response means (``OCSP_basic_verify``, the answer), ``ocsphttp``
the HTTP/1.0 exchange, ``ocspcache`` the shared answers.  Arrows run down:
ocsp -> ocspcache -> ocspverify, ocsp -> ocsphttp; none imports anything else of tunnel.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import AuthorityInformationAccessOID

from tunnel.ocspcache import CACHE, CacheKey, ResponseCache
from tunnel.ocsphttp import HttpError, http_post, parse_url
from tunnel.ocspverify import (
    MAX_CHAIN,
    Answer,
    Log,
    Status,
    find_issuer,
    inconclusive,
    oneline,
    self_issued,
    validate,
)

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
        parse_url(url)
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


# ---------------------------------------------------------------- the check


async def check_chain(
    chain_der: Sequence[bytes],
    policy: OcspPolicy,
    trusted: Sequence[x509.Certificate] = (),
    *,
    log: Log | None = None,
    cache: ResponseCache | None = None,
    staple: bytes | None = None,
) -> str | None:
    """Check the verified peer chain (leaf first).  ``None`` accepts; otherwise the
    one-line reason to reject the connection, e.g. ``OCSP: certificate revoked ...``.

    ``staple``: the OCSP response the server stapled (client mode, ``verifyChain``).  A
    definitive one (good or revoked, verified as a fetched one) answers for the leaf and
    no responder is asked about it; otherwise the configured URL and AIA are, as in
    stunnel 5.71+.  With neither OCSP nor OCSPaia, only a staple is checked.

    ``trusted`` adds trust anchors to ``policy.trust`` (e.g. certificates from CApath).
    The last certificate of ``chain_der`` is trusted as the anchor the handshake
    verified the chain to, so pass only a chain the handshake verified."""
    if not policy.enabled and not staple:
        return None
    say: Log = log or _quiet
    try:
        return await _check_chain(chain_der, policy, trusted, say, CACHE if cache is None else cache, staple)
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
    staple: bytes | None = None,
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
    if not self_issued(top) and top not in anchors:  # ocsp_params_append_root_ca
        root = find_issuer(top, anchors)
        if root is None:
            say(6, "OCSP: The root CA certificate was not found")
        else:
            chain.append(root)
    anchors.append(chain[-1])  # the anchor the handshake verified the chain to
    key_extra: tuple[object, ...] = tuple(sorted(c.fingerprint(hashes.SHA256()) for c in trusted))
    say(7, "OCSP: Ignoring the root certificate")

    async def one(depth: int) -> Answer | None:
        try:
            if depth == 0 and staple:
                answer = _check_staple(staple, chain, anchors, policy, say)
                if answer.status is not Status.UNKNOWN:
                    return answer
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
        where = f"depth={depth}: {oneline(chain[depth].subject)}"
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


def _check_staple(
    staple: bytes,
    chain: list[x509.Certificate],
    anchors: list[x509.Certificate],
    policy: OcspPolicy,
    say: Log,
) -> Answer:
    """The server's stapled response about the leaf, verified like a fetched one (no nonce:
    nobody asked it with ours)."""
    cert, issuer = chain[0], chain[1]
    request = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1()).build()
    return validate(staple, request, None, cert, chain, anchors, policy.flags, say)


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
        aia = aia_urls(cert)
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
        host, port, path, host_header = parse_url(url)
    except ValueError as exc:
        return inconclusive(say, f"bad responder URL {url!r}: {exc}")
    builder = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())
    nonce = os.urandom(16) if policy.nonce else None
    if nonce is not None:
        builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
    request = builder.build()
    body = request.public_bytes(serialization.Encoding.DER)
    try:
        async with asyncio.timeout(policy.timeout):
            der = await http_post(host, port, path, host_header, body, say)
    except TimeoutError:
        return inconclusive(
            say, f"responder timed out: {url}: no answer within {policy.timeout:g} s (TIMEOUTocsp)"
        )
    except HttpError as exc:
        return inconclusive(say, f"bad HTTP response from {url}: {exc}")
    except OSError as exc:
        return inconclusive(say, f"responder unreachable: {url}: {exc.strerror or exc}")
    say(7, "OCSP: Response received")
    return validate(der, request, nonce, cert, chain, anchors, policy.flags, say)


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
        if self_issued(cert):
            break
        issuer = find_issuer(cert, trusted)
        if issuer is None:
            break
        chain.append(issuer.public_bytes(serialization.Encoding.DER))
        cert = issuer
    return chain


_ENCODING_DER: int = getattr(getattr(ssl, "_ssl", None), "ENCODING_DER", 2)


def aia_urls(cert: x509.Certificate) -> list[str]:
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


__all__ = [
    "FLAG_NOTES",
    "NOOP_FLAGS",
    "VERIFY_FLAGS",
    "OcspPolicy",
    "check_chain",
    "check_flags",
    "check_url",
    "flag_notes",
    "verified_chain",
]
